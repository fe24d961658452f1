"""torch_rim.utils: NullEMA, get_activation, load_architecture (the last two live in ``layers.activation`` and
``checkpoints``; this module keeps torch_rim's import path)."""
from __future__ import annotations

import contextlib

from .checkpoints import load_architecture
from .layers.activation import get_activation

__all__ = ["NullEMA", "get_activation", "load_architecture"]


class NullEMA:
    """An EMA emulator that does nothing so that ema_decay=0 can be supported."""

    def update(self, parameters=None):
        pass

    def copy_to(self, parameters=None):
        pass

    def store(self, parameters=None):
        pass

    def restore(self, parameters=None):
        pass

    def average_parameters(self, parameters=None):
        return contextlib.nullcontext()

    def to(self, device=None, dtype=None):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state_dict):
        pass
