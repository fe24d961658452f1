"""torch_rim's checkpoint directory layout, read and written safely.

A directory holds ``script_params.json`` (fit arguments), ``model_hparams.json`` (model and RIM
hyperparameters), ``checkpoint_{cost:.4e}_{index:03d}.pt`` (model state_dict, EMA weights when used),
``optimizer_{cost:.4e}_{index:03d}.pt`` and ``score_sheet.txt``. The index is the last integer of the file
name (torch_rim's rule). rim_fast pairs model and optimizer files by that index (torch_rim paired two
unordered globs), and writes every file atomically (temporary file, fsync, rename).

rim_fast adds ``checkpoint_metrics.json`` (each kept index's epoch and monitored values: ``best_checkpoint``
reads it) and, per index, ``trainstate_{cost:.4e}_{index:03d}.pth``: what an exact resume needs beyond the model
and optimizer (epoch, optimizer-step count, patience, loss history, scheduler, EMA, raw weights under EMA, RNG
states). Its ``.pth`` suffix keeps it out of torch_rim's ``*.pt`` globs, so torch_rim reads and prunes such a
directory as its own. An index is written trainstate, optimizer, then model file: the model file commits it,
so a listed index is complete whenever the writer was killed; pruning removes the model file first. The
metrics of an index are recorded before its model file, so every listed index that fit wrote has them."""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch.nn import Module

from .architectures import ARCHITECTURES
from .definitions import DEVICE
from .metrics import MONITORS
from .validation import choice, warn

_INDEX = re.compile(r"[0-9]+")
_SCORE = re.compile(r"([0-9]{1}.[0-9]+e[+-][0-9]{2})")


TRAINSTATE_SUFFIX = ".pth"
_KINDS = (("checkpoint", ".pt"), ("optimizer", ".pt"), ("trainstate", TRAINSTATE_SUFFIX))


@dataclass
class CheckpointFiles:
    index: int
    score: Optional[float]
    model: str
    optimizer: Optional[str]
    trainstate: Optional[str] = None


def _parse(name: str):
    numbers = _INDEX.findall(name)
    if not numbers:
        return None, None
    scores = _SCORE.findall(name)
    return int(numbers[-1]), (float(scores[-1]) if scores else None)


def _indexed_files(directory: str) -> dict:
    """{kind: {index: (path, score)}} for the checkpoint, optimizer and trainstate files of a directory."""
    tables = {kind: {} for kind, _ in _KINDS}
    if not os.path.isdir(directory):
        return tables
    for name in os.listdir(directory):
        if name.startswith("."):
            continue
        for kind, suffix in _KINDS:
            if name.startswith(kind) and name.endswith(suffix):
                index, score = _parse(name)
                if index is not None:
                    tables[kind][index] = (os.path.join(directory, name), score)
    return tables


def list_checkpoints(directory: str) -> list[CheckpointFiles]:
    """Model checkpoints of a directory, sorted by index, each with the optimizer (and trainstate) file of the
    same index."""
    tables = _indexed_files(directory)
    models, optimizers, states = tables["checkpoint"], tables["optimizer"], tables["trainstate"]
    return [CheckpointFiles(i, models[i][1], models[i][0], optimizers.get(i, (None,))[0], states.get(i, (None,))[0])
            for i in sorted(models)]


def next_index(directory: str) -> int:
    """1 + the largest index of any checkpoint, optimizer or trainstate file (0 when none): a new checkpoint
    never shares its index with a file left over from an interrupted or corrupt one."""
    indices = [i for table in _indexed_files(directory).values() for i in table]
    return max(indices, default=0) + 1


def prune(directory: str, models_to_keep: int, current: int, keep: Optional[set] = None) -> list[str]:
    """Keep the newest ``models_to_keep`` complete checkpoints (or, given ``keep``, those indices); remove the
    others (model file first, so an interrupted prune never leaves a listed index without its other files) and
    orphaned optimizer/trainstate files of indices below ``current`` (left by an interrupted write or prune).
    Returns the removed paths."""
    tables = _indexed_files(directory)
    if keep is None:
        keep = set(sorted(tables["checkpoint"])[-models_to_keep:])
    removed = []
    for index in sorted(set(tables["checkpoint"]) - keep):
        for kind, _ in _KINDS:
            if index in tables[kind]:
                removed.append(tables[kind].pop(index)[0])
    for kind in ("optimizer", "trainstate"):
        for index, (path, _) in tables[kind].items():
            if index not in tables["checkpoint"] and index < current:
                removed.append(path)
    for path in removed:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
    return removed


def remove_temporary_files(directory: str) -> list[str]:
    """Remove the temporary files of atomic writes that a killed writer left behind (one writer per
    directory: call it before writing, never while another process writes there)."""
    removed = []
    for name in os.listdir(directory):
        if name.startswith(".tmp_"):
            path = os.path.join(directory, name)
            try:
                os.remove(path)
                removed.append(path)
            except OSError:
                pass
    return removed


def checkpoint_name(kind: str, cost: float, index: int) -> str:
    """torch_rim's file name; a non-finite cost is written so that the name still parses."""
    cost_text = f"{cost:.4e}" if cost == cost and abs(cost) != float("inf") else "9.9999e+99"
    suffix = TRAINSTATE_SUFFIX if kind == "trainstate" else ".pt"
    return f"{kind}_{cost_text}_{index:03d}{suffix}"


def _atomic_write(path: str, write) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=os.path.basename(path), dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to ``path`` atomically: a reader sees the old file or the new one, never half of one."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_json(obj: Any, path: str) -> None:
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=4, default=_json_default).encode()))


def _json_default(value):
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, torch.device):
        return str(value)
    return repr(value)


def load_file(path: str, map_location=None) -> Any:
    """torch.load with a clear error naming the file when it is unreadable, truncated or corrupt."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - torch raises many types for a corrupt file
        raise RuntimeError(f"checkpoint file {path!r} is unreadable or corrupt ({type(e).__name__}: {e})") from e


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise RuntimeError(f"{path!r} is not valid JSON ({e})") from e


def append_score_sheet(directory: str, index: int, cost: float) -> None:
    """Add torch_rim's ``{index} {cost}`` line to score_sheet.txt (rewritten atomically, never half a line)."""
    path = os.path.join(directory, "score_sheet.txt")
    old = b""
    if os.path.exists(path):
        with open(path, "rb") as f:
            old = f.read()
        if old and not old.endswith(b"\n"):
            old += b"\n"
    _atomic_write(path, lambda f: f.write(old + f"{index} {cost}\n".encode()))


def atomic_write_bytes(data_writer, path: str) -> None:
    """Write a file atomically with ``data_writer(f)`` (a binary file object)."""
    _atomic_write(path, data_writer)


def load_architecture(checkpoints_directory, model: Union[str, Module] = None, dimensions=1,
                      hyperparameters=None, device=DEVICE) -> tuple:
    """Build (or take) the model of a checkpoints directory and load its latest readable checkpoint
    (torch_rim's ``rim.utils.load_architecture``, also importable from ``rim_fast.utils``).

    Returns (model, hparams). ``model`` may be None (read ``model_hparams.json``), an architecture name
    ("hourglass", "unet") or a module; ``hyperparameters`` override the saved ones."""
    if not isinstance(checkpoints_directory, (str, os.PathLike)) or not os.path.isdir(checkpoints_directory):
        raise ValueError(f"checkpoints_directory {checkpoints_directory!r} is not an existing directory")
    if model is None or isinstance(model, str):
        model, hparams = _build_architecture(checkpoints_directory, model, dimensions, hyperparameters, device)
    else:
        hparams = getattr(model, "hyperparameters", {})
    found = list_checkpoints(checkpoints_directory)
    for files in reversed(found):
        try:
            state = load_file(files.model, map_location=device)
        except RuntimeError as e:
            warn(f"{e}; trying the previous checkpoint")
            continue
        model.load_state_dict(state)
        break
    else:
        if found:
            raise RuntimeError(f"no readable checkpoint in {checkpoints_directory!r}")
    return model, hparams


def _build_architecture(directory: str, name: Optional[str], dimensions, hyperparameters, device) -> tuple:
    """(model, hparams) from ``model_hparams.json`` (required when ``name`` is None), updated with
    ``hyperparameters``; the architecture ``name``, else the saved one, else "hourglass"."""
    hparams_path = os.path.join(directory, "model_hparams.json")
    if os.path.exists(hparams_path):
        hparams = read_json(hparams_path)
    elif name is None:
        raise ValueError(f"checkpoints_directory {directory!r} has no model_hparams.json; pass the model")
    else:
        hparams = {}
    hparams.update(hyperparameters or {})
    hparams.setdefault("dimensions", dimensions)
    name = choice("model", name or hparams.get("architecture", "hourglass"), ARCHITECTURES, ignore_case=True)
    return ARCHITECTURES[name](**hparams).to(device), hparams


METRICS_TABLE = "checkpoint_metrics.json"


def read_metrics(directory: str) -> dict:
    """{index: {"epoch": ..., "train_loss": ..., "val_psnr": ..., ...}} of ``checkpoint_metrics.json`` ({} when
    absent), for every index recorded, listed or not."""
    path = os.path.join(directory, METRICS_TABLE)
    if not os.path.exists(path):
        return {}
    table = read_json(path)
    return {int(k): v for k, v in table.get("checkpoints", {}).items()}


def record_metrics(directory: str, index: int, values: dict) -> dict:
    """Add ``index``'s values to ``checkpoint_metrics.json`` (rewritten atomically), dropping the indices whose model
    file is gone. Returns the table."""
    listed = {f.index for f in list_checkpoints(directory)}
    table = {i: v for i, v in read_metrics(directory).items() if i in listed}
    table[index] = dict(values)
    atomic_write_json({"checkpoints": {str(i): table[i] for i in sorted(table)}},
                      os.path.join(directory, METRICS_TABLE))
    return table


def ranked(table: dict, indices, monitor: str) -> list[int]:
    """The ``indices`` that have a finite ``monitor`` value in ``table``, best first (the newer of two equal)."""
    sign = -1.0 if MONITORS.get(monitor, "min") == "max" else 1.0
    scored = []
    for i in indices:
        value = table.get(i, {}).get(monitor)
        if isinstance(value, (int, float)) and value == value and abs(value) != float("inf"):
            scored.append((sign * value, -i))
    return [-negative for _, negative in sorted(scored)]


def best_checkpoint(directory: str, monitor: str = "val_loss") -> Optional[CheckpointFiles]:
    """The listed checkpoint with the best recorded ``monitor`` value (``"val_psnr"``, ``"val_ssim"``: the highest;
    losses, MSE, NMSE: the lowest), None when no listed checkpoint has one. Load it with
    ``rim.model.load_state_dict(torch.load(best_checkpoint(directory, "val_psnr").model))``."""
    choice("monitor", monitor, MONITORS)
    found = {f.index: f for f in list_checkpoints(directory)}
    order = ranked(read_metrics(directory), found, monitor)
    return found[order[0]] if order else None
