"""torch_rim's checkpoint directory layout, read and written safely.

A directory holds ``script_params.json`` (fit arguments), ``model_hparams.json`` (model and RIM
hyperparameters), ``checkpoint_{cost:.4e}_{index:03d}.pt`` (model state_dict, EMA weights when used),
``optimizer_{cost:.4e}_{index:03d}.pt`` and ``score_sheet.txt``. The index is the last integer of the file
name (torch_rim's rule). rim_fast pairs model and optimizer files by that index (torch_rim paired two
unordered globs), and writes every file atomically (temporary file, fsync, rename)."""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

import torch

_INDEX = re.compile(r"[0-9]+")
_SCORE = re.compile(r"([0-9]{1}.[0-9]+e[+-][0-9]{2})")


@dataclass
class CheckpointFiles:
    index: int
    score: Optional[float]
    model: str
    optimizer: Optional[str]


def _parse(name: str):
    numbers = _INDEX.findall(name)
    if not numbers:
        return None, None
    scores = _SCORE.findall(name)
    return int(numbers[-1]), (float(scores[-1]) if scores else None)


def list_checkpoints(directory: str) -> list[CheckpointFiles]:
    """Model checkpoints of a directory, sorted by index, each with the optimizer file of the same index."""
    if not os.path.isdir(directory):
        return []
    models, optimizers = {}, {}
    for name in os.listdir(directory):
        if not name.endswith(".pt") or name.startswith("."):
            continue
        for prefix, table in (("checkpoint", models), ("optimizer", optimizers)):
            if name.startswith(prefix):
                index, score = _parse(name)
                if index is not None:
                    table[index] = (os.path.join(directory, name), score)
    return [CheckpointFiles(i, models[i][1], models[i][0], optimizers.get(i, (None,))[0])
            for i in sorted(models)]


def checkpoint_name(kind: str, cost: float, index: int) -> str:
    """torch_rim's file name; a non-finite cost is written so that the name still parses."""
    cost_text = f"{cost:.4e}" if cost == cost and abs(cost) != float("inf") else "9.9999e+99"
    return f"{kind}_{cost_text}_{index:03d}.pt"


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
