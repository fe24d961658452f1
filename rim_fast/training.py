"""RIM.fit: torch_rim's training loop and checkpoint directory, with its bookkeeping bugs fixed.

Fixed here (no trained model depends on them): resuming a given ``model_checkpoint`` (bug 9), optimizer files
paired with model files by index (bugs 10, 11), batches moved to the RIM's device (12), patience reset after an
improvement (13), per-epoch averages over the iterations actually run (14), ``logdir`` created when missing
and a retention policy that keeps ``models_to_keep`` checkpoints whatever their names (20), no device sync
per step (19: the loss is summed on the device and read once per epoch), every file written atomically."""
from __future__ import annotations

import math
import os
import time
from datetime import datetime

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import checkpoints as ckpt
from .utils import NullEMA


def _positive_int(name, value, allow_zero=False):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < (0 if allow_zero else 1):
        raise ValueError(f"{name} must be an int >= {0 if allow_zero else 1}, got {value!r}")


def _check_fit_args(epochs, learning_rate, batch_size, patience, checkpoints, models_to_keep, warmup, clip,
                    ema_decay, n_iterations_in_epoch):
    _positive_int("epochs", epochs, allow_zero=True)
    _positive_int("batch_size", batch_size)
    _positive_int("checkpoints", checkpoints)
    _positive_int("models_to_keep", models_to_keep)
    _positive_int("warmup", warmup, allow_zero=True)
    if n_iterations_in_epoch is not None:
        _positive_int("n_iterations_in_epoch", n_iterations_in_epoch)
    if not isinstance(learning_rate, (int, float)) or not learning_rate > 0 or math.isinf(learning_rate):
        raise ValueError(f"learning_rate must be a finite number > 0, got {learning_rate!r}")
    if not isinstance(patience, (int, float)) or not patience > 0:
        raise ValueError(f"patience must be a number > 0 (float('inf') disables it), got {patience!r}")
    if not isinstance(clip, (int, float)) or clip < 0:
        raise ValueError(f"clip must be a number >= 0, got {clip!r}")
    if not isinstance(ema_decay, (int, float)) or not 0 <= ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}")


def _to_device(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def fit(rim, dataset, epochs=100, learning_rate=1e-4, scheduler=None, batch_size=1, shuffle=False,
        patience=float("inf"), tolerance=0, max_time=float("inf"), warmup=0, clip=0., checkpoints_directory=None,
        model_checkpoint=None, checkpoints=10, models_to_keep=3, ema_decay=0, seed=None, logname=None,
        logdir=None, n_iterations_in_epoch=None, logname_prefix="rim", verbose=0, compile=False):
    """Train ``rim.model`` with Adam on (y, x_true, *args) batches; returns the list of epoch losses.

    Arguments as torch_rim's RIM.fit: ``scheduler`` is a callable optimizer -> scheduler (stepped per epoch),
    ``warmup`` linear learning-rate warm-up steps, ``clip`` gradient-norm clipping, ``checkpoints`` the epoch
    interval between saves, ``max_time`` in hours, ``ema_decay`` > 0 saves EMA weights. With
    ``checkpoints_directory`` (or ``logdir``/``logname``) training resumes from its latest checkpoint, or from
    ``model_checkpoint`` (an index). ``compile=True`` compiles the RIM loop (forward and backward) first;
    ``verbose=-1`` silences the progress bar."""
    _check_fit_args(epochs, learning_rate, batch_size, patience, checkpoints, models_to_keep, warmup, clip,
                    ema_decay, n_iterations_in_epoch)
    device = rim.device
    if compile and rim.__dict__.get("_compiled_loop") is None:
        rim.compile()
    optimizer = torch.optim.Adam(rim.model.parameters(), lr=learning_rate)
    if scheduler is not None:
        scheduler = scheduler(optimizer)
    else:
        scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.)
    if ema_decay > 0:
        from torch_ema import ExponentialMovingAverage
        ema = ExponentialMovingAverage(rim.model.parameters(), decay=ema_decay)
    else:
        ema = NullEMA()
    if seed is not None:
        # before the DataLoader draws its first shuffle order
        torch.manual_seed(seed)
    dataloader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=False)
    if len(dataloader) == 0:
        raise ValueError("dataset is empty")
    if n_iterations_in_epoch is None:
        n_iterations_in_epoch = len(dataloader)

    if checkpoints_directory is not None:
        logname = os.path.split(os.path.normpath(checkpoints_directory))[-1]
    elif logname is None:
        logname = logname_prefix + "_" + datetime.now().strftime("%y%m%d%H%M%S")
    save_checkpoint = checkpoints_directory is not None or logdir is not None
    latest_checkpoint = 0
    if save_checkpoint:
        if checkpoints_directory is None:
            checkpoints_directory = os.path.join(logdir, logname)
        if not os.path.isdir(checkpoints_directory):
            os.makedirs(checkpoints_directory, exist_ok=True)
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

        found = ckpt.list_checkpoints(checkpoints_directory)
        if model_checkpoint is not None:
            chosen = [f for f in found if f.index == model_checkpoint]
            if not chosen:
                raise ValueError(f"model_checkpoint={model_checkpoint!r} not found in {checkpoints_directory!r}; "
                                 f"available: {[f.index for f in found]}")
            candidates = chosen
        else:
            candidates = list(reversed(found))
        for files in candidates:
            try:
                model_state = ckpt.load_file(files.model, map_location=device)
                opt_state = ckpt.load_file(files.optimizer, map_location=device) if files.optimizer else None
            except RuntimeError as e:
                if model_checkpoint is not None:
                    raise
                tqdm.write(f"{e}; trying the previous checkpoint")
                continue
            rim.model.load_state_dict(model_state)
            if opt_state is not None:
                optimizer.load_state_dict(opt_state)
            latest_checkpoint = files.index
            if verbose:
                tqdm.write(f"Loaded checkpoint {files.index} of {logname}")
            break

    best_loss = float("inf")
    initial_patience = patience
    losses = []
    step = 0
    global_start = time.time()
    estimated_time_for_epoch = 0
    out_of_time = False
    for epoch in (pbar := tqdm(range(epochs), disable=verbose < 0)):
        if (time.time() - global_start) > max_time * 3600 - estimated_time_for_epoch:
            break
        epoch_start = time.time()
        cost = torch.zeros((), device=device)
        data_iter = iter(dataloader)
        for _ in range(n_iterations_in_epoch):
            try:
                batch = next(data_iter)
            except StopIteration:
                data_iter = iter(dataloader)
                batch = next(data_iter)
            if not isinstance(batch, (list, tuple)) or len(batch) < 2:
                raise ValueError("the dataset must yield tuples (y, x_true, *args) for the score function; got "
                                 f"{type(batch).__name__}")
            y, x_true, *args = (_to_device(b, device) for b in batch)
            optimizer.zero_grad()
            loss = rim.loss_fn(y, x_true, *args)
            loss.backward()
            if step < warmup:
                for g in optimizer.param_groups:
                    g["lr"] = learning_rate * np.minimum(step / warmup, 1.0)
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(rim.model.parameters(), max_norm=clip)
            optimizer.step()
            ema.update()
            cost += loss.detach()
            step += 1
        scheduler.step()
        epoch_time = time.time() - epoch_start
        cost = float(cost) / n_iterations_in_epoch
        pbar.set_description(f"Epoch {epoch + 1:d} | Cost: {cost:.1e} |")
        losses.append(cost)
        if verbose >= 2:
            tqdm.write(f"epoch {epoch} | cost {cost:.2e} | time per step {epoch_time / n_iterations_in_epoch:.2e} s")
        elif verbose == 1 and (epoch + 1) % checkpoints == 0:
            tqdm.write(f"epoch {epoch} | cost {cost:.1e}")
        if np.isnan(cost):
            tqdm.write("Model exploded and returns NaN")
            break
        if cost < (1 - tolerance) * best_loss:
            best_loss = cost
            patience = initial_patience
        else:
            patience -= 1
        if (time.time() - global_start) > max_time * 3600:
            out_of_time = True
        if save_checkpoint and ((epoch + 1) % checkpoints == 0 or patience <= 0 or epoch == epochs - 1
                                or out_of_time):
            latest_checkpoint += 1
            with ema.average_parameters():
                ckpt.atomic_save(rim.model.state_dict(), os.path.join(
                    checkpoints_directory, ckpt.checkpoint_name("checkpoint", cost, latest_checkpoint)))
            ckpt.atomic_save(optimizer.state_dict(), os.path.join(
                checkpoints_directory, ckpt.checkpoint_name("optimizer", cost, latest_checkpoint)))
            with open(os.path.join(checkpoints_directory, "score_sheet.txt"), mode="a") as f:
                f.write(f"{latest_checkpoint} {cost}\n")
            for old in ckpt.list_checkpoints(checkpoints_directory)[:-models_to_keep]:
                for path in (old.model, old.optimizer):
                    if path and os.path.exists(path):
                        os.remove(path)
        if patience <= 0:
            tqdm.write("Reached patience")
            break
        if out_of_time:
            tqdm.write("Out of time")
            break
        if epoch > 0:
            estimated_time_for_epoch = epoch_time
    ema.copy_to(rim.model.parameters())
    if verbose >= 0:
        tqdm.write(f"Finished training after {(time.time() - global_start) / 3600:.3f} hours.")
    return losses
