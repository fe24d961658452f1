"""RIM update-step ops. Compiled implementations register themselves here (see csrc/)."""
from ._dispatch import Op
from . import reference

_preprocess = Op("preprocess_score", reference.preprocess_score)
_update = Op("update_state", reference.update_state)


def preprocess_score(score, m, v, t: int, method: str, beta_1: float, beta_2: float, epsilon: float):
    """Score preprocessing at step t; returns (out, m', v'). See ``reference.preprocess_score``."""
    return _preprocess(score, m, v, t, method, beta_1, beta_2, epsilon)


def update_state(x, g, x_true=None, w=None):
    """x' = x + g and this step's loss term; see ``reference.update_state``."""
    return _update(x, g, x_true, w)
