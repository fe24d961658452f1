"""RIM update-step ops. Compiled implementations register themselves here: ``cpp``, the C++/CUDA extension
``rim_fast._C`` (csrc/update_step.*, op layer in ``cpp_update``)."""
from ._dispatch import Impl, Op
from . import cpp_update, reference

_preprocess = Op("preprocess_score", reference.preprocess_score)
_update = Op("update_state", reference.update_state)

_preprocess.register(Impl("cpp", cpp_update.preprocess_score, usable=cpp_update.preprocess_usable,
                          auto=cpp_update.preprocess_auto, missing=cpp_update.missing))
_update.register(Impl("cpp", cpp_update.update_state, usable=cpp_update.update_usable,
                      auto=cpp_update.update_auto, missing=cpp_update.missing))


def preprocess_score(score, m, v, t: int, method: str, beta_1: float, beta_2: float, epsilon: float):
    """Score preprocessing at step t; returns (out, m', v'). See ``reference.preprocess_score``.

    t: the 0-based step, an int or a 0-dim tensor (a tensor keeps a per-step compiled loop from recompiling)."""
    return _preprocess(score, m, v, t, method, beta_1, beta_2, epsilon)


def update_state(x, g, x_true=None, w=None):
    """x' = x + g and this step's loss term; see ``reference.update_state``."""
    return _update(x, g, x_true, w)
