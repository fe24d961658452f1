"""RIM.fit: torch_rim's training loop and checkpoint directory, made a production training path.

Kept from torch_rim 0.2.9: the arguments, Adam, the per-epoch scheduler step, the warm-up rule, the directory
layout and file names, EMA weights in the model files, ``epochs`` = the epochs this call runs.

Fixed (no trained model depends on them): resuming a given ``model_checkpoint`` works (torch_rim's resume
crashed); optimizer files are paired with model files by index (torch_rim indexed two unordered globs with a
bool); batches are moved to the RIM's device; patience resets after an improvement (torch_rim counted every
non-improving epoch); per-epoch averages divide by the iterations actually run; ``logdir`` is created when
missing; retention keeps ``models_to_keep`` checkpoints whatever their names (a non-finite cost still gives a
parseable name); no device sync per step (the loss is summed on the device and read once per epoch, and about
once a second for the progress bar); every file is written atomically.

Added: exact resume (a ``trainstate_*.pth`` per checkpoint, see ``rim_fast.checkpoints``), ``max_epochs``,
``on_nan``, ``check_finite``, ``precision="bf16-mixed"``, ``gradient_checkpointing``,
``accumulate_grad_batches``, loss weights ``w`` and ``time_weights``, torch.distributed (DDP), a progress bar
with the running loss and steps/s, and a loss-curve PNG in the checkpoints directory.

Distributed training: run the script under ``torchrun --nproc_per_node N`` (fit initialises the process
group from torchrun's environment when none is, and leaves it up for later calls: destroy it yourself if needed), or initialise a process group
yourself. Each process then trains on its own shard (``DistributedSampler``), ``batch_size`` is per process,
the RIM is wrapped in ``DistributedDataParallel``, losses are averaged over processes for logging, patience
and the NaN check, and rank 0 alone writes the checkpoints directory (which all ranks must see: a shared
filesystem on several machines) while the others wait at a barrier. The RIM loss is a per-process batch mean
and DDP averages gradients over processes, so N processes at batch B take the same steps as one process at
batch N*B over the same samples, as long as every process gets full batches (len(dataset) divisible by
N*B; otherwise DistributedSampler repeats samples to even the shards and the last batch is smaller).
On GPUs, build the RIM with ``device=f"cuda:{local_rank}"``.

Your own loop instead of ``fit``: wrap the RIM itself, ``ddp = DistributedDataParallel(rim)``, and compute the
loss through DDP's forward: ``loss = ddp(y, *args, x_true=x_true)`` (RIM.forward returns ``loss_fn``'s value when
``x_true`` is given), or ``trajectory = ddp(y, *args)`` for a loss of your own. Calling
``ddp.module.loss_fn`` skips DDP's forward, and its gradients would not be averaged across processes.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import time
import warnings
from datetime import datetime
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import checkpoints as ckpt
from .utils import NullEMA
from .validation import choice, flag, function, integer, number

PRECISIONS = {"32": "32", "32-true": "32", "fp32": "32", "bf16-mixed": "bf16-mixed", "bf16": "bf16-mixed"}
ON_NAN = ("stop", "skip")
TRAINSTATE_FORMAT = 1
_PROGRESS_INTERVAL_S = 1.0
# plotting costs ~0.1-0.5 s: at most one loss curve per interval, and one at the last save of a call
_CURVE_INTERVAL_S = 60.0


def _check_fit_args(epochs, learning_rate, batch_size, patience, checkpoints, models_to_keep, warmup, clip,
                    ema_decay, n_iterations_in_epoch, tolerance=0, max_time=float("inf"), max_epochs=None,
                    accumulate_grad_batches=1, precision="32", on_nan="stop", check_finite=None,
                    gradient_checkpointing=None, scheduler=None, model_checkpoint=None, seed=None):
    for name, value in (("epochs", epochs), ("warmup", warmup)):
        integer(name, value, minimum=0)
    for name, value in (("batch_size", batch_size), ("checkpoints", checkpoints), ("models_to_keep", models_to_keep),
                        ("accumulate_grad_batches", accumulate_grad_batches)):
        integer(name, value)
    if n_iterations_in_epoch is not None:
        integer("n_iterations_in_epoch", n_iterations_in_epoch)
    for name, value in (("max_epochs", max_epochs), ("model_checkpoint", model_checkpoint), ("seed", seed)):
        integer(name, value, minimum=0, optional=True)
    number("learning_rate", learning_rate, above=0, finite=True)
    number("patience", patience, above=0, note=" (float('inf') disables it)")
    number("tolerance", tolerance, at_least=0, below=1)
    number("max_time", max_time, above=0, note=" (hours)")
    number("clip", clip, at_least=0)
    number("ema_decay", ema_decay, at_least=0, below=1)
    choice("precision", str(precision), PRECISIONS)
    choice("on_nan", on_nan, ON_NAN)
    choice("check_finite", check_finite, (None, False, True, "error", "warn"), note=" (None: CPU batches only)")
    flag("gradient_checkpointing", gradient_checkpointing, optional=True)
    if scheduler is not None:
        function("scheduler", scheduler, note=" (optimizer -> LR scheduler, e.g. "
                                              "functools.partial(torch.optim.lr_scheduler.StepLR, step_size=10))")


def _to_device(value, device):
    return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value


class _Dist:
    """The process group as fit sees it (a single process when none is initialised)."""

    def __init__(self, device: torch.device):
        self.created = False
        if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1 \
                and "MASTER_ADDR" in os.environ:
            # under torchrun: the environment describes the group
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            self.created = True
        self.on = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1
        self.device = device
        if self.on and device.type == "cuda" and "LOCAL_RANK" in os.environ and device.index is not None \
                and device.index != int(os.environ["LOCAL_RANK"]) and torch.cuda.device_count() > 1:
            warnings.warn(f"RIM.device is {device} on local rank {os.environ['LOCAL_RANK']}: processes may share "
                          f"one GPU; build the RIM with device=f'cuda:{{local_rank}}'", RuntimeWarning)

    def barrier(self):
        if self.on:
            dist.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.on:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast(self, value):
        if not self.on:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


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


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
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


def _check_batch(batch, index: int):
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise ValueError(f"the dataset must yield tuples (y, x_true, *args) (args go to the score function); batch "
                         f"{index} is a {type(batch).__name__}"
                         f"{' of length ' + str(len(batch)) if isinstance(batch, (list, tuple)) else ''}")
    for name, value in (("y", batch[0]), ("x_true", batch[1])):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"the dataset must yield tuples (y, x_true, *args) of tensors; {name} of batch {index} is "
                            f"a {type(value).__name__}")


def _check_batch_finite(y, x_true, mode, given, index: int):
    for name, value in (("y", y), ("x_true", x_true)):
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            message = (f"{name} of batch {index} contains NaN or inf (fit's check_finite={given!r}; "
                       f"check_finite=False trains on it anyway)")
            if mode == "warn":
                warnings.warn(message, RuntimeWarning, stacklevel=3)
            else:
                raise ValueError(message)


def _window_size(i: int, n: int, k: int) -> int:
    """Micro-batches in the accumulation window of batch i (of n per epoch, k per window; the last may be short)."""
    start = (i // k) * k
    return min(k, n - start)


def _load_candidate(files: ckpt.CheckpointFiles, device):
    """(model state, optimizer state or None, train state or None); RuntimeError naming the file on failure."""
    model_state = ckpt.load_file(files.model, map_location=device)
    opt_state = ckpt.load_file(files.optimizer, map_location=device) if files.optimizer else None
    train_state = ckpt.load_file(files.trainstate, map_location=device) if files.trainstate else None
    if train_state is not None and (not isinstance(train_state, dict)
                                    or train_state.get("format") != TRAINSTATE_FORMAT):
        raise RuntimeError(f"checkpoint file {files.trainstate!r} is not a rim_fast training state")
    return model_state, opt_state, train_state


def fit(rim, dataset, epochs=100, learning_rate=1e-4, scheduler=None, batch_size=1, shuffle=False,
        patience=float("inf"), tolerance=0, max_time=float("inf"), warmup=0, clip=0., checkpoints_directory=None,
        model_checkpoint=None, checkpoints=10, models_to_keep=3, ema_decay=0, seed=None, logname=None,
        logdir=None, n_iterations_in_epoch=None, logname_prefix="rim", verbose=0, compile=False, *,
        max_epochs: Optional[int] = None, precision="32", gradient_checkpointing: Optional[bool] = None,
        accumulate_grad_batches: int = 1, on_nan: str = "stop", check_finite=None, w=None, time_weights=None,
        loss_curve: bool = True, ddp_kwargs: Optional[dict] = None):
    """Train ``rim.model`` with Adam on (y, x_true, *args) batches; returns the list of this call's epoch losses.

    Arguments as torch_rim's RIM.fit: ``scheduler`` is a callable optimizer -> scheduler (stepped per epoch),
    ``warmup`` linear learning-rate warm-up steps, ``clip`` gradient-norm clipping, ``checkpoints`` the epoch
    interval between saves, ``max_time`` in hours, ``ema_decay`` > 0 saves EMA weights. With
    ``checkpoints_directory`` (or ``logdir``/``logname``) training resumes from its latest checkpoint, or from
    ``model_checkpoint`` (an index), exactly where it stopped: weights, optimizer, scheduler, EMA, epoch and
    step counters, patience, and the RNG states, so an interrupted run continues with the same losses.
    ``compile=True`` compiles the RIM loop (forward and backward) first; ``verbose=-1`` silences the
    progress bar.

    rim_fast's keyword-only arguments:

    ``seed`` seeds a fresh start; a resumed run restores the checkpoint's RNG states (and, distributed, its
    shuffling seed) instead, so that it continues the interrupted run exactly.

    - ``max_epochs``: total epochs over all resumed runs (counted from the checkpoint); replaces ``epochs``, so
      re-running the same command after a crash finishes the same training.
    - ``precision``: ``"32"`` or ``"bf16-mixed"`` (the network under ``torch.autocast(bfloat16)``; x, h, the
      score, the loss and the weights stay float32).
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
      at a save, at most once a minute and at the last save of the call (needs matplotlib; skipped with a note
      without it).
    - ``ddp_kwargs``: extra arguments of DistributedDataParallel (e.g. ``find_unused_parameters=True`` for a
      custom network with parameters unused in some steps).

    The module docstring describes distributed training."""
    _check_fit_args(epochs, learning_rate, batch_size, patience, checkpoints, models_to_keep, warmup, clip,
                    ema_decay, n_iterations_in_epoch, tolerance, max_time, max_epochs, accumulate_grad_batches,
                    precision, on_nan, check_finite, gradient_checkpointing, scheduler, model_checkpoint, seed)
    if ddp_kwargs is not None and not isinstance(ddp_kwargs, dict):
        raise TypeError(f"ddp_kwargs must be a dict of DistributedDataParallel arguments, got {ddp_kwargs!r}")
    if w is not None and not (callable(w) or isinstance(w, torch.Tensor)):
        raise TypeError(f"w must be a tensor or a callable (y, x_true, *args) -> tensor, got {type(w).__name__}")
    precision = PRECISIONS[str(precision)]
    device = rim.device
    if precision == "bf16-mixed" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision='bf16-mixed' needs a GPU with bfloat16 support; {device} has none")
    previous_checkpointing = rim.gradient_checkpointing
    if gradient_checkpointing is not None:
        rim.gradient_checkpointing = gradient_checkpointing
    group = _Dist(device)
    try:
        return _fit(rim, dataset, group, epochs, learning_rate, scheduler, batch_size, shuffle, patience, tolerance,
                    max_time, warmup, clip, checkpoints_directory, model_checkpoint, checkpoints, models_to_keep,
                    ema_decay, seed, logname, logdir, n_iterations_in_epoch, logname_prefix, verbose, compile,
                    max_epochs, precision, accumulate_grad_batches, on_nan, check_finite, w, time_weights,
                    loss_curve, ddp_kwargs or {})
    finally:
        rim.gradient_checkpointing = previous_checkpointing


def _fit(rim, dataset, group, epochs, learning_rate, scheduler, batch_size, shuffle, patience, tolerance, max_time,
         warmup, clip, checkpoints_directory, model_checkpoint, checkpoints, models_to_keep, ema_decay, seed, logname,
         logdir, n_iterations_in_epoch, logname_prefix, verbose, compile, max_epochs, precision,
         accumulate_grad_batches, on_nan, check_finite, w, time_weights, loss_curve, ddp_kwargs):
    device = rim.device
    main = group.rank == 0
    if compile and rim.__dict__.get("_compiled_loop") is None:
        rim.compile()
    optimizer = torch.optim.Adam(rim.model.parameters(), lr=learning_rate)
    if scheduler is not None:
        scheduler = scheduler(optimizer)
    else:
        scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.)
    if ema_decay > 0:
        try:
            from torch_ema import ExponentialMovingAverage
        except ImportError as err:
            raise ImportError(f"ema_decay={ema_decay} needs the torch-ema package: pip install torch-ema (or "
                              f"pip install 'rim-fast[train]'); ema_decay=0 trains without it") from err
        ema = ExponentialMovingAverage(rim.model.parameters(), decay=ema_decay)
    else:
        ema = NullEMA()
    if seed is not None:
        # before the DataLoader draws its first shuffle order
        torch.manual_seed(seed)

    sampler = None
    sampler_seed = None
    if group.on:
        from torch.utils.data.distributed import DistributedSampler
        # every rank must shuffle with the same seed
        sampler_seed = group.broadcast(seed if seed is not None else int(torch.randint(0, 2 ** 31 - 1, ()).item()))
    try:
        n_samples = len(dataset)
    except TypeError:
        raise ValueError(f"dataset must be a map-style dataset (with __len__) of (y, x_true, *args) tuples, got "
                         f"{type(dataset).__name__}") from None
    if n_samples == 0:
        raise ValueError("dataset is empty")

    if checkpoints_directory is not None:
        if not isinstance(checkpoints_directory, (str, os.PathLike)):
            raise TypeError(f"checkpoints_directory must be a path, got {type(checkpoints_directory).__name__}")
        logname = os.path.split(os.path.normpath(checkpoints_directory))[-1]
    elif logname is None:
        logname = logname_prefix + "_" + datetime.now().strftime("%y%m%d%H%M%S")
    save_checkpoint = checkpoints_directory is not None or logdir is not None
    train_state = None
    next_index = 1
    latest_good = None
    if save_checkpoint:
        if checkpoints_directory is None:
            checkpoints_directory = os.path.join(logdir, logname)
        checkpoints_directory = os.fspath(checkpoints_directory)
        if os.path.exists(checkpoints_directory) and not os.path.isdir(checkpoints_directory):
            raise ValueError(f"checkpoints_directory {checkpoints_directory!r} exists and is not a directory")
        if main:
            try:
                os.makedirs(checkpoints_directory, exist_ok=True)
            except OSError as e:
                raise ValueError(f"cannot create checkpoints_directory {checkpoints_directory!r}: {e}") from None
            if not os.access(checkpoints_directory, os.W_OK | os.X_OK):
                raise ValueError(f"checkpoints_directory {checkpoints_directory!r} is not writable")
            ckpt.remove_temporary_files(checkpoints_directory)
            script_params = os.path.join(checkpoints_directory, "script_params.json")
            if not os.path.exists(script_params):
                ckpt.atomic_write_json({
                    "learning_rate": learning_rate, "batch_size": batch_size, "shuffle": shuffle, "epochs": epochs,
                    "patience": patience, "tolerance": tolerance, "max_time": max_time, "warmup": warmup,
                    "clip": clip, "checkpoint_directory": checkpoints_directory, "checkpoints": checkpoints,
                    "models_to_keep": models_to_keep, "ema_decay": ema_decay, "seed": seed, "logname": logname,
                    "logname_prefix": logname_prefix}, script_params)
            hparams_path = os.path.join(checkpoints_directory, "model_hparams.json")
            if not os.path.exists(hparams_path):
                ckpt.atomic_write_json(rim.hyperparameters, hparams_path)
        group.barrier()

        found = ckpt.list_checkpoints(checkpoints_directory)
        if model_checkpoint is not None:
            candidates = [f for f in found if f.index == model_checkpoint]
            if not candidates:
                raise ValueError(f"model_checkpoint={model_checkpoint!r} not found in {checkpoints_directory!r}; "
                                 f"available: {[f.index for f in found]}")
        else:
            candidates = list(reversed(found))
        for files in candidates:
            try:
                model_state, opt_state, train_state = _load_candidate(files, device)
            except RuntimeError as e:
                if model_checkpoint is not None:
                    raise
                warnings.warn(f"{e}; trying the previous checkpoint", RuntimeWarning)
                continue
            try:
                rim.model.load_state_dict(train_state["model"] if train_state and "model" in train_state
                                          else model_state)
                if opt_state is not None:
                    optimizer.load_state_dict(opt_state)
            except (RuntimeError, ValueError, KeyError) as e:
                raise RuntimeError(f"checkpoint {files.index} of {checkpoints_directory!r} does not fit this RIM "
                                   f"and optimizer ({type(e).__name__}: {e})") from e
            latest_good = files
            if verbose >= 0 and main:
                tqdm.write(f"Loaded checkpoint {files.index} of {logname}")
            break
        else:
            if found:
                raise RuntimeError(f"no readable checkpoint in {checkpoints_directory!r} (every one is corrupt or "
                                   f"truncated; see the warnings); move them away to start afresh")
        next_index = ckpt.next_index(checkpoints_directory)

    start_epoch = 0
    step = 0
    best_loss = float("inf")
    initial_patience = patience
    history = []
    if train_state is not None:
        start_epoch = int(train_state["epoch"])
        step = int(train_state["step"])
        best_loss = float(train_state["best_loss"])
        patience = train_state["patience"]
        history = list(train_state["losses"])
        try:
            if train_state.get("scheduler") is not None:
                scheduler.load_state_dict(train_state["scheduler"])
            if train_state.get("ema") and ema_decay > 0:
                ema.load_state_dict(train_state["ema"])
        except (RuntimeError, ValueError, KeyError, AssertionError) as e:
            raise RuntimeError(f"{latest_good.trainstate!r}: its scheduler/EMA state does not fit this run "
                               f"({type(e).__name__}: {e})") from e
        if group.on and train_state.get("sampler_seed") is not None:
            sampler_seed = int(train_state["sampler_seed"])
        _set_rng_state(train_state["rng"], device)
        if patience <= 0 or patience > initial_patience:
            patience = initial_patience
    n_epochs = epochs if max_epochs is None else max(0, max_epochs - start_epoch)
    end_epoch = start_epoch + n_epochs

    if group.on:
        sampler = DistributedSampler(dataset, num_replicas=group.world, rank=group.rank, shuffle=shuffle,
                                     seed=sampler_seed, drop_last=False)
        dataloader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=False)
    else:
        dataloader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=False)
    if n_iterations_in_epoch is None:
        n_iterations_in_epoch = len(dataloader)

    if group.on:
        from torch.nn.parallel import DistributedDataParallel
        kwargs = dict(ddp_kwargs)
        if device.type == "cuda":
            kwargs.setdefault("device_ids", [device.index if device.index is not None else
                                             torch.cuda.current_device()])
        net = DistributedDataParallel(rim, **kwargs)
    else:
        net = rim
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16-mixed"
                else contextlib.nullcontext())
    if check_finite is None:
        finite_mode = "cpu"
    elif check_finite is False:
        finite_mode = None
    else:
        finite_mode = "warn" if check_finite == "warn" else "error"
    k = accumulate_grad_batches
    # once, not per step: fixed loss weights live on the device
    if isinstance(w, torch.Tensor):
        w = w.to(device)
    if time_weights is not None and not isinstance(time_weights, torch.Tensor):
        try:
            time_weights = torch.tensor(time_weights, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"time_weights must be a sequence of numbers or a 1-D tensor, got "
                            f"{type(time_weights).__name__}") from None
    if isinstance(time_weights, torch.Tensor):
        time_weights = time_weights.to(device)

    losses = []
    global_start = time.time()
    estimated_time_for_epoch = 0
    out_of_time = False
    nan_stop = False
    curve_noted = False
    curve_written = -math.inf
    progress = _Progress(n_epochs * n_iterations_in_epoch, verbose < 0 or not main, logname)
    for epoch in range(start_epoch, end_epoch):
        # one decision for every rank (their clocks differ)
        stop_now = torch.tensor(float((time.time() - global_start) > max_time * 3600 - estimated_time_for_epoch))
        if group.on:
            stop_now = group.sum(stop_now.to(device))
        if float(stop_now) > 0:
            break
        if sampler is not None:
            sampler.set_epoch(epoch)
        epoch_start = time.time()
        cost_sum = torch.zeros((), device=device)
        n_good = torch.zeros((), device=device)
        skipped = 0
        data_iter = iter(dataloader)
        optimizer.zero_grad()
        window_ok = None
        for i in range(n_iterations_in_epoch):
            try:
                batch = next(data_iter)
            except StopIteration:
                data_iter = iter(dataloader)
                batch = next(data_iter)
            _check_batch(batch, i)
            if finite_mode in ("error", "warn") or (finite_mode == "cpu" and batch[0].device.type == "cpu"
                                                    and batch[1].device.type == "cpu"):
                _check_batch_finite(batch[0], batch[1], finite_mode, check_finite, i)
            y, x_true, *args = (_to_device(b, device) for b in batch)
            w_batch = w(y, x_true, *args) if callable(w) else w
            last_of_window = (i + 1) % k == 0 or i == n_iterations_in_epoch - 1
            sync = contextlib.nullcontext() if (last_of_window or not group.on) else net.no_sync()
            with sync:
                with autocast:
                    loss = net(y, *args, x_true=x_true, w=w_batch, time_weights=time_weights)
                scale = _window_size(i, n_iterations_in_epoch, k)
                (loss / scale if scale > 1 else loss).backward()
            loss = loss.detach()
            if on_nan == "skip":
                ok = torch.isfinite(loss)
                cost_sum += torch.where(ok, loss, torch.zeros_like(loss))
                n_good += ok
                window_ok = ok if window_ok is None else window_ok & ok
            else:
                cost_sum += loss
                n_good += 1
            if last_of_window:
                take_step = True
                if on_nan == "skip":
                    flag = (~window_ok).float()
                    take_step = float(group.sum(flag)) == 0  # one host sync per optimizer step
                    window_ok = None
                if take_step:
                    if step < warmup:
                        for g in optimizer.param_groups:
                            # a Python float: a numpy scalar in the optimizer state fails torch.load(weights_only=True)
                            g["lr"] = float(learning_rate * np.minimum(step / warmup, 1.0))
                    if clip > 0:
                        torch.nn.utils.clip_grad_norm_(rim.model.parameters(), max_norm=clip)
                    optimizer.step()
                    ema.update()
                    step += 1
                else:
                    skipped += 1
                optimizer.zero_grad()
            progress.step(epoch, cost_sum, n_good)
        scheduler.step()
        epoch_time = time.time() - epoch_start
        out_of_time = (time.time() - global_start) > max_time * 3600
        totals = torch.stack([cost_sum.float(), n_good.float(), torch.tensor(float(out_of_time), device=device),
                              torch.tensor(float(skipped), device=device)])
        totals = group.sum(totals).tolist()
        cost = totals[0] / totals[1] if totals[1] > 0 else float("nan")
        out_of_time = totals[2] > 0
        if totals[3] > 0 and main:
            warnings.warn(f"epoch {epoch + 1}: skipped {int(totals[3])} optimizer step(s) with a non-finite loss "
                          f"(on_nan='skip')", RuntimeWarning)
        progress.epoch_end(epoch, cost)
        if not math.isfinite(cost):
            nan_stop = True
            message = f"non-finite loss ({cost}) in epoch {epoch + 1}: training stopped (on_nan={on_nan!r})"
            if latest_good is not None:
                # the network was updated with NaN/inf gradients: go back to the last good weights
                rim.model.load_state_dict(ckpt.load_file(latest_good.model, map_location=device))
                message += f"; weights reloaded from the last good checkpoint {os.path.basename(latest_good.model)}"
            else:
                message += "; no checkpoint to go back to: the network holds the diverged weights"
            warnings.warn(message, RuntimeWarning)
            break
        losses.append(cost)
        history.append(cost)
        if verbose >= 2 and main:
            tqdm.write(f"epoch {epoch} | cost {cost:.2e} | time per step {epoch_time / n_iterations_in_epoch:.2e} s")
        elif verbose == 1 and main and (epoch + 1) % checkpoints == 0:
            tqdm.write(f"epoch {epoch} | cost {cost:.1e}")
        if cost < (1 - tolerance) * best_loss:
            best_loss = cost
            patience = initial_patience
        else:
            patience -= 1
        if save_checkpoint and ((epoch + 1) % checkpoints == 0 or patience <= 0 or epoch == end_epoch - 1
                                or out_of_time):
            index = next_index
            next_index += 1
            if main:
                latest_good = _save(rim, optimizer, scheduler, ema, checkpoints_directory, index, cost, {
                    "format": TRAINSTATE_FORMAT, "epoch": epoch + 1, "step": step, "best_loss": best_loss,
                    "patience": patience, "losses": history, "sampler_seed": sampler_seed,
                    "world_size": group.world, "rng": _rng_state(device)}, models_to_keep)
                last_save = epoch == end_epoch - 1 or patience <= 0 or out_of_time
                if loss_curve and (last_save or time.monotonic() - curve_written >= _CURVE_INTERVAL_S):
                    curve_written = time.monotonic()
                    if not write_loss_curve(os.path.join(checkpoints_directory, "loss_curve.png"), history,
                                            logname) and not curve_noted:
                        curve_noted = True
                        tqdm.write("matplotlib is not installed: loss_curve.png skipped")
            group.barrier()
            if not main:
                latest_good = ckpt.CheckpointFiles(index, cost, os.path.join(
                    checkpoints_directory, ckpt.checkpoint_name("checkpoint", cost, index)), None)
        if patience <= 0:
            if main:
                tqdm.write("Reached patience")
            break
        if out_of_time:
            if main:
                tqdm.write("Out of time")
            break
        if epoch > start_epoch:
            estimated_time_for_epoch = epoch_time
    progress.close()
    if not nan_stop:
        ema.copy_to(rim.model.parameters())
    if verbose >= 0 and main:
        tqdm.write(f"Finished training after {(time.time() - global_start) / 3600:.3f} hours.")
    return losses


def _save(rim, optimizer, scheduler, ema, directory, index, cost, state, models_to_keep) -> ckpt.CheckpointFiles:
    """Write checkpoint ``index``: trainstate, optimizer, then the model file (which commits it); then the score
    sheet and the retention. Every file atomically."""
    state["scheduler"] = scheduler.state_dict()
    if not isinstance(ema, NullEMA):
        state["ema"] = ema.state_dict()
        # the model file holds the EMA weights (torch_rim); an exact resume needs the raw ones too
        state["model"] = rim.model.state_dict()
    paths = {kind: os.path.join(directory, ckpt.checkpoint_name(kind, cost, index))
             for kind in ("trainstate", "optimizer", "checkpoint")}
    ckpt.atomic_save(state, paths["trainstate"])
    ckpt.atomic_save(optimizer.state_dict(), paths["optimizer"])
    with ema.average_parameters():
        ckpt.atomic_save(rim.model.state_dict(), paths["checkpoint"])
    ckpt.append_score_sheet(directory, index, cost)
    ckpt.prune(directory, models_to_keep, index)
    return ckpt.CheckpointFiles(index, cost, paths["checkpoint"], paths["optimizer"], paths["trainstate"])
