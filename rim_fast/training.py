"""RIM.fit: torch_rim's training loop and checkpoint directory, made a production training path.

Kept from torch_rim 0.2.9: the arguments, Adam by default, the per-epoch scheduler step, the warm-up rule, the
directory layout and file names, EMA weights in the model files, ``epochs`` = the epochs this call runs.

Fixed (no trained model depends on them): resuming a given ``model_checkpoint`` works (torch_rim's resume
crashed); optimizer files are paired with model files by index (torch_rim indexed two unordered globs with a
bool); batches are moved to the RIM's device; patience resets after an improvement (torch_rim counted every
non-improving epoch); per-epoch averages divide by the iterations actually run; ``logdir`` is created when
missing; retention keeps ``models_to_keep`` checkpoints whatever their names (a non-finite cost still gives a
parseable name); no device sync per step (the loss is summed on the device and read once per epoch, and about
once a second for the progress bar); every file is written atomically.

Added: exact resume (a ``trainstate_*.pth`` per checkpoint, see ``rim_fast.checkpoints``), your own DataLoader or
fit's with workers and pinned memory (``rim_fast.data``), validation with imaging metrics (``rim_fast.metrics``)
and a ``monitor`` that drives patience and keeps the best checkpoints, loggers (``rim_fast.loggers``: CSV,
TensorBoard, your own), ``precision`` "bf16-mixed" and "16-mixed", any ``optimizer``, ``max_epochs``, ``on_nan``,
``check_finite``, ``gradient_checkpointing``, ``accumulate_grad_batches``, loss weights ``w`` and
``time_weights``, torch.distributed under torchrun or SLURM (``rim_fast.distributed``), a progress bar with the
running loss and steps/s, and a loss-curve PNG in the checkpoints directory.

The arguments are validated once into a ``FitConfig`` (``rim_fast.fit_config``) that the phases of training
read: ``_prepare`` (optimizer, scheduler, EMA, scaler), ``_open_directory`` and ``_resume`` (the checkpoints
directory), ``_loaders``, ``_train_epoch`` with ``train_step`` (one batch: forward, backward and, at the end of an
accumulation window, the optimizer step with its warm-up, clipping, EMA and scaler updates), ``_validate``,
``_monitor``, ``_checkpoint`` and ``_end``.

Distributed training: run the script under ``torchrun --nproc_per_node N`` or ``srun`` (fit initialises the process
group from torchrun's or SLURM's environment when none is, and leaves it up for later calls: destroy it yourself if
needed), or initialise a process group yourself. Each process then trains on its own shard
(``DistributedSampler``), ``batch_size`` is per process, the RIM is wrapped in ``DistributedDataParallel``, losses
and validation metrics are averaged over processes, and rank 0 alone writes the checkpoints directory (which all
ranks must see: a shared filesystem on several machines) and logs, while the others wait at a barrier. The RIM loss
is a per-process batch mean and DDP averages gradients over processes, so N processes at batch B take the same
steps as one process at batch N*B over the same samples, as long as every process gets full batches (len(dataset)
divisible by N*B; otherwise DistributedSampler repeats samples to even the shards and the last batch is smaller).
A RIM left on its default device moves to ``cuda:LOCAL_RANK`` in each process.

Your own loop instead of ``fit``: wrap the RIM itself, ``ddp = DistributedDataParallel(rim)``, and compute the
loss through DDP's forward: ``loss = ddp(y, *args, x_true=x_true)`` (RIM.forward returns ``loss_fn``'s value when
``x_true`` is given), or ``trajectory = ddp(y, *args)`` for a loss of your own. Calling
``ddp.module.loss_fn`` skips DDP's forward, and its gradients would not be averaged across processes.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Optional

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoints as ckpt
from . import data as fit_data
from . import distributed
from . import fit_graph
from . import loggers as fit_loggers
from . import metrics as fit_metrics
from .fit_config import FitConfig, ON_NAN, PRECISIONS
from .utils import NullEMA
from .validation import warn

__all__ = ["fit", "train", "train_step", "FitConfig", "write_loss_curve", "PRECISIONS", "ON_NAN"]

_log = logging.getLogger("rim_fast")

TRAINSTATE_FORMAT = 1
_PROGRESS_INTERVAL_S = 1.0
# plotting costs ~0.1-0.5 s: at most one loss curve per interval, and one at the last save of a call
_CURVE_INTERVAL_S = 60.0
#: validation samples handed to loggers as images (2D data)
_IMAGES = 4


def fit(rim, dataset, epochs=100, learning_rate=1e-4, scheduler=None, batch_size=1, shuffle=False,
        patience=float("inf"), tolerance=0, max_time=float("inf"), warmup=0, clip=0., checkpoints_directory=None,
        model_checkpoint=None, checkpoints=10, models_to_keep=3, ema_decay=0, seed=None, logname=None,
        logdir=None, n_iterations_in_epoch=None, logname_prefix="rim", verbose=0, compile=False, *,
        max_epochs: Optional[int] = None, precision="32", gradient_checkpointing: Optional[bool] = None,
        accumulate_grad_batches: int = 1, on_nan: str = "stop", check_finite=None, w=None, time_weights=None,
        loss_curve: bool = True, ddp_kwargs: Optional[dict] = None, optimizer=None, num_workers: int = 0,
        pin_memory: Optional[bool] = None, persistent_workers: bool = False, prefetch_factor: Optional[int] = None,
        collate_fn=None, drop_last: bool = False, multiprocessing_context=None, val_dataset=None, val_every: int = 1,
        val_batch_size: Optional[int] = None, data_range: Optional[float] = None, monitor: Optional[str] = None,
        loggers=None, cuda_graphs: bool = False):
    """Train ``rim.model`` on (y, x_true, *args) batches; returns the list of this call's epoch losses.

    ``dataset``: a map-style Dataset of (y, x_true, *args) tuples (fit builds the DataLoader), or a DataLoader of
    yours (under DDP it must carry a DistributedSampler; fit calls ``set_epoch`` each epoch).

    Arguments as torch_rim's RIM.fit: ``scheduler`` is a callable optimizer -> scheduler (stepped per epoch),
    ``warmup`` linear learning-rate warm-up steps, ``clip`` gradient-norm clipping, ``checkpoints`` the epoch
    interval between saves, ``max_time`` in hours, ``ema_decay`` > 0 saves EMA weights. With
    ``checkpoints_directory`` (or ``logdir``/``logname``) training resumes from its latest checkpoint, or from
    ``model_checkpoint`` (an index), exactly where it stopped: weights, optimizer, scheduler, EMA, scaler, epoch and
    step counters, patience, and the RNG states, so an interrupted run continues with the same losses.
    ``compile=True`` compiles the RIM loop (forward and backward) first; ``verbose=-1`` silences the
    progress bar and the information messages (``logging.getLogger("rim_fast")``; printed when the application
    has not configured logging). ``seed`` seeds a fresh start; a resumed run restores the checkpoint's RNG states
    (and, distributed, its shuffling seed) instead, so that it continues the interrupted run exactly.

    rim_fast's keyword-only arguments:

    - ``max_epochs``: total epochs over all resumed runs (counted from the checkpoint); replaces ``epochs``, so
      re-running the same command after a crash finishes the same training.
    - ``precision``: ``"32"``, ``"bf16-mixed"`` (the network under ``torch.autocast(bfloat16)``; x, h, the
      score, the loss and the weights stay float32) or ``"16-mixed"`` (float16 autocast with a GradScaler, for
      GPUs without bfloat16; the scaler's step costs one host sync per optimizer step).
    - ``gradient_checkpointing``: recompute each step's network in backward (memory flat in T); None keeps the
      RIM's setting.
    - ``accumulate_grad_batches``: one optimizer step per k batches, on the mean of their losses (= one batch of
      k * batch_size); the warm-up counts optimizer steps.
    - ``on_nan``: a non-finite epoch loss ``"stop"``s training without saving, reloading the last checkpoint's
      weights when there is one; ``"skip"`` drops each step whose loss is non-finite (one host sync per step).
    - ``check_finite``: NaN/inf in a batch's y or x_true raises (True/"error") or warns ("warn"); the default
      None checks batches that arrive on the CPU (before the copy to the device: no device sync); False never.
    - ``w``: per-pixel loss weights, a tensor broadcastable to x or a callable (y, x_true, *args) -> tensor;
      ``time_weights``: one loss weight per step (see ``RIM.loss_fn``).
    - ``loss_curve``: write ``loss_curve.png`` (all epochs, resumed runs included) to the checkpoints directory
      at a save, at most once a minute and at the last save of the call (needs matplotlib).
    - ``ddp_kwargs``: extra arguments of DistributedDataParallel (e.g. ``find_unused_parameters=True``).
    - ``optimizer``: None (torch_rim's Adam at ``learning_rate``), an optimizer class (built with
      ``lr=learning_rate``) or a callable params -> optimizer (which sets its own learning rate). The warm-up
      scales each parameter group's initial learning rate.
    - ``cuda_graphs``: on CUDA, every full batch's training step replayed from one CUDA graph (a partial last batch
      runs eagerly, or ``drop_last=True``); ``rim_fast.fit_graph`` says what else runs eagerly, with one warning.
    - ``num_workers``, ``pin_memory`` (None: on for CUDA), ``persistent_workers``, ``prefetch_factor``, ``collate_fn``,
      ``drop_last``, ``multiprocessing_context`` (README: DDP): the DataLoader fit builds (also for ``val_dataset``).
    - ``val_dataset`` (a Dataset or a DataLoader) and ``val_every`` (epochs; the last epoch validates too):
      ``predict`` without autograd (EMA weights when EMA is on) and ``val_loss``, ``val_mse``, ``val_nmse``,
      ``val_psnr``, ``val_ssim`` of the estimate in physical space against x_true (``rim_fast.metrics``),
      averaged over the samples (each once, under DDP too); ``val_batch_size`` (default ``batch_size``);
      ``data_range`` for PSNR and SSIM (None: each target's max - min).
    - ``monitor``: None (the training loss drives patience; ``models_to_keep`` keeps the newest checkpoints, as
      torch_rim), or one of "train_loss", "val_loss", "val_mse", "val_nmse", "val_psnr", "val_ssim": it drives
      patience (counted in validations) and ``models_to_keep`` keeps the best checkpoints by it, plus the latest
      for resuming. ``rim_fast.checkpoints.best_checkpoint(directory, monitor)`` finds the best.
    - ``loggers``: a list of logger names ("csv", "tensorboard") or objects (``rim_fast.loggers``); None: a CSV
      logger (``metrics.csv``) when there is a checkpoints directory. Rank 0 logs.

    The module docstring describes distributed training."""
    config = FitConfig(
        epochs=epochs, learning_rate=learning_rate, scheduler=scheduler, batch_size=batch_size, shuffle=shuffle,
        patience=patience, tolerance=tolerance, max_time=max_time, warmup=warmup, clip=clip,
        checkpoints_directory=checkpoints_directory, model_checkpoint=model_checkpoint, checkpoints=checkpoints,
        models_to_keep=models_to_keep, ema_decay=ema_decay, seed=seed, logname=logname, logdir=logdir,
        n_iterations_in_epoch=n_iterations_in_epoch, logname_prefix=logname_prefix, verbose=verbose, compile=compile,
        max_epochs=max_epochs, precision=precision, gradient_checkpointing=gradient_checkpointing,
        accumulate_grad_batches=accumulate_grad_batches, on_nan=on_nan, check_finite=check_finite, w=w,
        time_weights=time_weights, loss_curve=loss_curve, ddp_kwargs=ddp_kwargs, optimizer=optimizer,
        num_workers=num_workers, pin_memory=pin_memory, persistent_workers=persistent_workers, drop_last=drop_last,
        prefetch_factor=prefetch_factor, collate_fn=collate_fn, multiprocessing_context=multiprocessing_context,
        val_every=val_every, val_batch_size=val_batch_size, data_range=data_range, monitor=monitor, loggers=loggers,
        cuda_graphs=cuda_graphs)
    return train(rim, dataset, config, val_dataset)


def _check_precision(precision: str, device: torch.device) -> None:
    """bfloat16 needs a GPU that computes in it (compute capability 8.0 on: A100, H100, ...); on older ones torch
    emulates it (``torch.cuda.is_bf16_supported()`` says yes), far slower than float32."""
    if precision != "bf16-mixed" or device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 0):
        raise ValueError(f"precision='bf16-mixed' needs a GPU that computes in bfloat16 (compute capability 8.0 or "
                         f"later); {device} has {major}.{minor}, where it is emulated (precision='16-mixed' runs "
                         f"float16 with a GradScaler)")


def train(rim, dataset, config: FitConfig, val_dataset=None) -> list:
    """``fit`` with its arguments as a ``FitConfig``: returns the list of this call's epoch losses."""
    _check_inputs(rim, dataset, config, val_dataset)
    directory, logname = _directory_name(config)
    loggers = fit_loggers.resolve(config.loggers, directory)
    device = rim.device
    _check_precision(config.precision, device)
    with _messages():
        group = distributed.setup(rim)
        previous_checkpointing = rim.gradient_checkpointing
        if config.gradient_checkpointing is not None:
            rim.gradient_checkpointing = config.gradient_checkpointing
        try:
            run = _prepare(rim, config, group)
            # a logname made of the time differs between processes: rank 0's names the directory
            run.logname = group.broadcast(logname)
            run.directory = directory
            if config.checkpoints_directory is None and config.logdir is not None:
                run.directory = os.path.join(os.fspath(config.logdir), run.logname)
            run.loggers = fit_loggers.Dispatch(loggers, enabled=group.main)
            if run.directory is not None:
                _open_directory(run)
                _resume(run)
            _loaders(run, dataset, val_dataset)
            _wrap(run)
            return _train(run)
        finally:
            rim.gradient_checkpointing = previous_checkpointing


def _check_inputs(rim, dataset, config: FitConfig, val_dataset) -> None:
    """What can be checked before anything runs or is written: the data against the RIM and the monitor."""
    if not fit_data.is_loader(dataset):
        fit_data.check_length(dataset, "dataset")
    if val_dataset is not None:
        if not fit_data.is_loader(val_dataset):
            fit_data.check_length(val_dataset, "val_dataset")
        fit_data.check_val_items(val_dataset, dataset, rim)
    if config.validates and val_dataset is None:
        raise ValueError(f"monitor={config.monitor!r} follows a validation metric: pass val_dataset")
    if config.monitored == "val_ssim" and min(rim.dimensions) < fit_metrics.ssim_window():
        raise ValueError(f"monitor='val_ssim': SSIM's Gaussian window needs spatial sizes >= "
                         f"{fit_metrics.ssim_window()}, the RIM's are {tuple(rim.dimensions)}")


def _directory_name(config: FitConfig) -> tuple:
    """(checkpoints directory or None, logname), without touching the filesystem."""
    if config.checkpoints_directory is not None:
        directory = os.fspath(config.checkpoints_directory)
        return directory, os.path.split(os.path.normpath(directory))[-1]
    logname = config.logname or config.logname_prefix + "_" + datetime.now().strftime("%y%m%d%H%M%S")
    if config.logdir is not None:
        return os.path.join(os.fspath(config.logdir), logname), logname
    return None, logname


# ---- helpers kept from the single-function fit ---------------------------------------------------------------

def _rng_state(device: torch.device) -> dict:
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}
    if device.type == "cuda" and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _own_streams(rank: int) -> None:
    """Under DDP every process would draw the same random numbers (the same ``seed``, or torch's fixed default one):
    the same augmentation of its own samples, the same dropout masks, its DataLoader workers the same seeds. Rank
    r > 0 reseeds torch (CPU and CUDA), numpy and random from a number drawn from its current stream and r; rank 0
    keeps its stream (so one process runs as before)."""
    if rank == 0:
        return
    draw = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64))
    words = [int(w) for w in np.random.SeedSequence([draw, rank]).generate_state(4)]
    torch.manual_seed(words[0] << 32 | words[1])
    np.random.seed(words[2])
    random.seed(words[3])


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    # the training state is loaded onto the run's device (map_location): the generators' states come back here
    np.random.set_state(("MT19937", n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def write_loss_curve(path: str, losses: list, title: str = "") -> bool:
    """Plot the epoch losses to a PNG (written atomically). Returns False when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    epochs = np.arange(1, len(losses) + 1)
    values = np.asarray(losses, dtype=float)
    ax.plot(epochs, values, marker="o" if len(losses) < 30 else None, ms=3)
    if np.all(values[np.isfinite(values)] > 0) and np.isfinite(values).any():
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    ckpt.atomic_write_bytes(lambda f: fig.savefig(f, format="png"), path)
    return True


class _Progress:
    """tqdm over the optimizer's batches: running loss and steps/s; reads the loss (a sync) about once a second."""

    def __init__(self, total: int, disable: bool, desc: str):
        self.bar = tqdm(total=total, disable=disable, unit="step", desc=desc, dynamic_ncols=True)
        self.disable = disable
        self.last = time.monotonic()

    def step(self, epoch: int, cost_sum: torch.Tensor, count):
        self.bar.update(1)
        if self.disable:
            return
        now = time.monotonic()
        if now - self.last >= _PROGRESS_INTERVAL_S:
            self.last = now
            running = float(cost_sum) / max(float(count), 1.0)
            self.bar.set_postfix_str(f"epoch={epoch + 1} loss={running:.3e}", refresh=False)

    def epoch_end(self, epoch: int, cost: float):
        self.bar.set_description(f"Epoch {epoch + 1:d} | Cost: {cost:.1e} |")

    def close(self):
        self.bar.close()


class _TqdmHandler(logging.Handler):
    def emit(self, record):
        try:
            tqdm.write(self.format(record))
        except Exception:  # noqa: BLE001 - logging's own contract
            self.handleError(record)


@contextlib.contextmanager
def _messages():
    """Information messages printed (through tqdm, beside the progress bar) for the call when the application has
    not configured logging; its own handlers otherwise."""
    logger = logging.getLogger("rim_fast")
    if logger.handlers or logging.getLogger().handlers:
        yield
        return
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _window_size(i: int, n: int, k: int) -> int:
    """Micro-batches in the accumulation window of batch i (of n per epoch, k per window; the last may be short)."""
    start = (i // k) * k
    return min(k, n - start)


def _load_candidate(files: ckpt.CheckpointFiles, device):
    """(model state, optimizer state or None, train state or None); RuntimeError naming the file on failure."""
    model_state = ckpt.load_file(files.model, map_location=device)
    # to the CPU: Optimizer.load_state_dict puts each tensor where its policy wants it (moments on the parameters'
    # device, a plain optimizer's step counter on the host; loaded onto a GPU, e.g. Adagrad's would cost a host
    # sync per parameter and step)
    opt_state = ckpt.load_file(files.optimizer, map_location="cpu") if files.optimizer else None
    train_state = ckpt.load_file(files.trainstate, map_location=device) if files.trainstate else None
    if train_state is not None and (not isinstance(train_state, dict)
                                    or train_state.get("format") != TRAINSTATE_FORMAT):
        raise RuntimeError(f"checkpoint file {files.trainstate!r} is not a rim_fast training state")
    return model_state, opt_state, train_state


# ---- the run and its phases ------------------------------------------------------------------------------------

@dataclass
class _Run:
    """The state of one fit call, shared by its phases."""
    config: FitConfig
    rim: Any
    group: distributed.Group
    device: torch.device
    optimizer: Any = None
    base_lrs: list = field(default_factory=list)
    scheduler: Any = None
    ema: Any = None
    scaler: Any = None
    net: Any = None
    autocast: Any = None
    w: Any = None
    time_weights: Any = None
    loggers: Any = None
    # fit(cuda_graphs=True): the recorder, then the recorded step (rim_fast.fit_graph)
    graph_recorder: Any = None
    graph: Any = None
    graph_lrs: list = field(default_factory=list)
    one_minus_decay: Any = None
    # data
    loader: Any = None
    sampler: Any = None
    pinned: bool = False
    n_iterations: int = 0
    val_loader: Any = None
    val_pinned: bool = False
    sampler_seed: Optional[int] = None
    # the checkpoints directory
    directory: Optional[str] = None
    logname: str = ""
    latest_good: Optional[ckpt.CheckpointFiles] = None
    next_index: int = 1
    # progress of training (all resumed runs together)
    start_epoch: int = 0
    end_epoch: int = 0
    step: int = 0
    best_loss: float = math.inf
    best: Optional[float] = None
    patience: float = math.inf
    history: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    # the epoch in progress, on the device
    cost_sum: Any = None
    n_good: Any = None
    window_ok: Any = None
    skipped: int = 0
    # what the end of the call needs
    global_start: float = 0.0
    nan_stop: bool = False
    last_state: Optional[fit_loggers.RunState] = None
    images: Optional[dict] = None
    curve_written: float = -math.inf
    curve_noted: bool = False

    @property
    def main(self) -> bool:
        return self.group.main


def _make_optimizer(rim, config: FitConfig, graphs: bool):
    """The optimizer of ``config``; for graphs (``graphs``), Adam and AdamW capturable with a tensor learning rate."""
    params = rim.model.parameters()
    cls = torch.optim.Adam if config.optimizer is None else config.optimizer
    if graphs and cls in fit_graph.CAPTURABLE:
        return fit_graph.capturable_optimizer(cls, params, config.learning_rate, rim.device)
    if config.optimizer is None:
        return torch.optim.Adam(params, lr=config.learning_rate)
    if isinstance(config.optimizer, type) and issubclass(config.optimizer, torch.optim.Optimizer):
        return config.optimizer(params, lr=config.learning_rate)
    optimizer = config.optimizer(params)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer: the callable must return a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if config.learning_rate != 1e-4:
        warn(f"learning_rate={config.learning_rate} is unused: the optimizer callable sets the learning rate "
             f"({optimizer.param_groups[0]['lr']})")
    return optimizer


def _prepare(rim, config: FitConfig, group: distributed.Group) -> _Run:
    """Optimizer, scheduler, EMA, gradient scaler, seed and (distributed) the shuffling seed."""
    run = _Run(config, rim, group, rim.device, patience=config.patience)
    if config.compile and rim.__dict__.get("_compiled_loop") is None:
        rim.compile()
    recorder, why = fit_graph.blocker(rim, config, group) if config.cuda_graphs else (None, None)
    run.optimizer = _make_optimizer(rim, config, graphs=recorder is not None)
    if recorder is not None:
        why = fit_graph.optimizer_blocker(run.optimizer)
    if why is not None:
        fit_graph.warn(why)
    run.graph_recorder = recorder if why is None else None
    # floats: a tensor learning rate changes in place
    run.base_lrs = [float(g["lr"]) for g in run.optimizer.param_groups]
    run.scheduler = (config.scheduler(run.optimizer) if config.scheduler is not None
                     else torch.optim.lr_scheduler.ConstantLR(run.optimizer, factor=1.))
    if config.ema_decay > 0:
        try:
            from torch_ema import ExponentialMovingAverage
        except ImportError as err:
            raise ImportError(f"ema_decay={config.ema_decay} needs the torch-ema package: pip install torch-ema (or "
                              f"pip install 'rim-fast[train]'); ema_decay=0 trains without it") from err
        run.ema = ExponentialMovingAverage(rim.model.parameters(), decay=config.ema_decay)
    else:
        run.ema = NullEMA()
    if config.precision == "16-mixed":
        run.scaler = torch.amp.GradScaler(run.device.type)
    if config.seed is not None:
        # before the DataLoader draws its first shuffle order
        torch.manual_seed(config.seed)
    if group.on:
        # every rank must shuffle with the same seed
        seed = config.seed if config.seed is not None else int(torch.randint(0, 2 ** 31 - 1, ()).item())
        run.sampler_seed = group.broadcast(seed)
        _own_streams(group.rank)
    run.best = math.inf if config.mode == "min" else -math.inf
    return run


def _open_directory(run: _Run) -> None:
    """Create the checkpoints directory (rank 0) with torch_rim's script_params.json and model_hparams.json; every
    rank raises rank 0's error, naming the argument that gave the directory."""
    config, directory = run.config, run.directory
    given = "checkpoints_directory" if config.checkpoints_directory is not None else "logdir"
    error = None
    if run.main:
        error = _make_directory(directory, given)
        if error is None:
            ckpt.remove_temporary_files(directory)
            script_params = os.path.join(directory, "script_params.json")
            if not os.path.exists(script_params):
                ckpt.atomic_write_json({
                    "learning_rate": config.learning_rate, "batch_size": config.batch_size,
                    "shuffle": config.shuffle, "epochs": config.epochs, "patience": config.patience,
                    "tolerance": config.tolerance, "max_time": config.max_time, "warmup": config.warmup,
                    "clip": config.clip, "checkpoint_directory": directory, "checkpoints": config.checkpoints,
                    "models_to_keep": config.models_to_keep, "ema_decay": config.ema_decay, "seed": config.seed,
                    "logname": run.logname, "logname_prefix": config.logname_prefix}, script_params)
            hparams_path = os.path.join(directory, "model_hparams.json")
            if not os.path.exists(hparams_path):
                ckpt.atomic_write_json(run.rim.hyperparameters, hparams_path)
    error = run.group.broadcast(error)
    if error is not None:
        raise ValueError(error)
    run.group.barrier()


def _make_directory(directory: str, given: str) -> Optional[str]:
    """None when ``directory`` exists (made if missing) and is writable, else the message of the error."""
    where = repr(directory) if given == "checkpoints_directory" else f"{directory!r} (logdir/logname)"
    if os.path.exists(directory) and not os.path.isdir(directory):
        return f"{given}: {where} exists and is not a directory"
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        return f"{given}: cannot create {where}: {e}"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"{given}: {where} is not writable"
    return None


def _resume(run: _Run) -> None:
    """Load the latest readable checkpoint (or ``model_checkpoint``) into the RIM and the optimizer, and restore
    the training state it carries."""
    config, directory = run.config, run.directory
    found = ckpt.list_checkpoints(directory)
    if config.model_checkpoint is not None:
        candidates = [f for f in found if f.index == config.model_checkpoint]
        if not candidates:
            raise ValueError(f"model_checkpoint={config.model_checkpoint!r} not found in {directory!r}; "
                             f"available: {[f.index for f in found]}")
    else:
        candidates = list(reversed(found))
    train_state = None
    for files in candidates:
        try:
            model_state, opt_state, train_state = _load_candidate(files, run.device)
        except RuntimeError as e:
            if config.model_checkpoint is not None:
                raise
            warn(f"{e}; trying the previous checkpoint")
            continue
        _check_optimizer_kind(run, files, train_state)
        try:
            run.rim.model.load_state_dict(train_state["model"] if train_state and "model" in train_state
                                          else model_state)
            if opt_state is not None:
                form = fit_graph.optimizer_form(run.optimizer)
                run.optimizer.load_state_dict(opt_state)
                fit_graph.restore_optimizer_form(run.optimizer, form)
        except (RuntimeError, ValueError, KeyError) as e:
            raise RuntimeError(f"checkpoint {files.index} of {directory!r} does not fit this RIM "
                               f"and optimizer ({type(e).__name__}: {e})") from e
        run.latest_good = files
        if config.verbose >= 0 and run.main:
            _log.info("Loaded checkpoint %d of %s", files.index, run.logname)
        break
    else:
        if found:
            raise RuntimeError(f"no readable checkpoint in {directory!r} (every one is corrupt or "
                               f"truncated; see the warnings); move them away to start afresh")
        train_state = None
    run.next_index = ckpt.next_index(directory)
    if train_state is not None:
        _restore(run, train_state)


def _check_optimizer_kind(run: _Run, files, train_state) -> None:
    saved = (train_state or {}).get("optimizer_class")
    current = type(run.optimizer).__name__
    if saved is not None and saved != current:
        raise RuntimeError(f"checkpoint {files.index} of {run.directory!r} was trained with {saved}; optimizer= "
                           f"gives {current}. Resume with the same optimizer, or start a new directory")


def _restore(run: _Run, state: dict) -> None:
    """Counters, patience, histories, scheduler, EMA, scaler, shuffling seed and RNG states of a training state."""
    config = run.config
    run.start_epoch = int(state["epoch"])
    run.step = int(state["step"])
    run.best_loss = float(state["best_loss"])
    saved_monitor = state.get("monitor", "train_loss")
    if saved_monitor == config.monitored:
        run.best = float(state.get("best", run.best_loss))
        run.patience = state["patience"]
    elif run.main:
        _log.info("monitor changed from %s to %s: best value and patience start afresh", saved_monitor,
                  config.monitored)
    run.history = list(state["losses"])
    try:
        if state.get("scheduler") is not None:
            run.scheduler.load_state_dict(state["scheduler"])
            if hasattr(run.scheduler, "base_lrs") and not isinstance(run.optimizer.param_groups[0]["lr"],
                                                                      torch.Tensor):
                # fit(cuda_graphs=True) saves tensor learning rates; a plain optimizer takes floats
                run.scheduler.base_lrs = [float(b) for b in run.scheduler.base_lrs]
        if state.get("ema") and config.ema_decay > 0:
            run.ema.load_state_dict(state["ema"])
        if state.get("scaler") and run.scaler is not None:
            run.scaler.load_state_dict(state["scaler"])
    except (RuntimeError, ValueError, KeyError, AssertionError) as e:
        raise RuntimeError(f"{run.latest_good.trainstate!r}: its scheduler/EMA/scaler state does not fit this run "
                           f"({type(e).__name__}: {e})") from e
    if run.group.on and state.get("sampler_seed") is not None:
        run.sampler_seed = int(state["sampler_seed"])
    _restore_rng(run, state)
    if run.patience <= 0 or run.patience > config.patience:
        run.patience = config.patience


def _restore_rng(run: _Run, state: dict) -> None:
    """This rank's RNG states as the checkpoint saved them; a rank the checkpoint has not (it was saved by fewer
    processes, or before states were saved per rank) takes rank 0's and draws its own streams from them."""
    saved = state.get("rng_ranks") or [state["rng"]]
    rank = run.group.rank
    _set_rng_state(saved[rank] if rank < len(saved) else saved[0], run.device)
    if rank >= len(saved):
        _own_streams(rank)


def _loaders(run: _Run, dataset, val_dataset) -> None:
    config = run.config
    run.loader, run.sampler, run.pinned, n = fit_data.train_loader(dataset, config, run.group, run.device,
                                                                   run.sampler_seed)
    run.n_iterations = config.n_iterations_in_epoch or _common_length(run, n)
    if val_dataset is not None:
        run.val_loader, run.val_pinned = fit_data.val_loader(val_dataset, config, run.group, run.device)
    n_epochs = config.epochs if config.max_epochs is None else max(0, config.max_epochs - run.start_epoch)
    run.end_epoch = run.start_epoch + n_epochs


def _common_length(run: _Run, n: int) -> int:
    """The batches per epoch of every process: the fewest any has. DDP's backward waits for every process, so all
    must take the same number of steps; a DataLoader of the user's may give the processes unequal shards (fit's
    own DistributedSampler evens them)."""
    counts = run.group.gather(n)
    empty = [rank for rank, count in enumerate(counts) if count == 0]
    if empty:
        raise ValueError("dataset: the DataLoader gives no batch" + (
            f" on rank {', '.join(map(str, empty))} of {len(counts)}" if len(counts) > 1 else ""))
    if len(set(counts)) > 1:
        n = min(counts)
        if run.main:
            warn(f"dataset: the processes' DataLoaders give {', '.join(map(str, counts))} batches per epoch "
                 f"(rank order); each process takes {n} per epoch, as DDP needs the same number of steps on "
                 f"every process, and the others' last batches are left out (n_iterations_in_epoch sets the "
                 f"number: a shorter loader starts again)")
    return n


def _wrap(run: _Run) -> None:
    """DDP around the RIM, the autocast of the precision, the loss weights on the device (once, not per step)."""
    config, device = run.config, run.device
    if run.group.on:
        from torch.nn.parallel import DistributedDataParallel
        kwargs = dict(config.ddp_kwargs)
        if device.type == "cuda":
            kwargs.setdefault("device_ids", [device.index if device.index is not None else
                                             torch.cuda.current_device()])
        # parameters of the RIM outside its network (an nn.Module given as score_fn, energy_fn, a link function)
        # are not trained (the score is computed without autograd): DDP would wait for their gradients for ever
        frozen = [name for name, p in run.rim.named_parameters() if not name.startswith("model.")]
        if frozen:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(run.rim, frozen)
        run.net = DistributedDataParallel(run.rim, **kwargs)
        if not isinstance(run.ema, NullEMA):
            # DDP gave every rank rank 0's weights; the EMA's shadows, made from each rank's own, follow them
            run.group.broadcast_tensors(run.ema.shadow_params)
    else:
        run.net = run.rim
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(config.precision)
    run.autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    run.w = config.w.to(device) if isinstance(config.w, torch.Tensor) else config.w
    run.time_weights = None if config.time_weights is None else config.time_weights.to(device)
    if run.graph_recorder is not None:
        run.graph = fit_graph.build(run, run.graph_recorder)


def _train(run: _Run) -> list:
    """The epochs: train, validate, monitor, checkpoint, log; stop on patience, time or a non-finite loss."""
    config = run.config
    run.global_start = time.time()
    estimated_time_for_epoch = 0
    run.loggers("setup", run.directory, run.start_epoch, config)
    progress = _Progress((run.end_epoch - run.start_epoch) * run.n_iterations, config.verbose < 0 or not run.main,
                         run.logname)
    try:
        for epoch in range(run.start_epoch, run.end_epoch):
            late = time.time() - run.global_start > config.max_time * 3600 - estimated_time_for_epoch
            if run.group.on:
                # one decision for every rank (their clocks differ)
                late = float(run.group.sum(torch.tensor(float(late), device=run.device))) > 0
            if late:
                break
            epoch_start = time.time()
            train = _train_epoch(run, epoch, progress)
            progress.epoch_end(epoch, train["cost"])
            if not math.isfinite(train["cost"]):
                _stop_on_nan(run, epoch, train)
                break
            run.losses.append(train["cost"])
            run.history.append(train["cost"])
            val = _validate(run, epoch) if _validation_due(run, epoch, train["out_of_time"]) else {}
            value, improved = _monitor(run, train["cost"], val)
            _report_epoch(run, epoch, train, val)
            state = _state(run, epoch, train, val, value, improved, time.time() - epoch_start)
            last = epoch == run.end_epoch - 1 or run.patience <= 0 or train["out_of_time"]
            if run.directory is not None and ((epoch + 1) % config.checkpoints == 0 or last):
                _checkpoint(run, epoch, train["cost"], val, state, last)
            run.loggers("on_epoch_end", state)
            run.last_state = state
            if run.patience <= 0:
                if run.main:
                    _log.info("Reached patience")
                break
            if train["out_of_time"]:
                if run.main:
                    _log.info("Out of time")
                break
            if epoch > run.start_epoch:
                estimated_time_for_epoch = time.time() - epoch_start
    finally:
        progress.close()
    return _end(run)


def _train_epoch(run: _Run, epoch: int, progress: _Progress) -> dict:
    """One epoch of ``n_iterations`` batches through ``train_step``, then the scheduler step. Returns the epoch's
    loss (mean over processes and good batches), skipped steps, time, throughput, learning rate, peak memory."""
    config, device = run.config, run.device
    if run.sampler is not None:
        run.sampler.set_epoch(epoch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.time()
    run.cost_sum = torch.zeros((), device=device)
    run.n_good = torch.zeros((), device=device)
    run.window_ok, run.skipped = None, 0
    finite_mode = {None: "cpu", False: None, "warn": "warn"}.get(config.check_finite, "error")
    data_iter = fit_data.fresh_iter(run.loader)
    run.optimizer.zero_grad()
    for i in range(run.n_iterations):
        try:
            batch = next(data_iter)
        except StopIteration:
            data_iter = fit_data.fresh_iter(run.loader)
            batch = next(data_iter)
        fit_data.check_batch(batch, i)
        if finite_mode in ("error", "warn") or (finite_mode == "cpu" and batch[0].device.type == "cpu"
                                                and batch[1].device.type == "cpu"):
            fit_data.check_batch_finite(batch[0], batch[1], finite_mode, config.check_finite, i)
        y, x_true, *args = (fit_data.to_device(b, device, run.pinned) for b in batch)
        w = run.w(y, x_true, *args) if callable(run.w) else run.w
        train_step(run, i, y, x_true, args, w)
        progress.step(epoch, run.cost_sum, run.n_good)
    learning_rate = float(run.optimizer.param_groups[0]["lr"])
    with warnings.catch_warnings():
        # the GradScaler skips the first steps (inf gradients while it finds its scale): not the user's order
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        run.scheduler.step()
    fit_graph.floor_lrs(run.optimizer)
    out_of_time = (time.time() - run.global_start) > config.max_time * 3600
    totals = torch.stack([run.cost_sum.float(), run.n_good.float(), torch.tensor(float(out_of_time), device=device),
                          torch.tensor(float(run.skipped), device=device)])
    totals = run.group.sum(totals).tolist()
    seconds = time.time() - start
    if totals[3] > 0 and run.main:
        warn(f"epoch {epoch + 1}: skipped {int(totals[3])} optimizer step(s) with a non-finite loss "
             f"(on_nan='skip')")
    return {"cost": totals[0] / totals[1] if totals[1] > 0 else float("nan"), "out_of_time": totals[2] > 0,
            "seconds": seconds, "steps_per_second": run.n_iterations / max(seconds, 1e-9),
            "learning_rate": learning_rate,
            "peak_memory": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}


def train_step(run: _Run, i: int, y, x_true, args, w) -> None:
    """Batch ``i`` of the epoch: forward and backward through the (DDP-wrapped) RIM, the loss divided by its
    accumulation window and scaled by the GradScaler under "16-mixed"; at the window's last batch,
    ``_optimizer_step``. The loss is summed on the device: no host sync, except on_nan="skip"'s one per step."""
    config = run.config
    if run.graph is not None:
        return _graph_step(run, y, x_true, args, w)
    n, k = run.n_iterations, config.accumulate_grad_batches
    last_of_window = (i + 1) % k == 0 or i == n - 1
    sync = contextlib.nullcontext() if (last_of_window or not run.group.on) else run.net.no_sync()
    with sync:
        with run.autocast():
            loss = run.net(y, *args, x_true=x_true, w=w, time_weights=run.time_weights)
        scale = _window_size(i, n, k)
        scaled = loss / scale if scale > 1 else loss
        (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
    if k > 1 and not last_of_window and i % k == 0 and run.rim.__dict__.get("_uses_cuda_graphs"):
        _own_gradients(run)
    loss = loss.detach()
    if config.on_nan == "skip":
        ok = torch.isfinite(loss)
        run.cost_sum += torch.where(ok, loss, torch.zeros_like(loss))
        run.n_good += ok
        run.window_ok = ok if run.window_ok is None else run.window_ok & ok
    else:
        run.cost_sum += loss
        run.n_good += 1
    if last_of_window:
        _optimizer_step(run)


def _own_gradients(run: _Run) -> None:
    """After a window's first backward through a loop compiled with CUDA graphs (``rim.compile()`` on CUDA): the
    gradients autograd took over are the graph's output memory, which the next micro-batch's replay overwrites
    before its backward adds into them; copied into memory of their own, they accumulate in place (torch's
    advice for gradient accumulation under mode="reduce-overhead")."""
    for group in run.optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad = p.grad.clone()


def _optimizer_step(run: _Run) -> None:
    """The optimizer step of an accumulation window: warm-up learning rate, (unscale,) gradient clipping, step,
    EMA and scaler updates; skipped (gradients dropped) when on_nan="skip" saw a non-finite loss in the window."""
    config, optimizer = run.config, run.optimizer
    if config.on_nan == "skip":
        bad = (~run.window_ok).float()
        run.window_ok = None
        if float(run.group.sum(bad)) != 0:  # one host sync per optimizer step
            run.skipped += 1
            optimizer.zero_grad()
            return
    _warmup(run)
    if run.scaler is not None:
        if config.clip > 0:
            run.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(run.rim.model.parameters(), max_norm=config.clip)
        run.scaler.step(optimizer)
        run.scaler.update()
    else:
        if config.clip > 0:
            torch.nn.utils.clip_grad_norm_(run.rim.model.parameters(), max_norm=config.clip)
        optimizer.step()
    run.ema.update()
    run.step += 1
    optimizer.zero_grad()


def _warmup(run: _Run) -> None:
    """The warm-up's learning rate of step ``run.step``, in place into tensor learning rates."""
    if run.step < run.config.warmup:
        for g, base in zip(run.optimizer.param_groups, run.base_lrs):
            # a Python float: a numpy scalar in the optimizer state fails torch.load(weights_only=True)
            lr = float(base * np.minimum(run.step / run.config.warmup, 1.0))
            if isinstance(g["lr"], torch.Tensor):
                g["lr"].fill_(max(lr, fit_graph.LR_FLOOR))
            else:
                g["lr"] = lr


def _graph_step(run: _Run, y, x_true, args, w) -> None:
    """``train_step`` through the recorded step (fit(cuda_graphs=True)): the warm-up and EMA decay written into its
    tensors, then one replay (or, for a batch of other shapes, the same step eagerly); the loss summed on the
    device."""
    _warmup(run)
    fit_graph.before_step(run)
    run.cost_sum += run.graph(y, x_true, w, *args)
    run.n_good += 1
    run.step += 1


def _stop_on_nan(run: _Run, epoch: int, train: dict) -> None:
    run.nan_stop = True
    message = f"non-finite loss ({train['cost']}) in epoch {epoch + 1}: training stopped (on_nan={run.config.on_nan!r})"
    if run.latest_good is not None:
        # the network was updated with NaN/inf gradients: go back to the last good weights
        run.rim.model.load_state_dict(ckpt.load_file(run.latest_good.model, map_location=run.device))
        message += f"; weights reloaded from the last good checkpoint {os.path.basename(run.latest_good.model)}"
    else:
        message += "; no checkpoint to go back to: the network holds the diverged weights"
    warn(message)
    state = _state(run, epoch, train, {}, None, False, train["seconds"])
    run.loggers("on_epoch_end", state)
    run.last_state = state


def _validation_due(run: _Run, epoch: int, out_of_time: bool) -> bool:
    return run.val_loader is not None and ((epoch + 1) % run.config.val_every == 0 or epoch == run.end_epoch - 1
                                           or out_of_time)


def _estimate_and_loss(rim, y, x_true, args, w, time_weights) -> tuple:
    """(predict's estimate in physical space, loss_fn's value) from one run of the loop."""
    rim._check_observation(y, args, {})
    rim._check_target(x_true, y)
    amp = rim._autocast_enabled()
    with rim._no_autocast(amp):
        target = rim.inverse_link_function(x_true)
    out, loss = rim._run(y, args, {}, x_true=target, keep_trajectory=False, w=w, time_weights=time_weights)
    with rim._no_autocast(amp):
        return rim.link_function(out[-1]), loss / y.shape[0]


def _validate(run: _Run, epoch: int) -> dict:
    """Validation loss and imaging metrics, averaged over the validation samples of every process (each once),
    with the EMA weights; a few samples kept as images for the loggers (2D)."""
    rim, config, device = run.rim, run.config, run.device
    names = ["mse", "nmse", "psnr"] + (["ssim"] if min(rim.dimensions) >= fit_metrics.ssim_window() else [])
    sums = torch.zeros(len(names) + 2, dtype=torch.float64, device=device)  # loss, metrics..., count
    run.images = None
    was_training = rim.training
    rim.eval()
    try:
        with torch.no_grad(), run.ema.average_parameters(), run.autocast():
            for i, batch in enumerate(fit_data.fresh_iter(run.val_loader)):
                fit_data.check_batch(batch, i, "val_dataset")
                y, x_true, *args = (fit_data.to_device(b, device, run.val_pinned) for b in batch)
                w = run.w(y, x_true, *args) if callable(run.w) else run.w
                try:
                    estimate, loss = _estimate_and_loss(rim, y, x_true, args, w, run.time_weights)
                except (ValueError, TypeError) as e:
                    raise type(e)(f"val_dataset, batch {i}: {e}") from e
                # in float32 whatever the precision: SSIM's variances are differences of nearly equal moments,
                # which bfloat16 convolutions lose (and float16 overflows on large intensities)
                with torch.autocast(device.type, enabled=False):
                    values = fit_metrics.image_metrics(estimate.float(), x_true.float(), config.data_range, names)
                B = y.shape[0]
                sums += torch.stack([loss.double() * B, *(values[n].double().sum() for n in names),
                                     torch.full((), float(B), dtype=torch.float64, device=device)])
                if run.images is None and run.main and estimate.dim() == 4:
                    run.images = {"observation": y[:_IMAGES].detach().cpu(),
                                  "estimate": estimate[:_IMAGES].float().cpu(),
                                  "target": x_true[:_IMAGES].float().cpu()}
    finally:
        rim.train(was_training)
    totals = run.group.sum(sums).tolist()
    count = totals[-1]
    return {f"val_{name}": totals[j] / count for j, name in enumerate(["loss", *names])}


def _improved(value: float, best: float, mode: str, tolerance: float) -> bool:
    if mode == "min":
        return value < (1 - tolerance) * best
    if math.isinf(best):
        return value > best
    return value > best + tolerance * abs(best)


def _monitor(run: _Run, cost: float, val: dict) -> tuple:
    """Patience and the best value of the monitored quantity: (value this epoch or None, improved)."""
    config = run.config
    if cost < run.best_loss:
        run.best_loss = cost
    value = cost if config.monitored == "train_loss" else val.get(config.monitored)
    if value is None:
        return None, False
    improved = _improved(value, run.best, config.mode, config.tolerance)
    if improved:
        run.best = value
        run.patience = config.patience
    else:
        run.patience -= 1
    return value, improved


def _report_epoch(run: _Run, epoch: int, train: dict, val: dict) -> None:
    config = run.config
    if not run.main:
        return
    extra = "".join(f" | {k} {v:.4g}" for k, v in val.items())
    if config.verbose >= 2:
        _log.info("epoch %d | cost %.2e | time per step %.2e s%s", epoch, train["cost"],
                  train["seconds"] / run.n_iterations, extra)
    elif config.verbose == 1 and (epoch + 1) % config.checkpoints == 0:
        _log.info("epoch %d | cost %.1e%s", epoch, train["cost"], extra)


def _state(run: _Run, epoch: int, train: dict, val: dict, value, improved: bool, seconds: float):
    state = fit_loggers.RunState(
        epoch=epoch + 1, step=run.step, train_loss=train["cost"], learning_rate=train["learning_rate"],
        steps_per_second=train["steps_per_second"], epoch_seconds=seconds, peak_gpu_memory=train["peak_memory"],
        val=dict(val), monitor=run.config.monitored, monitor_value=value,
        best=run.best if math.isfinite(run.best) else None, is_best=improved, directory=run.directory,
        logname=run.logname, images=run.images if val else None)
    return state


def _checkpoint(run: _Run, epoch: int, cost: float, val: dict, state, last: bool) -> None:
    """Write checkpoint ``next_index`` (rank 0) and keep the newest, or the best by ``monitor`` and the latest."""
    config = run.config
    index = run.next_index
    run.next_index += 1
    # every process's own streams (they differ: _own_streams), so that each continues its own on a resume
    rng = run.group.gather(_rng_state(run.device))
    if run.main:
        values = {"epoch": epoch + 1, "train_loss": cost, **val}
        train_state = {
            "format": TRAINSTATE_FORMAT, "epoch": epoch + 1, "step": run.step, "best_loss": run.best_loss,
            "monitor": config.monitored, "best": run.best, "patience": run.patience, "losses": run.history,
            "sampler_seed": run.sampler_seed, "world_size": run.group.world, "rng": rng[0],
            "optimizer_class": type(run.optimizer).__name__, "config": config.to_dict(), "metrics": values}
        if run.group.on:
            train_state["rng_ranks"] = rng
        run.latest_good = _save(run, index, cost, train_state, values)
        state.checkpoint = index
        run.loggers("on_checkpoint", state, run.latest_good)
        if config.loss_curve and (last or time.monotonic() - run.curve_written >= _CURVE_INTERVAL_S):
            run.curve_written = time.monotonic()
            if not write_loss_curve(os.path.join(run.directory, "loss_curve.png"), run.history, run.logname) \
                    and not run.curve_noted:
                run.curve_noted = True
                _log.info("matplotlib is not installed: loss_curve.png skipped")
    run.group.barrier()
    if not run.main:
        run.latest_good = ckpt.CheckpointFiles(index, cost, os.path.join(
            run.directory, ckpt.checkpoint_name("checkpoint", cost, index)), None)


def _save(run: _Run, index: int, cost: float, state: dict, values: dict) -> ckpt.CheckpointFiles:
    """Write checkpoint ``index``: trainstate, optimizer, its metrics, then the model file (which commits it);
    then the score sheet and the retention. Every file atomically."""
    directory, ema = run.directory, run.ema
    state["scheduler"] = run.scheduler.state_dict()
    if run.scaler is not None:
        state["scaler"] = run.scaler.state_dict()
    if not isinstance(ema, NullEMA):
        state["ema"] = ema.state_dict()
        # the model file holds the EMA weights (torch_rim); an exact resume needs the raw ones too
        state["model"] = run.rim.model.state_dict()
    paths = {kind: os.path.join(directory, ckpt.checkpoint_name(kind, cost, index))
             for kind in ("trainstate", "optimizer", "checkpoint")}
    ckpt.atomic_save(state, paths["trainstate"])
    ckpt.atomic_save(run.optimizer.state_dict(), paths["optimizer"])
    ckpt.atomic_write_json(state["config"], os.path.join(directory, "fit_config.json"))
    table = ckpt.record_metrics(directory, index, values)
    with ema.average_parameters():
        ckpt.atomic_save(run.rim.model.state_dict(), paths["checkpoint"])
    ckpt.append_score_sheet(directory, index, cost)
    keep = None
    if run.config.keeps_best:
        listed = [f.index for f in ckpt.list_checkpoints(directory)]
        keep = set(ckpt.ranked(table, listed, run.config.monitored)[:run.config.models_to_keep]) | {index}
    ckpt.prune(directory, run.config.models_to_keep, index, keep=keep)
    return ckpt.CheckpointFiles(index, cost, paths["checkpoint"], paths["optimizer"], paths["trainstate"])


def _end(run: _Run) -> list:
    """EMA weights into the network (unless stopped on NaN), loggers closed; returns this call's losses."""
    # the recorded step leaves its gradients (graph memory) on the parameters
    run.optimizer.zero_grad()
    if not run.nan_stop:
        run.ema.copy_to(run.rim.model.parameters())
    run.loggers("on_train_end", run.last_state)
    if run.config.verbose >= 0 and run.main:
        _log.info("Finished training after %.3f hours.", (time.time() - run.global_start) / 3600)
    return run.losses
