"""The RIM update-step family: score preprocessing and the state update with its loss term.

Shapes: score, x, g, x_true, m, v [B, C, *S]; w broadcastable to x. Implementations: the references, and the
C++/CUDA kernels of ``rim_fast._C`` (``_cpp``; one math header for the CPU and CUDA kernels).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import _cpp, reference
from ._dispatch import Impl, Op

Tensor = torch.Tensor
PREPROCESSING = reference.PREPROCESSING

_preprocess = Op("preprocess_score", reference.preprocess_score)
_update = Op("update_state", reference.update_state)


def preprocess_score(score: Tensor, m: Optional[Tensor], v: Optional[Tensor], t: Union[int, Tensor], *,
                     method: str, beta_1: float, beta_2: float, epsilon: float):
    """The score as the RIM feeds it to its network at step t (0-based); returns (out, m', v').

    method: one of ``PREPROCESSING`` ("identity", "arcsinh", "adam", "rmsprop" (torch_rim's, whose second moment
    never updates), "rmsprop_fixed"); m, v: the moments [B, C, *S] (None for the stateless methods);
    t: an int, or a 0-dim tensor (a tensor keeps a per-step compiled loop from recompiling). See
    ``reference.preprocess_score`` for the formulas."""
    return _preprocess(score, m, v, t, method, beta_1, beta_2, epsilon)


def update_state(x: Tensor, g: Tensor, x_true: Optional[Tensor] = None,
                 w: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """x' = x + g, and with x_true this step's loss term sum(w (x' - x_true)^2) (w = 1 when None).

    x, g, x_true: [B, C, *S]; w: broadcastable to x. Returns (x', 0-dim loss term or None)."""
    return _update(x, g, x_true, w)


_preprocess.register(Impl("cpp", _cpp.preprocess_score, usable=_cpp.preprocess_usable, auto=_cpp.preprocess_auto,
                          missing=_cpp.missing, why_not=_cpp.preprocess_why_not))
_update.register(Impl("cpp", _cpp.update_state, usable=_cpp.update_usable, auto=_cpp.update_auto,
                      missing=_cpp.missing, why_not=_cpp.update_why_not))
