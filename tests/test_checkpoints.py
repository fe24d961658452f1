"""Checkpoint directories both ways between torch_rim 0.2.9 and rim_fast, and fit's resume/retention."""
import json
import re
import os

import pytest
import torch

import rim
import rim_fast
from rim_fast import checkpoints as ckpt

from helpers import assert_close

D = (8,)


def score_fn(x, y):
    return y - x


def _data(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, *D, generator=g)
    y = x + 0.1 * torch.randn(n, 1, *D, generator=g)
    return y, x, torch.utils.data.TensorDataset(y, x)


def test_torch_rim_directory_loads_into_rim_fast(tmp_path):
    directory = str(tmp_path / "run")
    torch.manual_seed(0)
    net = rim.Hourglass(1, dimensions=1, nf=4)
    trainer = rim.RIM(D, net, score_fn=score_fn, T=3, score_preprocessing_method="ADAM", device="cpu")
    y, x, data = _data()
    trainer.fit(data, epochs=2, batch_size=2, learning_rate=1e-3, checkpoints_directory=directory, checkpoints=1)
    names = sorted(os.listdir(directory))
    assert "model_hparams.json" in names and "script_params.json" in names
    assert any(n.startswith("checkpoint_") for n in names) and any(n.startswith("optimizer_") for n in names)

    kw = dict(score_fn=score_fn, T=3, score_preprocessing_method="ADAM", device="cpu")
    ref = rim.RIM(D, checkpoints_directory=directory, **kw)
    new = rim_fast.RIM(D, checkpoints_directory=directory, **kw)
    assert_close(ref.predict(y), new.predict(y))
    # the loaded weights are the trained ones, not a fresh initialisation
    fresh = rim_fast.Hourglass(1, dimensions=1, nf=4)
    assert not torch.equal(fresh.input_layer.weight, new.model.input_layer.weight)
    assert torch.equal(ref.model.input_layer.weight, new.model.input_layer.weight)


def test_rim_fast_directory_loads_into_torch_rim(tmp_path):
    directory = str(tmp_path / "run")
    torch.manual_seed(0)
    trainer = rim_fast.RIM(D, rim_fast.Hourglass(1, dimensions=1, nf=4), score_fn=score_fn, T=3, device="cpu")
    y, x, data = _data()
    trainer.fit(data, epochs=2, batch_size=2, learning_rate=1e-3, checkpoints_directory=directory, checkpoints=1,
                verbose=-1)
    ref = rim.RIM(D, checkpoints_directory=directory, score_fn=score_fn, T=3, device="cpu")
    assert_close(ref.predict(y), trainer.predict(y))
    # torch_rim's own resume path can read the optimizer files rim_fast wrote
    ref.fit(data, epochs=1, batch_size=2, checkpoints_directory=directory)


def test_hidden_units_are_saved_and_reloaded(tmp_path):
    directory = str(tmp_path / "run")
    trainer = rim_fast.RIM(D, rim_fast.Hourglass(1, dimensions=1, nf=4, hidden_units=8), score_fn=score_fn, T=2,
                           device="cpu")
    trainer.fit(_data()[2], epochs=1, batch_size=4, checkpoints_directory=directory, verbose=-1)
    with open(os.path.join(directory, "model_hparams.json")) as f:
        assert json.load(f)["hidden_units"] == 8
    loaded = rim_fast.RIM(D, checkpoints_directory=directory, score_fn=score_fn, T=2, device="cpu")
    assert loaded.model.hidden_units == 8


def test_unet_directory_reloads(tmp_path):
    directory = str(tmp_path / "run")
    trainer = rim_fast.RIM((8, 8), rim_fast.Unet(1, dimensions=2, nf=4, hidden_units=6), score_fn=score_fn,
                           T=2, device="cpu")
    x = torch.randn(4, 1, 8, 8)
    trainer.fit(torch.utils.data.TensorDataset(x + 0.1, x), epochs=1, batch_size=2,
                checkpoints_directory=directory, verbose=-1)
    loaded = rim_fast.RIM((8, 8), checkpoints_directory=directory, score_fn=score_fn, T=2, device="cpu")
    assert isinstance(loaded.model, rim_fast.Unet)
    assert_close(loaded.predict(x), trainer.predict(x))


def test_fit_resumes_from_latest_and_from_a_given_checkpoint(tmp_path):
    directory = str(tmp_path / "run")
    y, x, data = _data()
    torch.manual_seed(0)
    trainer = rim_fast.RIM(D, rim_fast.Hourglass(1, dimensions=1, nf=4), score_fn=score_fn, T=2, device="cpu")
    trainer.fit(data, epochs=3, batch_size=2, learning_rate=1e-3, checkpoints_directory=directory, checkpoints=1,
                models_to_keep=10, verbose=-1)
    assert [f.index for f in ckpt.list_checkpoints(directory)] == [1, 2, 3]
    after_three = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    # a new RIM resumes from checkpoint 3 and continues numbering at 4
    other = rim_fast.RIM(D, rim_fast.Hourglass(1, dimensions=1, nf=4), score_fn=score_fn, T=2, device="cpu")
    other.fit(data, epochs=0, checkpoints_directory=directory, verbose=-1)
    for k, v in other.model.state_dict().items():
        assert torch.equal(v, after_three[k]), k
    other.fit(data, epochs=1, batch_size=2, learning_rate=1e-3, checkpoints_directory=directory, checkpoints=1,
              models_to_keep=10, verbose=-1)
    assert [f.index for f in ckpt.list_checkpoints(directory)] == [1, 2, 3, 4]

    # model_checkpoint picks an older one, with its own optimizer file (torch_rim crashed here, bug 9)
    first = torch.load(ckpt.list_checkpoints(directory)[0].model)
    third = rim_fast.RIM(D, rim_fast.Hourglass(1, dimensions=1, nf=4), score_fn=score_fn, T=2, device="cpu")
    third.fit(data, epochs=0, checkpoints_directory=directory, model_checkpoint=1, verbose=-1)
    for k, v in third.model.state_dict().items():
        assert torch.equal(v, first[k]), k
    with pytest.raises(ValueError, match="model_checkpoint=7"):
        third.fit(data, epochs=0, checkpoints_directory=directory, model_checkpoint=7, verbose=-1)


def test_retention_keeps_models_to_keep_pairs(tmp_path):
    directory = str(tmp_path / "run")
    trainer = rim_fast.RIM(D, rim_fast.Hourglass(1, dimensions=1, nf=4), score_fn=score_fn, T=2, device="cpu")
    trainer.fit(_data()[2], epochs=5, batch_size=4, checkpoints_directory=directory, checkpoints=1,
                models_to_keep=2, verbose=-1)
    found = ckpt.list_checkpoints(directory)
    assert [f.index for f in found] == [4, 5]
    assert all(f.optimizer is not None for f in found)
    assert len([n for n in os.listdir(directory) if n.endswith(".pt")]) == 4


def test_logdir_is_created(tmp_path):
    logdir = str(tmp_path / "does" / "not" / "exist")
    trainer = rim_fast.RIM(D, rim_fast.Hourglass(1, dimensions=1, nf=4), score_fn=score_fn, T=2, device="cpu")
    trainer.fit(_data()[2], epochs=1, batch_size=4, logdir=logdir, logname="run", verbose=-1)
    assert len(ckpt.list_checkpoints(os.path.join(logdir, "run"))) == 1


def test_patience_resets_after_improvement(tmp_path):
    """torch_rim never reset patience (bug 13); rim_fast stops after `patience` epochs without improvement."""
    trainer = rim_fast.RIM(D, rim_fast.Hourglass(1, dimensions=1, nf=4), score_fn=score_fn, T=2, device="cpu")
    # a zero learning rate cannot be given; a tiny one keeps the loss flat, so it stops after `patience` epochs
    losses = trainer.fit(_data()[2], epochs=50, batch_size=4, learning_rate=1e-30, patience=3, tolerance=0.5,
                         verbose=-1)
    assert len(losses) == 4  # first epoch improves on inf, then 3 epochs without improvement


def test_n_iterations_in_epoch_average():
    """Epoch cost is the mean over the iterations run (torch_rim divided by len(dataloader), bug 14)."""
    trainer = rim_fast.RIM(D, rim_fast.Hourglass(1, dimensions=1, nf=4), score_fn=score_fn, T=2, device="cpu")
    y, x, data = _data(n=2)
    expected = trainer.loss_fn(y, x).item()
    losses = trainer.fit(data, epochs=1, batch_size=2, learning_rate=1e-30, n_iterations_in_epoch=5, verbose=-1)
    assert losses[0] == pytest.approx(expected, rel=1e-5)


def test_corrupt_latest_checkpoint_falls_back(tmp_path):
    directory = str(tmp_path / "run")
    trainer = rim_fast.RIM(D, rim_fast.Hourglass(1, dimensions=1, nf=4), score_fn=score_fn, T=2, device="cpu")
    trainer.fit(_data()[2], epochs=2, batch_size=4, checkpoints_directory=directory, checkpoints=1, verbose=-1)
    found = ckpt.list_checkpoints(directory)
    good = torch.load(found[0].model)
    with open(found[1].model, "wb") as f:
        f.write(b"truncated")
    with pytest.warns(RuntimeWarning, match=re.escape(os.path.basename(found[1].model))):
        loaded = rim_fast.RIM(D, checkpoints_directory=directory, score_fn=score_fn, T=2, device="cpu")
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, good[k])


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint_1.0000e+00_001.pt")
    ckpt.atomic_save({"a": torch.ones(2)}, path)

    def boom(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        ckpt.atomic_save({"a": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path)["a"], torch.ones(2))
    assert os.listdir(tmp_path) == [os.path.basename(path)]


def test_checkpoint_name_of_non_finite_cost_parses():
    name = ckpt.checkpoint_name("checkpoint", float("inf"), 7)
    assert ckpt._parse(name)[0] == 7
