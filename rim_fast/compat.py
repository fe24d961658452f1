"""torch_rim 0.2.9 compatibility switches.

By default (``compat="torch_rim"``) rim_fast reproduces torch_rim's numerics, including the quirks that
trained checkpoints depend on. ``compat="fixed"`` corrects all of them; a ``Compat(...)`` or a dict picks
fixes one by one. Every flag is True when the torch_rim behaviour is kept.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class Compat:
    #: GRUBlock returns the *incoming* first-GRU state, as torch_rim's does: gru1 is stateless.
    stale_gru_state: bool = True
    #: RMSProp never updates its second moment, as torch_rim's: the output is score / epsilon.
    rmsprop_without_second_moment: bool = True
    #: initialization "model" calls model(x, score, y, h), as torch_rim does: the observation is fed as the score.
    model_init_swaps_y_and_score: bool = True
    #: Conv*dSame (stride > 1) pads the last axis with the first axis' amount (score_models' F.pad order).
    conv_same_axis_swap: bool = True
    #: RIM(checkpoints_directory=...) ignores the saved T, preprocessing, initialisation, epsilon and betas
    #: and uses the constructor's defaults, as torch_rim does; fixed: unspecified arguments take the saved values.
    ignore_saved_rim_settings: bool = True

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def name(self) -> Union[str, dict]:
        if self == TORCH_RIM:
            return "torch_rim"
        if self == FIXED:
            return "fixed"
        return self.as_dict()


TORCH_RIM = Compat()
FIXED = Compat(False, False, False, False, False)

CompatLike = Union[str, dict, Compat, None]


def resolve(compat: CompatLike) -> Compat:
    """``"torch_rim"`` (or None), ``"fixed"``, a dict of flags (others keep torch_rim's), or a Compat."""
    if compat is None or isinstance(compat, Compat):
        return compat or TORCH_RIM
    if isinstance(compat, str):
        if compat.lower() in ("torch_rim", "compat", "default"):
            return TORCH_RIM
        if compat.lower() == "fixed":
            return FIXED
        raise ValueError(f"compat={compat!r}: expected 'torch_rim', 'fixed', a dict of flags or a Compat")
    if isinstance(compat, dict):
        fields = {f.name for f in dataclasses.fields(Compat)}
        unknown = set(compat) - fields
        if unknown:
            raise ValueError(f"compat: unknown flag(s) {sorted(unknown)}; expected some of {sorted(fields)}")
        return Compat(**compat)
    raise TypeError(f"compat: expected a str, dict or Compat, got {type(compat).__name__}")
