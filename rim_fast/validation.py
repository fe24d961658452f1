"""Argument checks at the API boundary, one function per kind of argument.

Each raises a ValueError (a TypeError where the kind of object is wrong) whose message names the argument, says
what was expected and shows what was given: ``"T must be an int >= 1, got 0"``. ``owner`` prefixes the message
with the class that owns the argument (``"GRUBlock: kernel_size ..."``) where the name alone is ambiguous. The
checks read Python values and tensor metadata only: no host sync, nothing that breaks a torch.compile graph.
``warn`` is the package's warning, shown at the user's line.
"""
from __future__ import annotations

import numbers
import os
import sys
import warnings
from typing import Any, Iterable, Optional

import torch

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_MODULE_CALL = os.path.join("torch", "nn", "modules", "module.py")


def warn(message: str, category=RuntimeWarning) -> None:
    """``warnings.warn`` at the user's line: the first frame outside rim_fast (and torch's ``nn.Module.__call__``),
    however deep in fit or the RIM the condition was found (Python 3.12's ``skip_file_prefixes``, for 3.10 on)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename.startswith(_PACKAGE)
                                 or frame.f_code.co_filename.endswith(_MODULE_CALL)):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)


def _prefix(owner: Optional[str]) -> str:
    return f"{owner}: " if owner else ""


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def integer(name: str, value, minimum: int = 1, *, optional: bool = False, note: str = "",
            owner: Optional[str] = None) -> Optional[int]:
    """An int (numpy integers too, bool not) >= ``minimum``, returned as an int; None passes when ``optional``.

    ``note`` follows the expectation in the message (e.g. ``" (square kernels only)"``)."""
    if value is None and optional:
        return None
    if not _is_int(value) or value < minimum:
        expected = f"{'None or ' if optional else ''}an int >= {minimum}"
        raise ValueError(f"{_prefix(owner)}{name} must be {expected}{note}, got {value!r}")
    return int(value)


def integers(name: str, value, minimum: int = 1, *, note: str = "") -> tuple:
    """A non-empty sequence of ints >= ``minimum`` (``ch_mult``, spatial sizes), returned as a tuple of ints."""
    expected = f"{name} must be a non-empty sequence of ints >= {minimum}{note}, got {value!r}"
    if isinstance(value, (str, bytes)):
        raise TypeError(expected)
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(expected) from None
    if not items or not all(_is_int(n) and n >= minimum for n in items):
        raise ValueError(expected)
    return tuple(int(n) for n in items)


def _range_text(above, at_least, below) -> str:
    if at_least is not None and below is not None:
        return f" in [{at_least}, {below})"
    parts = [f"> {above}" if above is not None else "", f">= {at_least}" if at_least is not None else "",
             f"< {below}" if below is not None else ""]
    return "".join(f" {p}" for p in parts if p)


def number(name: str, value, *, above=None, at_least=None, below=None, finite: bool = False,
           note: str = "") -> None:
    """A real number (bool not) with ``value > above``, ``value >= at_least``, ``value < below`` for the bounds
    given, and finite when ``finite``. NaN fails every bound."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        ok = ((above is None or value > above) and (at_least is None or value >= at_least)
              and (below is None or value < below) and (not finite or abs(value) != float("inf"))
              and value == value)
    if not ok:
        kind = "a finite number" if finite else "a number"
        raise ValueError(f"{name} must be {kind}{_range_text(above, at_least, below)}{note}, got {value!r}")


def flag(name: str, value, *, optional: bool = False) -> None:
    """True or False (None too when ``optional``); a TypeError otherwise (1 and "yes" are not flags)."""
    if not (value is True or value is False or (optional and value is None)):
        raise TypeError(f"{name} must be {'None or ' if optional else ''}a bool, got {value!r}")


def _same_choice(value, option, ignore_case: bool) -> bool:
    # by kind first: 0 is not False, and "True" is not True
    if isinstance(option, str):
        return isinstance(value, str) and (value.lower() == option.lower() if ignore_case else value == option)
    if _is_int(option):
        return _is_int(value) and value == option
    return value is option or (type(value) is type(option) and value == option)


def choice(name: str, value, choices: Iterable, *, ignore_case: bool = False, note: str = "") -> Any:
    """One of ``choices`` (strings compared case-insensitively with ``ignore_case``), returned as spelt in
    ``choices``. A value of another type than every choice is a TypeError when the choices are all strings."""
    choices = tuple(choices)
    for option in choices:
        if _same_choice(value, option, ignore_case):
            return option
    expected = f"one of {choices}{' (any case)' if ignore_case else ''}{note}"
    if all(isinstance(c, str) for c in choices) and not isinstance(value, str):
        raise TypeError(f"{name} must be a str, {expected}, got {type(value).__name__} {value!r}")
    raise ValueError(f"{name} must be {expected}, got {value!r}")


def function(name: str, value, *, note: str = "") -> None:
    """A callable (a function, a module, ...)."""
    if not callable(value):
        raise TypeError(f"{name} must be callable{note}, got {type(value).__name__}")


def spatial_dimensions(value, allowed=(1, 2, 3)) -> int:
    """The number of spatial dimensions of a layer or network, with torch_rim's message."""
    if not _is_int(value) or value not in allowed:
        names = ", ".join(str(d) for d in allowed[:-1]) + f" and {allowed[-1]}"
        raise ValueError(f"The dimensions {value} is not supported. Only {names} dimensional input (not "
                         f"including channels) are.")
    return int(value)


def as_device(name: str, value) -> torch.device:
    """Anything ``torch.device`` accepts, returned as a torch.device."""
    try:
        return torch.device(value)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{name} {value!r} is not a torch device ({e})") from None


def same_device(a: torch.device, b: torch.device) -> bool:
    """Equal devices, an index left out ("cuda") matching any index of its type."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def tensor(name: str, value, device: torch.device, *, allow_complex: bool = False) -> None:
    """A floating-point (or, with ``allow_complex``, complex) tensor on ``device``; metadata only."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not (value.is_floating_point() or (allow_complex and value.is_complex())):
        raise TypeError(f"{name} must be a floating-point{' (or complex)' if allow_complex else ''} tensor, got "
                        f"dtype {value.dtype}")
    if not same_device(value.device, device):
        raise ValueError(f"{name} is on {value.device} but the RIM runs on {device}; move it with "
                         f".to(rim.device)")
