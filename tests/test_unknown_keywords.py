"""Keyword arguments that no layer of a network knows raise a TypeError naming them and the closest valid ones;
the keys torch_rim writes into model_hparams.json beside the network's own (the RIM's settings) are accepted, so
its checkpoint directories reload."""
import json

import pytest
import torch

import rim_fast
from rim_fast.architectures.base import TORCH_RIM_SAVED_KEYS


@pytest.mark.parametrize("cls", [rim_fast.Hourglass, rim_fast.Unet], ids=lambda c: c.__name__)
def test_a_misspelt_keyword_names_the_closest_valid_one(cls):
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'hiden_units' \(did you mean 'hidden_units'\?\)"):
        cls(1, hiden_units=64)
    with pytest.raises(TypeError) as err:
        cls(1, dimensions=2, chmult=(1, 2), colour="red")
    message = str(err.value)
    assert "arguments 'chmult' (did you mean 'ch_mult'?), 'colour';" in message
    assert "valid ones: channels, dimensions, nf, ch_mult, hidden_units" in message


def test_torch_rim_saved_keys_are_accepted(tmp_path):
    saved = {"T": 4, "score_preprocessing_method": "ADAM", "initialization_method": "zeros", "epsilon": 1e-7,
             "beta_1": 0.9, "beta_2": 0.999, "architecture": "hourglass"}
    assert set(saved) == TORCH_RIM_SAVED_KEYS
    rim_fast.Hourglass(1, dimensions=1, nf=8, **saved)
    # a directory as torch_rim writes it: the network's hyperparameters and the RIM's settings in one file
    import rim
    net = rim.Hourglass(1, dimensions=1, nf=8)
    hparams = dict(net.hyperparameters, **saved)
    with open(tmp_path / "model_hparams.json", "w") as f:
        json.dump(hparams, f)
    torch.save(net.state_dict(), tmp_path / "checkpoint_1.0000e+00_001.pt")
    loaded = rim_fast.RIM((16,), checkpoints_directory=str(tmp_path), score_fn=lambda x, y: y - x, device="cpu")
    assert loaded.T == 10  # compat: torch_rim ignores the saved RIM settings
