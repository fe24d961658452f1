"""``FitConfig``: every argument of ``fit`` but the data and the RIM, validated once, in one object.

``fit`` builds it from its arguments (``FitConfig(**arguments)`` checks each one and names it in any error), the
phases of training read it, and each checkpoint carries it in readable form (``to_dict()``: numbers, strings,
lists; functions by their qualified names) in its training state, as ``fit_config.json`` in the checkpoints
directory too.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import multiprocessing
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch

from .metrics import MONITORS
from .validation import choice, flag, function, integer, number

__all__ = ["FitConfig", "PRECISIONS", "ON_NAN", "MONITORS"]

PRECISIONS = {"32": "32", "32-true": "32", "fp32": "32", "bf16-mixed": "bf16-mixed", "bf16": "bf16-mixed",
              "16-mixed": "16-mixed", "16": "16-mixed"}
ON_NAN = ("stop", "skip")
#: fit's loader options and their defaults: given with a DataLoader of the user's, they are an error
LOADER_OPTIONS = {"num_workers": 0, "pin_memory": None, "persistent_workers": False, "prefetch_factor": None,
                  "collate_fn": None, "drop_last": False, "multiprocessing_context": None}


@dataclass
class FitConfig:
    """The validated arguments of one ``fit`` call (see ``rim_fast.training.fit`` for each one's meaning)."""
    # torch_rim's arguments
    epochs: int = 100
    learning_rate: float = 1e-4
    scheduler: Optional[Callable] = None
    batch_size: int = 1
    shuffle: bool = False
    patience: float = math.inf
    tolerance: float = 0
    max_time: float = math.inf
    warmup: int = 0
    clip: float = 0.
    checkpoints_directory: Optional[str] = None
    model_checkpoint: Optional[int] = None
    checkpoints: int = 10
    models_to_keep: int = 3
    ema_decay: float = 0
    seed: Optional[int] = None
    logname: Optional[str] = None
    logdir: Optional[str] = None
    n_iterations_in_epoch: Optional[int] = None
    logname_prefix: str = "rim"
    verbose: int = 0
    compile: bool = False
    # training
    max_epochs: Optional[int] = None
    precision: str = "32"
    gradient_checkpointing: Optional[bool] = None
    accumulate_grad_batches: int = 1
    on_nan: str = "stop"
    check_finite: Any = None
    w: Any = None
    time_weights: Any = None
    loss_curve: bool = True
    ddp_kwargs: dict = field(default_factory=dict)
    optimizer: Optional[Callable] = None
    cuda_graphs: bool = False
    # data
    num_workers: int = 0
    pin_memory: Optional[bool] = None
    persistent_workers: bool = False
    prefetch_factor: Optional[int] = None
    collate_fn: Optional[Callable] = None
    drop_last: bool = False
    multiprocessing_context: Optional[object] = None
    # validation, monitoring, logging
    val_every: int = 1
    val_batch_size: Optional[int] = None
    data_range: Optional[float] = None
    monitor: Optional[str] = None
    loggers: Any = None

    def __post_init__(self):
        self._check_torch_rim_arguments()
        self._check_training()
        self._check_data()
        self._check_validation()

    def _check_torch_rim_arguments(self):
        for name in ("epochs", "warmup"):
            integer(name, getattr(self, name), minimum=0)
        for name in ("batch_size", "checkpoints", "models_to_keep"):
            integer(name, getattr(self, name))
        integer("n_iterations_in_epoch", self.n_iterations_in_epoch, optional=True)
        for name in ("max_epochs", "model_checkpoint", "seed"):
            integer(name, getattr(self, name), minimum=0, optional=True)
        number("learning_rate", self.learning_rate, above=0, finite=True)
        number("patience", self.patience, above=0, note=" (float('inf') disables it)")
        number("tolerance", self.tolerance, at_least=0, below=1)
        number("max_time", self.max_time, above=0, note=" (hours)")
        number("clip", self.clip, at_least=0)
        number("ema_decay", self.ema_decay, at_least=0, below=1)
        if self.scheduler is not None:
            function("scheduler", self.scheduler,
                     note=" (optimizer -> LR scheduler, e.g. functools.partial(torch.optim.lr_scheduler.StepLR, "
                          "step_size=10))")
        for name in ("checkpoints_directory", "logdir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, bytes)) and not hasattr(value, "__fspath__"):
                raise TypeError(f"{name} must be a path, got {type(value).__name__}")

    def _check_training(self):
        integer("accumulate_grad_batches", self.accumulate_grad_batches)
        self.precision = PRECISIONS[choice("precision", str(self.precision), PRECISIONS)]
        choice("on_nan", self.on_nan, ON_NAN)
        choice("check_finite", self.check_finite, (None, False, True, "error", "warn"),
               note=" (None: CPU batches only)")
        flag("gradient_checkpointing", self.gradient_checkpointing, optional=True)
        flag("loss_curve", self.loss_curve)
        flag("cuda_graphs", self.cuda_graphs)
        if self.ddp_kwargs is None:
            self.ddp_kwargs = {}
        if not isinstance(self.ddp_kwargs, dict):
            raise TypeError(f"ddp_kwargs must be a dict of DistributedDataParallel arguments, got {self.ddp_kwargs!r}")
        if self.w is not None and not (callable(self.w) or isinstance(self.w, torch.Tensor)):
            raise TypeError(f"w must be a tensor or a callable (y, x_true, *args) -> tensor, got "
                            f"{type(self.w).__name__}")
        if self.time_weights is not None and not isinstance(self.time_weights, torch.Tensor):
            try:
                self.time_weights = torch.tensor(self.time_weights, dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"time_weights must be a sequence of numbers or a 1-D tensor, got "
                                f"{type(self.time_weights).__name__}") from None
        if self.optimizer is not None:
            function("optimizer", self.optimizer, note=" (an optimizer class, e.g. torch.optim.AdamW, or a callable "
                                                      "params -> optimizer)")

    def _check_data(self):
        integer("num_workers", self.num_workers, minimum=0)
        flag("pin_memory", self.pin_memory, optional=True)
        flag("persistent_workers", self.persistent_workers)
        flag("drop_last", self.drop_last)
        integer("prefetch_factor", self.prefetch_factor, optional=True)
        if self.collate_fn is not None:
            function("collate_fn", self.collate_fn)
        context = self.multiprocessing_context
        if context is not None and not isinstance(context, multiprocessing.context.BaseContext):
            if not isinstance(context, str):
                raise TypeError(f"multiprocessing_context must be None, a start method name or a multiprocessing "
                                f"context, got {type(context).__name__}")
            choice("multiprocessing_context", context, tuple(multiprocessing.get_all_start_methods()))
        if self.num_workers == 0:
            for name in ("persistent_workers", "prefetch_factor", "multiprocessing_context"):
                if getattr(self, name) not in (False, None):
                    raise ValueError(f"{name}={getattr(self, name)!r} needs worker processes: set num_workers >= 1")

    def _check_validation(self):
        integer("val_every", self.val_every)
        integer("val_batch_size", self.val_batch_size, optional=True)
        if self.data_range is not None:
            number("data_range", self.data_range, above=0, finite=True, note=" (None: each target's max - min)")
        if self.monitor is not None:
            self.monitor = choice("monitor", self.monitor, MONITORS, ignore_case=True,
                                  note=" (None: the training loss, keeping the newest checkpoints as torch_rim)")

    @property
    def monitored(self) -> str:
        """The value that drives patience and (with ``monitor`` given) the checkpoints kept."""
        return self.monitor or "train_loss"

    @property
    def mode(self) -> str:
        return MONITORS[self.monitored]

    @property
    def keeps_best(self) -> bool:
        """``models_to_keep`` keeps the best checkpoints by ``monitor`` (plus the latest); torch_rim's newest when
        ``monitor`` is None."""
        return self.monitor is not None

    @property
    def validates(self) -> bool:
        return self.monitored.startswith("val_")

    def loader_options_given(self) -> list:
        return [name for name, default in LOADER_OPTIONS.items() if getattr(self, name) != default]

    def to_dict(self) -> dict:
        """The configuration in readable form: numbers, strings, lists, None; functions and objects by name."""
        return {f.name: _readable(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _readable(value) -> Union[None, bool, int, float, str, list, dict]:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.numel() <= 64 else f"tensor of shape {list(value.shape)}"
    if isinstance(value, (list, tuple)):
        return [_readable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _readable(v) for k, v in value.items()}
    if isinstance(value, functools.partial):
        arguments = [_readable(a) for a in value.args] + [f"{k}={_readable(v)}" for k, v in value.keywords.items()]
        return f"functools.partial({_readable(value.func)}, {', '.join(map(str, arguments))})"
    if hasattr(value, "__fspath__"):
        return str(value.__fspath__())
    if isinstance(value, type) or callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '?')}.{value.__qualname__}"
    return f"{type(value).__module__}.{type(value).__qualname__}"
