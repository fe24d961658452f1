"""RIM.export: predict as a torch.export program (score function, preprocessing and link function included) that
is saved, loaded in a new process without constructing a RIM, and equals predict within 1e-5; with the rim_fast
ops kept as custom ops through their fakes, or the references only; and an AOTInductor package of it, loaded in a
new process without rim_fast. AOTInductor compiles C++ (~15-50 s on our 2 cores): one small case."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rim_fast
from rim_fast import _ext

#: RIM.export refuses torch 2.6 (no torch.compiler.is_exporting): tests/test_errors.py tests that
NEW_ENOUGH = hasattr(torch.compiler, "is_exporting")
pytestmark = pytest.mark.skipif(not NEW_ENOUGH, reason="RIM.export needs a torch with torch.compiler.is_exporting")

TOL = 1e-5


def _blur2d(v):
    k = torch.tensor([0.25, 0.5, 0.25])
    return F.conv2d(v, torch.outer(k, k)[None, None].to(v.dtype), padding=1)


def _score_fn(x, y, sigma):
    # A^T (y - A x) / sigma^2 with A a symmetric blur; sigma: [B]
    return _blur2d(y - _blur2d(x)) / sigma.view(-1, 1, 1, 1) ** 2


def _energy_fn(x, y):
    # -log-likelihood of Gaussian noise around a 3-tap blur, one value per sample: [B]
    ax = F.conv1d(x, torch.tensor([[[0.25, 0.5, 0.25]]]), padding=1)
    return 0.5 * ((y - ax) ** 2).sum(dim=(1, 2))


class TinyNet(rim_fast.Model):
    """A user's own backbone that calls a rim_fast op (tanh, a C++ kernel)."""

    def __init__(self):
        super().__init__()
        self.channels = 1
        self.conv = nn.Conv1d(3, 2, 3, padding=1)

    def initalize_hidden_states(self, dimensions, batch_size):
        return torch.zeros(batch_size, 1, *dimensions)

    def forward(self, x, y, score, h):
        out = rim_fast.ops.tanh(self.conv(torch.cat([x, score, h], 1)))
        return out[:, :1], out[:, 1:]


def _rims():
    torch.manual_seed(0)
    hourglass = rim_fast.RIM((16, 16), rim_fast.Hourglass(1, dimensions=2, nf=8, ch_mult=(1, 2), hidden_units=8),
                             score_fn=_score_fn, T=3, score_preprocessing_method="ADAM", device="cpu",
                             link_function=F.softplus, inverse_link_function=lambda x: torch.log(torch.expm1(x)))
    energy = rim_fast.RIM((16,), rim_fast.Hourglass(1, dimensions=1, nf=4, ch_mult=(1,), hidden_units=4),
                          energy_fn=_energy_fn, T=2, score_preprocessing_method="arcsinh", device="cpu")
    tiny = rim_fast.RIM((8,), TinyNet(), energy_fn=lambda x, y: 0.5 * ((y - x) ** 2).sum(dim=(1, 2)), T=2,
                        score_preprocessing_method="ADAM", device="cpu")
    return hourglass, energy, tiny


LOADER = textwrap.dedent("""
    import sys, torch
    folder = sys.argv[1]
    inputs = torch.load(f"{folder}/inputs.pt")
    out = {}
    with torch.no_grad():
        # the programs of torch's own ops load and run with torch alone
        out["hourglass"] = torch.export.load(f"{folder}/hourglass.pt2").module()(*inputs["hourglass"])
        out["energy"] = torch.export.load(f"{folder}/energy.pt2").module()(*inputs["energy"])
        out["energy_aoti"] = torch._inductor.aoti_load_package(f"{folder}/energy_aoti.pt2")(*inputs["energy"])
        assert "rim_fast" not in sys.modules, "a program needed rim_fast"
        if "tiny" in inputs:
            import rim_fast  # noqa: F401 - registers the rim_fast:: ops that the program calls
            out["tiny"] = torch.export.load(f"{folder}/tiny.pt2").module()(*inputs["tiny"])
    torch.save(out, f"{folder}/outputs.pt")
""")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    hourglass, energy, tiny = _rims()
    gen = torch.Generator().manual_seed(1)
    y2, s2 = torch.rand(2, 1, 16, 16, generator=gen), torch.full((2,), 0.5)
    y1 = torch.randn(3, 1, 16, generator=gen)
    # the program takes another batch size than the example's
    y4, s4 = torch.rand(4, 1, 16, 16, generator=gen), torch.full((4,), 0.3)
    torch.export.save(hourglass.export(y2, s2, dynamic_batch=True), folder / "hourglass.pt2")
    program = energy.export(y1, ops="reference")
    torch.export.save(program, folder / "energy.pt2")
    torch._inductor.aoti_compile_and_package(program, package_path=str(folder / "energy_aoti.pt2"))
    inputs = {"hourglass": (y4, s4), "energy": (y1,)}
    expected = {}
    with torch.no_grad():
        expected["hourglass"] = hourglass.predict(y4, s4)
        expected["energy"] = expected["energy_aoti"] = energy.predict(y1)
        if _ext.module() is not None:
            y = torch.randn(2, 1, 8, generator=gen)
            torch.export.save(tiny.export(y, ops="kernels"), folder / "tiny.pt2")
            inputs["tiny"] = (y,)
            with rim_fast.ops.use_backend("kernels"):
                expected["tiny"] = tiny.predict(y)
    torch.save(inputs, folder / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RIM_FAST_")}
    proc = subprocess.run([sys.executable, "-c", LOADER, str(folder)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return expected, torch.load(folder / "outputs.pt"), (hourglass, energy, tiny)


@pytest.mark.parametrize("case", ["hourglass", "energy", "energy_aoti", "tiny"])
def test_reloaded_program_equals_predict(exported, case):
    expected, outputs, _ = exported
    if case == "tiny" and case not in expected:
        pytest.skip(f"rim_fast._C is not loaded: {_ext.missing()}")
    assert outputs[case].shape == expected[case].shape
    err = ((outputs[case] - expected[case]).abs().max() / expected[case].abs().max()).item()
    assert err <= TOL, (case, err)


def test_program_contents():
    """auto on the CPU traces the references (aten ops only); kernels keeps the rim_fast:: ops, through their
    fakes; the score function (with its vjp through the link function) is in the graph."""
    hourglass, energy, tiny = _rims()
    y2, s2 = torch.rand(2, 1, 16, 16), torch.full((2,), 0.5)
    targets = [str(n.target) for n in hourglass.export(y2, s2).graph.nodes if n.op == "call_function"]
    assert not [t for t in targets if "rim_fast" in t]
    assert "aten.softplus.default" in targets and "aten.softplus_backward.default" in targets
    if _ext.module() is not None:
        targets = [str(n.target) for n in tiny.export(torch.randn(2, 1, 8), ops="kernels").graph.nodes]
        assert {"rim_fast.preprocess_adam.default", "rim_fast.tanh.default"} <= set(targets)


def test_export_leaves_the_rim_as_it_was():
    hourglass, _, _ = _rims()
    before, backend = rim_fast.rim.vjp, rim_fast.ops.backend()
    hourglass.export(torch.rand(2, 1, 16, 16), torch.full((2,), 0.5))
    assert rim_fast.rim.vjp is before is torch.func.vjp
    assert hourglass.cuda_graphs is True and rim_fast.ops.backend() == backend
    with pytest.raises(ValueError, match="ops must be one of"):
        hourglass.export(torch.rand(2, 1, 16, 16), torch.full((2,), 0.5), ops="fast")


class _Branch(nn.Module):
    """x + 1 where rim_fast's ops see torch.export tracing, x - 1 elsewhere."""
    def forward(self, x):
        from rim_fast.ops._dispatch import exporting
        return x + 1 if exporting() else x - 1


@pytest.mark.parametrize("folded", [False, True], ids=["this-torch", "is_exporting-folded-to-True"])
def test_ops_see_export_only_under_torch_export(monkeypatch, folded):
    """``exporting()`` is False eagerly and under torch.compile, True under torch.export (strict or not).
    Dynamo in torch 2.7 to 2.11 replaced ``torch.compiler.is_exporting()`` by a constant True under torch.compile
    too (pytorch#176347): ``folded`` stands in for such a torch, whose compiled RIM took export's choices (the CPU's
    fused conv + tanh and the compiled weights' layout copy left out)."""
    from rim_fast.ops import _dispatch
    if folded and not _dispatch._EXPORT_SETS_FLAG:
        pytest.skip("torch 2.7: its strict export does not set the flag, so exporting() keeps calling is_exporting()")
    if folded:  # True wherever Dynamo traces it (is_compiling folds to True there), as such a torch has it
        monkeypatch.setattr(torch.compiler, "is_exporting", lambda: torch.compiler.is_compiling())
    x = torch.zeros(3)
    model = _Branch()
    assert torch.equal(model(x), x - 1)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(model, fullgraph=True)(x), x - 1)
    torch._dynamo.reset()
    for strict in (False, True):
        program = torch.export.export(model, (x,), strict=strict)
        assert torch.equal(program.module()(x), x + 1), strict
