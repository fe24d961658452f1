"""rim_fast.validation: each validator accepts what it should, returns the normalised value, and names the
argument, the expectation and the value given when it rejects one."""
import numpy as np
import pytest
import torch

from rim_fast import validation as v


def test_integer():
    assert v.integer("n", 3) == 3
    assert type(v.integer("n", np.int64(3))) is int
    assert v.integer("n", 0, minimum=0) == 0
    assert v.integer("n", None, optional=True) is None
    for bad in (0, -1, 2.0, True, "3", None):
        with pytest.raises(ValueError, match=rf"^n must be an int >= 1, got {bad!r}$".replace("(", r"\(")):
            v.integer("n", bad)
    with pytest.raises(ValueError, match=r"^GRU: k must be None or an int >= 0 \(note\), got -1$"):
        v.integer("k", -1, minimum=0, optional=True, note=" (note)", owner="GRU")


def test_integers():
    assert v.integers("ch_mult", [2, np.int32(3)]) == (2, 3)
    for bad in ((), (1, 0), (1, 2.0), (True,)):
        with pytest.raises(ValueError, match=r"ch_mult must be a non-empty sequence of ints >= 1"):
            v.integers("ch_mult", bad)
    for bad in (3, "12", None):
        with pytest.raises(TypeError, match=r"ch_mult must be a non-empty sequence of ints >= 1"):
            v.integers("ch_mult", bad)


def test_number():
    v.number("lr", 1e-3, above=0, finite=True)
    v.number("lr", np.float32(0.5), at_least=0, below=1)
    v.number("patience", float("inf"), above=0)
    cases = [(dict(above=0), 0, r"lr must be a number > 0, got 0"),
             (dict(above=0, finite=True), float("inf"), r"lr must be a finite number > 0, got inf"),
             (dict(at_least=0, below=1), 1, r"lr must be a number in \[0, 1\), got 1"),
             (dict(at_least=0), float("nan"), r"lr must be a number >= 0, got nan"),
             (dict(at_least=0), True, r"lr must be a number >= 0, got True"),
             (dict(above=0, note=" (hours)"), "1", r"lr must be a number > 0 \(hours\), got '1'")]
    for bounds, bad, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            v.number("lr", bad, **bounds)


def test_flag():
    v.flag("f", True)
    v.flag("f", None, optional=True)
    for bad in (1, "yes", None):
        with pytest.raises(TypeError, match=r"f must be a bool"):
            v.flag("f", bad)


def test_choice():
    assert v.choice("m", "adam", ("Identity", "ADAM"), ignore_case=True) == "ADAM"
    assert v.choice("d", np.int64(2), (1, 2, 3)) == 2
    assert v.choice("c", None, (None, False, True, "warn")) is None
    # by kind: 0 is not False, 1 is not True
    for bad in (0, 1, "False"):
        with pytest.raises(ValueError, match=r"c must be one of \(False, True, 'warn'\), got"):
            v.choice("c", bad, (False, True, "warn"))
    with pytest.raises(ValueError, match=r"m must be one of \('zeros', 'model'\), got 'Zeros'"):
        v.choice("m", "Zeros", ("zeros", "model"))
    with pytest.raises(ValueError, match=r"\(any case\), got 'adamw'"):
        v.choice("m", "adamw", ("ADAM",), ignore_case=True)
    with pytest.raises(TypeError, match=r"m must be a str, one of \('ADAM',\)"):
        v.choice("m", 1, ("ADAM",))


def test_function_and_spatial_dimensions_and_device():
    v.function("f", len)
    with pytest.raises(TypeError, match=r"f must be callable \(x -> y\), got int"):
        v.function("f", 3, note=" (x -> y)")
    assert v.spatial_dimensions(2) == 2
    with pytest.raises(ValueError, match=r"The dimensions 0 is not supported. Only 1, 2 and 3 dimensional"):
        v.spatial_dimensions(0)
    with pytest.raises(ValueError, match=r"Only 0, 1, 2 and 3 dimensional"):
        v.spatial_dimensions(4, allowed=(0, 1, 2, 3))
    assert v.as_device("device", "cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device 'gpu0' is not a torch device"):
        v.as_device("device", "gpu0")


def test_tensor_and_same_device():
    cpu, cuda, cuda1 = torch.device("cpu"), torch.device("cuda"), torch.device("cuda", 1)
    assert v.same_device(cuda, cuda1) and not v.same_device(cpu, cuda)
    assert not v.same_device(torch.device("cuda", 0), cuda1)
    v.tensor("x", torch.zeros(2), cpu)
    v.tensor("y", torch.zeros(2, dtype=torch.complex64), cpu, allow_complex=True)
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor, got list"):
        v.tensor("x", [1.0], cpu)
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor, got dtype torch.complex64"):
        v.tensor("x", torch.zeros(2, dtype=torch.complex64), cpu)
    with pytest.raises(ValueError, match=r"x is on meta but the RIM runs on cpu"):
        v.tensor("x", torch.zeros(2, device="meta"), cpu)
