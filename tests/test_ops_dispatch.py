"""The op layer: backend switch, trace(), fallbacks and errors."""
import os
import subprocess
import sys
import warnings

import pytest
import torch

import rim_fast
from rim_fast import ops
from rim_fast.ops._dispatch import OPS, Impl, Op


def test_trace_counts_every_eager_op_call_of_a_rim():
    net = rim_fast.Hourglass(1, dimensions=1, nf=4, hidden_units=6)
    r = rim_fast.RIM((16,), net, score_fn=lambda x, y: y - x, T=3, score_preprocessing_method="ADAM", device="cpu")
    with ops.trace() as calls:
        r.loss_fn(torch.randn(2, 1, 16), torch.randn(2, 1, 16))
    per_op = {}
    for (op, impl), n in calls.items():
        per_op[op] = per_op.get(op, 0) + n
    assert per_op["preprocess_score"] == 3
    assert per_op["update_state"] == 3
    # step 0: both cells take the zero-state path; steps 1-2: gru1 zero-state (compat), gru2 full
    assert per_op["gru_gates_zero_state"] == 2 + 2
    assert per_op["gru_gates_zr"] == per_op["gru_gates_h"] == 2
    assert per_op["conv_same"] == 3 * 2 and per_op["conv_transpose"] == 3 * 2
    with ops.trace() as outside:
        pass
    assert not outside


def _gate_calls(calls) -> dict:
    per_op = {}
    for (op, _), n in calls.items():
        if op.startswith("gru_gates"):
            per_op[op] = per_op.get(op, 0) + n
    return per_op


def test_without_stale_gru_state_only_the_first_step_skips_u_convolutions():
    net = rim_fast.Hourglass(1, dimensions=1, nf=4, hidden_units=6, compat="fixed")
    r = rim_fast.RIM((16,), net, score_fn=lambda x, y: y - x, T=3, device="cpu")
    with ops.trace() as calls:
        r.predict(torch.randn(2, 1, 16))
    # step 0: both cells from the zero state; steps 1-2: both cells in full (gru1's state is no longer zero)
    assert _gate_calls(calls) == {"gru_gates_zero_state": 2, "gru_gates_zr": 4, "gru_gates_h": 4}


class _WithoutHints(torch.nn.Module):
    """A network with torch_rim's interface only: forward(x, y, score, h), no zero_state_hint."""

    def __init__(self, net):
        super().__init__()
        self.net, self.channels = net, net.channels

    def initalize_hidden_states(self, dimensions, batch_size):
        return self.net.initalize_hidden_states(dimensions, batch_size)

    def forward(self, x, y, score, h):
        return self.net(x, y, score, h)


@pytest.mark.parametrize("compat", ["torch_rim", "fixed"])
@pytest.mark.parametrize("init", ["zeros", "model"])
def test_zero_state_hints_change_no_bit(compat, init):
    """The RIM passes the network's own hints; a network without hints gets none, and the same numbers."""
    torch.manual_seed(0)
    net = rim_fast.Hourglass(1, dimensions=1, nf=4, hidden_units=6, compat=compat)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "bias_" in name:
                p.uniform_(-0.5, 0.5)
    kw = dict(score_fn=lambda x, y: y - x, T=3, initialization_method=init, compat=compat, device="cpu")
    hinted, plain = rim_fast.RIM((16,), net, **kw), rim_fast.RIM((16,), _WithoutHints(net), **kw)
    y = torch.randn(2, 1, 16)
    with ops.trace() as hinted_calls:
        a = hinted(y)
    with ops.trace() as plain_calls:
        b = plain(y)
    assert len(a) == len(b) == 3 + (init == "model")
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert _gate_calls(hinted_calls)["gru_gates_zero_state"] > 0
    assert "gru_gates_zero_state" not in _gate_calls(plain_calls)


def test_zero_state_hint_is_not_taken_without_a_promise():
    net = rim_fast.Hourglass(1, dimensions=1, nf=4, hidden_units=6)
    x = torch.randn(2, 1, 16)
    h = torch.randn(2, 6, 4)
    with ops.trace() as calls:
        net(x, None, x, h)
    assert not any(op == "gru_gates_zero_state" for op, _ in calls)


@pytest.fixture
def fake_op():
    """An op of the test's own, unregistered afterwards (the registry lists the library's ops: python -m
    rim_fast.info and its test read it)."""
    op = Op("fake_double", lambda x: 2 * x)
    op.register(Impl("fast", lambda x: x + x, usable=lambda x: x.dtype == torch.float32,
                     auto=lambda x: True))
    yield op
    OPS.pop("fake_double", None)


def test_backend_selection_and_errors(fake_op):
    op = fake_op
    x32, x64 = torch.ones(3), torch.ones(3, dtype=torch.float64)
    with ops.use_backend("auto"), ops.trace() as calls:
        op(x32)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            op(x64)
            op(x64)
    assert calls[("fake_double", "fast")] == 1 and calls[("fake_double", "reference")] == 2
    assert len([w for w in caught if "falls back" in str(w.message)]) == 1  # warned once
    with ops.use_backend("reference"), ops.trace() as calls:
        op(x32)
    assert calls == {("fake_double", "reference"): 1}
    with ops.use_backend("kernels"):
        assert torch.equal(op(x32), 2 * x32)
        with pytest.raises(RuntimeError, match="no kernel of op 'fake_double'"):
            op(x64)
    with pytest.raises(ValueError, match="not one of"):
        with ops.use_backend("fastest"):
            pass


def _run(env_backend):
    env = dict(os.environ, RIM_FAST_BACKEND=env_backend)
    return subprocess.run([sys.executable, "-c", "import rim_fast; print(rim_fast.ops.backend())"],
                          capture_output=True, text=True, env=env)


def test_environment_switch_is_read_and_validated():
    ok = _run("reference")
    assert ok.returncode == 0 and ok.stdout.strip() == "reference"
    bad = _run("bogus")
    assert bad.returncode != 0 and "RIM_FAST_BACKEND='bogus' is not one of" in bad.stderr


def test_reference_gradcheck_float64():
    B, H = 2, 3
    wx = torch.randn(B, 3 * H, 5, dtype=torch.float64, requires_grad=True)
    uzr = torch.randn(B, 2 * H, 5, dtype=torch.float64, requires_grad=True)
    h = torch.randn(B, H, 5, dtype=torch.float64, requires_grad=True)
    b = [torch.randn(H, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradcheck(lambda *a: ops.reference.gru_gates_zr(*a), (wx, uzr, h, b[0], b[1]))
    uh = torch.randn(B, H, 5, dtype=torch.float64, requires_grad=True)
    z = torch.rand(B, H, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.reference.gru_gates_h, (wx, uh, z, h, b[2]))
    x = torch.randn(B, 1, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(B, 1, 7, dtype=torch.float64, requires_grad=True)
    xt = torch.randn(B, 1, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ops.reference.update_state(*a)[1], (x, g, xt))
    k = torch.rand(4, dtype=torch.float64)
    xs = torch.randn(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: ops.reference.upfirdn(v, torch.outer(k, k), 2, 1, 2, 1), (xs,))


def test_kernels_backend_runs_the_kernels_or_raises_under_compile():
    """RIM_FAST_BACKEND=kernels never takes the reference silently: on CPU tensors the Triton gates run only
    through the interpreter, which cannot run inside torch.compile, so RIM.compile refuses up front and a
    compiled call of a gate op raises with the reason (eagerly, the interpreter runs them)."""
    from rim_fast.ops import _triton
    if _triton.missing() is not None or not _triton.K.INTERPRETED:
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1) on the CPU")
    net = rim_fast.Hourglass(1, dimensions=1, nf=4, hidden_units=6)
    rim = rim_fast.RIM((16,), net, score_fn=lambda x, y: y - x, T=2)
    wzh, b = torch.randn(2, 6, 4), torch.randn(3)
    with ops.use_backend("kernels"):
        with ops.trace() as calls:
            rim.predict(torch.randn(2, 1, 16))
        assert calls[("gru_gates_zero_state", "triton")] > 0
        with pytest.raises(RuntimeError, match="cannot run under torch.compile on cpu: on CPU tensors the Triton"):
            rim.compile()
        torch._dynamo.reset()
        compiled = torch.compile(ops.gru_gates_zero_state, backend="eager", fullgraph=True)
        with pytest.raises(Exception) as raised:
            compiled(wzh, b, b)
        # the reason, in the error or in the one dynamo raised it from (torch 2.6: "Observed exception")
        chain, error = [], raised.value
        while error is not None and len(chain) < 10:
            chain.append(str(error))
            error = error.__cause__ or error.__context__
        # torch 2.6's dynamo drops the message ("Observed exception" from an ExceptionVariable); later ones keep it
        old_dynamo = not hasattr(torch.compiler, "is_exporting") and "Observed exception" in chain[0]
        assert old_dynamo or any("the Triton interpreter cannot run inside torch.compile" in m for m in chain), chain
    torch._dynamo.reset()
    with ops.use_backend("auto"):  # auto compiles the reference
        compiled = torch.compile(ops.gru_gates_zero_state, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(wzh, b, b), ops.reference.gru_gates_zero_state(wzh, b, b))


def test_kernels_backend_takes_the_reference_where_no_kernel_is_written_for_the_device():
    """RIM_FAST_BACKEND=kernels raises when a kernel that should run cannot (not built, bad inputs), not where the
    op has no kernel for the device by design (the C++ tanh on CUDA tensors: the reference is CUDA's one pass)."""
    op = Op("_test_devices", reference=lambda x: x + 1)
    try:
        op.register(Impl("cpu_only", lambda x: x + 2, usable=lambda x: x.device.type == "cpu", auto=lambda x: True,
                         why_not=lambda x: "CPU tensors only", devices=("cpu",)))
        with ops.use_backend("kernels"), ops.trace() as calls:
            assert op(torch.zeros(2, device="meta")).device.type == "meta"
            torch.testing.assert_close(op(torch.zeros(2)), torch.full((2,), 2.0))
        assert calls == {("_test_devices", "reference"): 1, ("_test_devices", "cpu_only"): 1}
        op.impls[0].usable = lambda x: False  # on its own device, a kernel that cannot run still raises
        with ops.use_backend("kernels"), pytest.raises(RuntimeError, match="no kernel of op '_test_devices'"):
            op(torch.zeros(2))
    finally:
        del OPS["_test_devices"]
