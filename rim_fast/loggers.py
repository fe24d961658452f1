"""Loggers of ``fit``: a callback protocol and the built-in CSV and TensorBoard loggers.

A logger is any object with some of these methods (``Logger`` is a base class with all of them as no-ops); fit
calls them on rank 0 only:

- ``setup(directory, start_epoch, config)``: before the first epoch; ``directory`` is the checkpoints directory
  (or None), ``start_epoch`` the epochs already done (a resumed run), ``config`` the run's ``FitConfig``;
- ``on_checkpoint(state, files)``: a checkpoint was saved (``files``: ``rim_fast.checkpoints.CheckpointFiles``);
- ``on_epoch_end(state)``: after each epoch (after its validation and checkpoint);
- ``on_train_end(state)``: when fit returns (``state`` is the last epoch's, None when no epoch ran).

``state`` is a ``RunState``: the epoch, the optimizer step, the losses and metrics, the learning rate, steps/s,
the peak GPU memory, the monitored value, and (2D data, validation epochs) a few validation images. A logger's
first error is reported through ``logging.getLogger("rim_fast")`` (its later ones are not) and the run continues.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from . import checkpoints as ckpt

_log = logging.getLogger("rim_fast")

__all__ = ["Logger", "RunState", "CSVLogger", "TensorBoardLogger", "resolve", "LOGGERS"]

_HOOKS = ("setup", "on_epoch_end", "on_checkpoint", "on_train_end")


@dataclass
class RunState:
    """The state of a run at the end of an epoch, as loggers see it.

    ``metrics`` holds every scalar of the epoch by name: ``train_loss``, ``learning_rate``, ``steps_per_second``,
    ``epoch_seconds``, ``peak_gpu_memory_mb`` (CUDA only), and on validation epochs ``val_loss``, ``val_mse``,
    ``val_nmse``, ``val_psnr``, ``val_ssim`` (when the spatial sizes fit SSIM's window)."""
    epoch: int
    step: int
    train_loss: float
    learning_rate: float
    steps_per_second: float
    epoch_seconds: float
    peak_gpu_memory: Optional[int] = None
    val: dict = field(default_factory=dict)
    monitor: str = "train_loss"
    monitor_value: Optional[float] = None
    best: Optional[float] = None
    is_best: bool = False
    checkpoint: Optional[int] = None
    directory: Optional[str] = None
    logname: str = ""
    images: Optional[dict] = None

    @property
    def metrics(self) -> dict:
        out = {"train_loss": self.train_loss, "learning_rate": self.learning_rate,
               "steps_per_second": self.steps_per_second, "epoch_seconds": self.epoch_seconds}
        if self.peak_gpu_memory is not None:
            out["peak_gpu_memory_mb"] = self.peak_gpu_memory / 2 ** 20
        out.update(self.val)
        return out


class Logger:
    """Base class of fit's loggers: every hook is a no-op; override those you need."""

    def setup(self, directory: Optional[str], start_epoch: int, config: Any) -> None:
        pass

    def on_epoch_end(self, state: RunState) -> None:
        pass

    def on_checkpoint(self, state: RunState, files: ckpt.CheckpointFiles) -> None:
        pass

    def on_train_end(self, state: Optional[RunState]) -> None:
        pass


class CSVLogger(Logger):
    """One row per epoch in ``path`` (default ``metrics.csv`` in the checkpoints directory): epoch, step, the
    metrics, the checkpoint index saved at that epoch, the wall time. A resumed run first drops the rows after its
    checkpoint's epoch (an interrupted run logged epochs it did not save). The file is rewritten atomically at each
    epoch: a reader never sees half a row."""

    COLUMNS = ("epoch", "step", "train_loss", "val_loss", "val_mse", "val_nmse", "val_psnr", "val_ssim",
               "learning_rate", "steps_per_second", "epoch_seconds", "peak_gpu_memory_mb", "checkpoint", "time")

    def __init__(self, path: Optional[str] = None):
        self.path = None if path is None else os.fspath(path)
        self.rows: list = []
        self.columns = list(self.COLUMNS)

    @property
    def needs_directory(self) -> bool:
        return self.path is None

    def setup(self, directory, start_epoch, config):
        if self.path is None:
            if directory is None:
                raise ValueError("loggers: CSVLogger() without a path writes metrics.csv into the checkpoints "
                                 "directory; pass checkpoints_directory (or logdir), or CSVLogger(path)")
            self.path = os.path.join(directory, "metrics.csv")
        self.rows = []
        if os.path.exists(self.path):
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                for name in reader.fieldnames or ():
                    if name not in self.columns:
                        self.columns.append(name)
                self.rows = [r for r in reader if r.get("epoch", "").isdigit() and int(r["epoch"]) <= start_epoch]
            self._write()

    def on_epoch_end(self, state):
        row = {"epoch": state.epoch, "step": state.step, "time": f"{time.time():.3f}"}
        row.update({k: _text(v) for k, v in state.metrics.items()})
        if state.checkpoint is not None:
            row["checkpoint"] = state.checkpoint
        for name in row:
            if name not in self.columns:
                self.columns.append(name)
        self.rows.append(row)
        self._write()

    def _write(self):
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        data = buffer.getvalue().encode()
        ckpt.atomic_write_bytes(lambda f: f.write(data), self.path)


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _require_tensorboard():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError("the TensorBoard logger needs the tensorboard package: pip install "
                          "'rim_fast[tensorboard]' (or pip install tensorboard)") from e
    return SummaryWriter


class TensorBoardLogger(Logger):
    """TensorBoard event files in ``log_dir`` (default ``tensorboard/`` in the checkpoints directory): every
    metric as a scalar at the epoch (``train/loss``, ``val/psnr``, ``learning_rate``, ...) and, for 2D data,
    ``images`` validation samples (observation, estimate, target; scaled to [0, 1] with the target's range) at
    each validation epoch. A resumed run purges the events after its checkpoint's epoch. Needs the ``tensorboard``
    package (the ``rim_fast[tensorboard]`` extra)."""

    def __init__(self, log_dir: Optional[str] = None, images: int = 4):
        self._writer_class = _require_tensorboard()
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.images = images
        self.writer = None

    @property
    def needs_directory(self) -> bool:
        return self.log_dir is None

    def setup(self, directory, start_epoch, config):
        if self.log_dir is None:
            if directory is None:
                raise ValueError("loggers: TensorBoardLogger() without a log_dir writes into the checkpoints "
                                 "directory; pass checkpoints_directory (or logdir), or TensorBoardLogger(log_dir)")
            self.log_dir = os.path.join(directory, "tensorboard")
        self.writer = self._writer_class(log_dir=self.log_dir, purge_step=start_epoch + 1 if start_epoch else None)

    def on_epoch_end(self, state):
        for name, value in state.metrics.items():
            if value is not None:
                tag = name.replace("_", "/", 1) if name.startswith(("train_", "val_")) else name
                self.writer.add_scalar(tag, value, state.epoch)
        if state.images and self.images:
            for name, images in _display_images(state.images, self.images).items():
                self.writer.add_images(f"val/{name}", images, state.epoch, dataformats="NCHW")
        self.writer.flush()

    def on_train_end(self, state):
        if self.writer is not None:
            self.writer.close()


def _display_images(images: dict, n: int) -> dict:
    """observation, estimate and target [N, C, H, W] as [n, 1 or 3, H, W] in [0, 1] (the target's range per
    sample; the observation's own when its shape differs)."""
    target = images["target"][:n].float()
    lo = target.flatten(1).amin(1).view(-1, 1, 1, 1)
    hi = target.flatten(1).amax(1).view(-1, 1, 1, 1)
    out = {}
    for name in ("observation", "estimate", "target"):
        x = images.get(name)
        if x is None or x.dim() != 4 or x.is_complex():
            continue
        x = x[:n].float()
        x = x[:, :3] if x.shape[1] >= 3 else x[:, :1]
        if x.shape[1] == 2:
            x = x[:, :1]
        if x.shape[2:] == target.shape[2:]:
            a, b = lo, hi
        else:
            a, b = x.flatten(1).amin(1).view(-1, 1, 1, 1), x.flatten(1).amax(1).view(-1, 1, 1, 1)
        out[name] = ((x - a) / (b - a).clamp_min(1e-12)).clamp(0, 1)
    return out


LOGGERS = {"csv": CSVLogger, "tensorboard": TensorBoardLogger}


def resolve(spec, directory: Optional[str]) -> list:
    """The logger objects of ``fit(loggers=spec)``: None -> a CSV logger when there is a checkpoints directory;
    a name ("csv", "tensorboard"), a logger object, or a list of them. Names write into the directory, so they
    need one."""
    if spec is None:
        return [CSVLogger()] if directory is not None else []
    items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    out = []
    for item in items:
        if isinstance(item, str):
            name = item.lower()
            if name not in LOGGERS:
                raise ValueError(f"loggers: unknown logger {item!r}; the built-in ones are {tuple(LOGGERS)} (or "
                                 f"pass an object with on_epoch_end/on_checkpoint/on_train_end methods)")
            if directory is None:
                raise ValueError(f"loggers: {item!r} writes into the checkpoints directory; pass "
                                 f"checkpoints_directory (or logdir), or a logger object with its own path")
            out.append(LOGGERS[name]())
        elif any(callable(getattr(item, hook, None)) for hook in _HOOKS):
            if directory is None and getattr(item, "needs_directory", False):
                raise ValueError(f"loggers: {type(item).__name__}() without a path writes into the checkpoints "
                                 f"directory; pass checkpoints_directory (or logdir), or give it a path")
            out.append(item)
        else:
            raise TypeError(f"loggers: {type(item).__name__} is not a logger (a name in {tuple(LOGGERS)}, or an "
                            f"object with on_epoch_end/on_checkpoint/on_train_end methods)")
    return out


class Dispatch:
    """Calls every logger's hook; the first error of a logger is reported (logging, with its traceback), its later
    ones are not, and the run goes on (the logger keeps being called: a CSV file rewritten whole recovers from a
    passing disk error)."""

    def __init__(self, loggers: list, enabled: bool):
        self.loggers = loggers if enabled else []
        self.failed: set = set()

    def __call__(self, hook: str, *args) -> None:
        for logger in self.loggers:
            method = getattr(logger, hook, None)
            if method is None:
                continue
            try:
                method(*args)
            except Exception as e:  # noqa: BLE001 - a broken logger must not end a run of days
                if id(logger) in self.failed:
                    continue
                self.failed.add(id(logger))
                _log.error("loggers: %s.%s raised %s: %s; training continues (this logger's later errors are not "
                           "reported)", type(logger).__name__, hook, type(e).__name__, e, exc_info=True)

