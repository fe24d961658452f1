"""The README's main job: `python -m rim_fast.demo` loads the pretrained RIM shipped in the package and, in seconds,
reconstructs the test images clearly better than the observation; `--short` trains one from scratch for a fixed
number of steps from fixed seeds (reproducible) and also beats the observation, as SHORT_STEPS's comment says."""
import math
import os

import pytest
import torch

from rim_fast import demo


#: one thread (conftest.one_thread): the numbers above are measured so
pytestmark = pytest.mark.usefixtures("one_thread")


def _checkpoint():
    return torch.load(demo.PRETRAINED, map_location="cpu", weights_only=True)


def test_the_pretrained_checkpoint_is_small_float16_and_fits_the_demo_rim():
    assert os.path.isfile(demo.PRETRAINED), "rim_fast/pretrained/demo_deblur.pt: examples/train_demo_checkpoint.py"
    assert os.path.getsize(demo.PRETRAINED) < 400 * 1024
    checkpoint = _checkpoint()
    info, state = checkpoint["info"], checkpoint["state_dict"]
    # the settings it was trained with are the demo's
    assert (info["size"], info["T"], info["learning_rate"]) == (demo.SIZE, demo.T, demo.LEARNING_RATE), info
    assert {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in info["network"].items()} == \
        {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in demo.NETWORK.items()}, info
    assert info["seed"] == 0 and info["steps"] >= 1000, info
    # its own held-out measurement (written by the training script) shows a trained RIM
    assert info["rmse_held_out"] < 0.6 * info["rmse_observation_held_out"], info
    expected = demo.build_rim(demo.DeblurProblem()).model.state_dict()
    assert set(state) == set(expected)
    for name, value in state.items():
        assert value.shape == expected[name].shape, name
        if value.is_floating_point():
            assert value.dtype == torch.float16, name
            assert torch.isfinite(value).all(), name


def test_load_pretrained_puts_the_checkpoint_weights_into_the_rim():
    rim = demo.build_rim(demo.DeblurProblem())
    before = {k: v.clone() for k, v in rim.model.state_dict().items()}
    info = demo.load_pretrained(rim)
    assert info == _checkpoint()["info"]
    state = _checkpoint()["state_dict"]
    changed = 0
    for name, value in rim.model.state_dict().items():
        assert value.dtype == before[name].dtype, name  # loaded into float32, as built
        assert torch.equal(value, state[name].to(value.dtype)), name
        changed += not torch.equal(value, before[name])
    assert changed > len(state) // 2, "the weights were not replaced"


def test_demo_default_is_the_pretrained_rim_and_beats_the_observation_clearly(tmp_path):
    result = demo.main(["--out", str(tmp_path)])
    assert result["pretrained"] and result["steps"] == _checkpoint()["info"]["steps"], result
    assert math.isfinite(result["rmse_reconstruction"]) and result["rmse_observation"] > 0
    # measured: 0.1092 (observation) -> 0.0503 (RIM), a ratio of 0.46, in 2 s; 20 steps from scratch give 1.00
    assert result["rmse_reconstruction"] < 0.6 * result["rmse_observation"], result
    # no training: loading and predicting 32 images took 2 s; generous for a busy shared machine
    assert result["seconds"] < 60, result
    assert os.path.getsize(result["png"]) > 1000


def test_demo_short_mode_trains_from_scratch(tmp_path):
    result = demo.main(["--short", "--out", str(tmp_path), "--size", "16"])
    assert not result["pretrained"] and result["steps"] == demo.SHORT_STEPS, result
    assert math.isfinite(result["rmse_reconstruction"]) and result["rmse_observation"] > 0
    # measured (one thread): 0.1489 (observation) -> 0.1203 (RIM), a ratio of 0.81
    assert result["rmse_reconstruction"] < 0.9 * result["rmse_observation"], result
    assert os.path.getsize(result["png"]) > 1000
