"""fit's loggers: the callback protocol (what a logger sees, in which order), the CSV logger (default, resume
rewind, atomic), the TensorBoard logger (read back with tensorboard's EventAccumulator), names and objects, a
logger that raises, and the ImportError without the tensorboard package."""
import csv
import logging
import os
import sys

import pytest
import torch

import rim_fast
from rim_fast import loggers as L

D = (16,)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small CPU trainings


def _data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, *D, generator=g)
    return torch.utils.data.TensorDataset(0.8 * x + 0.1 * torch.randn(n, 1, *D, generator=g), x)


def _rim(seed=0):
    torch.manual_seed(seed)
    return rim_fast.RIM(D, rim_fast.Hourglass(1, dimensions=1, nf=4, hidden_units=6), score_fn=lambda x, y: y - 0.8 * x,
                        T=2, device="cpu")


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class Recorder(L.Logger):
    def __init__(self):
        self.calls = []

    def setup(self, directory, start_epoch, config):
        self.calls.append(("setup", start_epoch, config.monitored))

    def on_checkpoint(self, state, files):
        self.calls.append(("checkpoint", state.epoch, files.index))

    def on_epoch_end(self, state):
        self.calls.append(("epoch", state.epoch, state.step, state.checkpoint, sorted(state.metrics)))

    def on_train_end(self, state):
        self.calls.append(("end", state.epoch if state else None))


def test_protocol_order_and_state(tmp_path):
    rec = Recorder()
    directory = str(tmp_path / "run")
    _rim().fit(_data(), epochs=3, batch_size=4, checkpoints=2, checkpoints_directory=directory, loggers=[rec, "csv"],
               val_dataset=_data(4, seed=1), val_every=2, verbose=-1)
    base = ["epoch_seconds", "learning_rate", "steps_per_second", "train_loss"]
    val = sorted(base + ["val_loss", "val_mse", "val_nmse", "val_psnr", "val_ssim"])
    assert rec.calls == [("setup", 0, "train_loss"),
                         ("epoch", 1, 2, None, base),
                         ("checkpoint", 2, 1), ("epoch", 2, 4, 1, val),
                         ("checkpoint", 3, 2), ("epoch", 3, 6, 2, val),  # the last epoch validates and saves
                         ("end", 3)]
    rows = _rows(os.path.join(directory, "metrics.csv"))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and [r["checkpoint"] for r in rows] == ["", "1", "2"]
    assert rows[0]["val_psnr"] == "" and float(rows[1]["val_psnr"]) > 0


def test_csv_is_the_default_and_a_resume_rewinds_it(tmp_path):
    directory = str(tmp_path / "run")
    data = _data()
    _rim().fit(data, epochs=3, batch_size=4, checkpoints=2, checkpoints_directory=directory, loss_curve=False,
               verbose=-1)
    path = os.path.join(directory, "metrics.csv")
    assert [r["epoch"] for r in _rows(path)] == ["1", "2", "3"]
    # the last save was epoch 3; pretend the run died after logging epoch 4 but before saving it
    with open(path, "a") as f:
        f.write("4,8,1.0" + "," * (len(L.CSVLogger.COLUMNS) - 3) + "\n")
    torch.manual_seed(5)
    losses = _rim(seed=3).fit(data, epochs=2, batch_size=4, checkpoints_directory=directory, loss_curve=False,
                              verbose=-1)
    rows = _rows(path)
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4", "5"]
    assert [float(r["train_loss"]) for r in rows[3:]] == losses
    assert not [n for n in os.listdir(directory) if n.startswith(".tmp_")]
    # no directory: no default logger, and the names need one
    assert L.resolve(None, None) == []
    with pytest.raises(ValueError, match=r"loggers: 'csv' writes into the checkpoints directory"):
        _rim().fit(data, epochs=1, loggers=["csv"], verbose=-1)
    with pytest.raises(ValueError, match=r"loggers: unknown logger 'wandb'"):
        _rim().fit(data, epochs=1, loggers="wandb", verbose=-1)
    with pytest.raises(TypeError, match=r"loggers: int is not a logger"):
        _rim().fit(data, epochs=1, loggers=[3], verbose=-1)
    own = tmp_path / "own.csv"
    _rim().fit(data, epochs=2, batch_size=4, loggers=[L.CSVLogger(own)], verbose=-1)
    assert [r["epoch"] for r in _rows(own)] == ["1", "2"]


class Broken(L.Logger):
    def __init__(self):
        self.calls = 0

    def on_epoch_end(self, state):
        self.calls += 1
        raise OSError("disk full")


def test_a_logger_that_raises_is_reported_once_and_the_run_continues(tmp_path, caplog):
    broken = Broken()
    with caplog.at_level(logging.INFO, logger="rim_fast"):
        losses = _rim().fit(_data(), epochs=3, batch_size=4, checkpoints_directory=str(tmp_path / "run"),
                            loggers=[broken, "csv"], verbose=-1)
    assert len(losses) == 3 and broken.calls == 3
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "loggers: Broken.on_epoch_end raised OSError: disk full" in errors[0].getMessage()
    assert len(_rows(str(tmp_path / "run" / "metrics.csv"))) == 3  # the other logger went on


def test_tensorboard_scalars_and_images(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    directory = str(tmp_path / "run")
    logger = L.TensorBoardLogger(images=2)
    images = {"observation": torch.rand(3, 1, 12, 12), "estimate": torch.rand(3, 1, 12, 12),
              "target": torch.rand(3, 1, 12, 12)}
    logger.setup(directory, 0, None)
    for epoch in (1, 2):
        logger.on_epoch_end(L.RunState(epoch=epoch, step=2 * epoch, train_loss=1.0 / epoch, learning_rate=1e-3,
                                       steps_per_second=5.0, epoch_seconds=0.4, val={"val_psnr": 20.0 + epoch},
                                       images=images if epoch == 2 else None))
    logger.on_train_end(None)
    events = EventAccumulator(os.path.join(directory, "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("val/psnr")] == [(1, 21.0), (2, 22.0)]
    assert [e.value for e in events.Scalars("train/loss")] == [1.0, 0.5]
    assert set(events.Tags()["images"]) == {"val/observation", "val/estimate", "val/target"}
    assert events.Images("val/estimate")[0].step == 2


def test_tensorboard_without_the_package_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    directory = str(tmp_path / "run")
    with pytest.raises(ImportError, match=r"pip install 'rim_fast\[tensorboard\]'"):
        _rim().fit(_data(), epochs=1, checkpoints_directory=directory, loggers=["tensorboard"], verbose=-1)
    assert not os.path.exists(directory)  # raised before anything was written
