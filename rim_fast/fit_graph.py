"""``fit(..., cuda_graphs=True)``: each full-size batch's training step as one CUDA graph.

The step (zero_grad, forward, backward, gradient clipping, the optimizer step, the EMA update) is recorded once by
``rim_fast.cuda_graphs.TrainStepGraph`` for the first batch's shapes and replayed for every batch of those shapes;
a batch of other shapes (the last, partial one; ``drop_last=True`` drops it instead) runs the same step eagerly.
The learning rate (warm-up and scheduler) is a device tensor per parameter group, written in place before each
step, and torch_ema's decay a device tensor that ``ema_update`` reads, so that replays see them.

What cannot be recorded runs eagerly, with one warning per ``fit`` call (``blocker`` and ``optimizer_blocker``
say why): a RIM off the GPU, ``on_nan="skip"`` (a host sync per step), ``accumulate_grad_batches`` > 1, several
processes (DDP), ``precision="16-mixed"`` (the GradScaler's step syncs with the host), a compiled RIM
(``compile=True`` or ``rim.compile()``: the compiled loop records its own graphs), an optimizer other than a
capturable Adam or AdamW; and a step whose capture fails (a score function that calls ``.item()``, for example):
``TrainStepGraph`` warns and steps eagerly. The eager steps use the same capturable optimizer, so the training is
the same either way.

Tensor learning rates are kept at ``LR_FLOOR`` or above (capturable Adam gives NaN at 0, the warm-up's first
step). Checkpoints hold the optimizer as it runs (capturable, tensor learning rates); ``restore_optimizer_form``
lets a checkpoint of a run with graphs resume without them, and the other way round.
"""
from __future__ import annotations

from typing import Optional

import torch

from .cuda_graphs import LR_FLOOR, TrainStepGraph, ema_decay, ema_update
from .utils import NullEMA
from .validation import warn as _warn

__all__ = ["blocker", "optimizer_blocker", "capturable_optimizer", "warn", "training_state", "build", "before_step",
           "floor_lrs", "optimizer_form", "restore_optimizer_form"]

#: optimizers whose step fit records (their ``capturable=True`` keeps the step counter on the device)
CAPTURABLE = (torch.optim.Adam, torch.optim.AdamW)


def blocker(rim, config, group) -> tuple:
    """(recorder, None) when this fit can record its training step, else (None, why not)."""
    recorder = rim._graph_recorder()
    if recorder is None:
        return None, f"the RIM is on {rim.device}; CUDA graphs need a GPU"
    reasons = [(config.on_nan == "skip", "on_nan='skip' reads each step's loss on the host"),
               (config.accumulate_grad_batches > 1, "accumulate_grad_batches > 1 is not recorded"),
               (group.on, "distributed training (DDP) is not recorded"),
               (config.precision == "16-mixed", "precision='16-mixed': the GradScaler's step syncs with the host"),
               (config.compile or rim.__dict__.get("_compiled_loop") is not None,
                "a compiled RIM (compile=True, rim.compile()) records CUDA graphs of its own")]
    for blocked, why in reasons:
        if blocked:
            return None, why
    return recorder, None


def capturable_optimizer(cls, params, learning_rate: float, device: torch.device):
    """``cls(params, lr=<device tensor>, capturable=True)`` (Adam, AdamW): what fit builds for its graphs."""
    return cls(params, lr=torch.tensor(float(learning_rate), device=device), capturable=True)


def optimizer_blocker(optimizer) -> Optional[str]:
    """None when fit can record ``optimizer``'s step (then a float learning rate becomes a device tensor, in place),
    else why not."""
    if type(optimizer) not in CAPTURABLE:
        return (f"{type(optimizer).__name__} is not recorded; fit records torch.optim.Adam and AdamW built with "
                f"capturable=True (optimizer=None or the class builds one)")
    if not all(group.get("capturable") for group in optimizer.param_groups):
        return f"{type(optimizer).__name__} was built without capturable=True"
    for group in optimizer.param_groups:
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), device=group["params"][0].device)
    return None


def warn(why: str) -> None:
    _warn(f"fit(cuda_graphs=True): {why}; training runs eagerly")


def training_state(rim, optimizer, ema=None) -> list:
    """What a training step updates in place, ``TrainStepGraph``'s ``state()``: the recording's warm-up and capture
    steps are undone on these (the parameters, the buffers, the optimizer's state tensors, the EMA shadows)."""
    return [*rim.model.parameters(), *rim.buffers(), *(t for s in optimizer.state.values() for t in s.values()
                                                       if isinstance(t, torch.Tensor)),
            *(ema.shadow_params if ema is not None else [])]


def build(run, recorder) -> TrainStepGraph:
    """The recorded step of a run: ``graph(y, x_true, w, *args)`` returns the batch's loss (a device tensor)."""
    rim, optimizer, config = run.rim, run.optimizer, run.config
    params = list(rim.model.parameters())
    ema = None if isinstance(run.ema, NullEMA) else run.ema
    run.one_minus_decay = torch.zeros((), device=run.device)
    run.graph_lrs = [group["lr"] for group in optimizer.param_groups]
    dtype = torch.bfloat16 if config.precision == "bf16-mixed" else None

    def step(y, x_true, w, *args):
        optimizer.zero_grad(set_to_none=True)
        # no autocast cache: its casts would be freed inside the capture
        with torch.autocast(run.device.type, dtype=dtype, enabled=dtype is not None, cache_enabled=False):
            loss = run.net(y, *args, x_true=x_true, w=w, time_weights=run.time_weights)
        loss.backward()
        if config.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, max_norm=config.clip)
        optimizer.step()
        if ema is not None:
            ema_update(ema, params, run.one_minus_decay)
        return loss.detach()

    # the recording times the convolutions' layouts against each other where RIM_FAST_CUDA_LAYOUT=auto
    return TrainStepGraph(step, lambda: training_state(rim, optimizer, ema), recorder, variants=rim.cuda_graph_variants)


def before_step(run) -> None:
    """The learning rates and the EMA decay of the coming step into the tensors the recorded step reads (no host
    sync). A scheduler or ``load_state_dict`` that replaced a group's learning-rate tensor (older torch versions
    assign instead of filling) is undone here: its value goes into the recorded tensor."""
    for group, lr in zip(run.optimizer.param_groups, run.graph_lrs):
        if group["lr"] is not lr:
            lr.fill_(group["lr"])
            group["lr"] = lr
    if not isinstance(run.ema, NullEMA):
        run.one_minus_decay.fill_(1.0 - ema_decay(run.ema))


def floor_lrs(optimizer) -> None:
    """Tensor learning rates raised to ``LR_FLOOR`` in place (no host sync)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].clamp_(min=LR_FLOOR)


def optimizer_form(optimizer) -> list:
    """Per parameter group: its ``capturable`` flag and learning rate object (see ``restore_optimizer_form``)."""
    return [(group.get("capturable"), group["lr"]) for group in optimizer.param_groups]


def restore_optimizer_form(optimizer, form: list) -> None:
    """After ``load_state_dict``, which takes every hyperparameter from the file: this run's ``capturable`` flags
    and learning-rate kind back (a tensor stays the same tensor, filled with the loaded value), and the step
    counters of capturable groups on their parameters' device, so that a checkpoint of a run with or without
    graphs resumes in either."""
    for group, (capturable, lr) in zip(optimizer.param_groups, form):
        if capturable is not None:
            group["capturable"] = capturable
        loaded = group["lr"]
        if isinstance(lr, torch.Tensor):
            lr.fill_(loaded)
            group["lr"] = lr
        else:
            group["lr"] = float(loaded)
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if not isinstance(step, torch.Tensor):
                continue
            if capturable:
                optimizer.state[p]["step"] = step.to(device=p.device, dtype=torch.float32)
            elif capturable is False and not group.get("fused"):
                # torch keeps a plain Adam's step counter on the host
                optimizer.state[p]["step"] = step.cpu()
