"""Fused Triton ConvGRU gate kernels (rim_fast.kernels.gru_gates, ops rim_fast::gru_gates_*) against the
references of rim_fast.ops.reference: forward and every gradient, 0-3 spatial dims, odd and non-power-of-two
sizes, batch 1 and more, contiguous and strided inputs, NaN-poisoned outputs; opcheck; gradcheck of the
references; the zero-state shortcut; a whole RIM on the kernels. On CPU the kernels run in the Triton
interpreter (conftest sets TRITON_INTERPRET=1); the GPU-only tests run on CUDA machines."""
import math

import pytest
import torch

import rim_fast
from rim_fast import ops
from rim_fast.ops import reference, _triton
from rim_fast.ops._dispatch import OPS

from conftest import CUDA, assert_error_budget, requires_cuda, tol

K = _triton.K
requires_kernels = pytest.mark.skipif(K is None or not (CUDA or K.INTERPRETED),
                                      reason=f"Triton gate kernels cannot run here: {_triton.missing()}")
pytestmark = requires_kernels

GATE_OPS = ("gru_gates_zr", "gru_gates_h", "gru_gates_zero_state")
#: where the kernels run: CPU through the interpreter (no GPU), else CUDA (every test below then runs on the GPU)
DEV = "cpu" if K is not None and K.INTERPRETED else "cuda"
DEVICES = [DEV]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every kernel output (and bias partial-sum buffer) starts as NaN: an element a kernel does not write
    makes the comparison fail."""
    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    if K is not None:
        monkeypatch.setattr(K, "_empty", nan_empty)


# ---- inputs -------------------------------------------------------------------------------------------

# (B, H, spatial): 1x1, dims 0-3, odd sizes, H not a power of two, batch 1 and more
SHAPES = [
    (1, 1, ()), (3, 5, ()), (1, 6, ()),
    (2, 3, (7,)), (1, 5, (1,)), (3, 6, (17,)),
    (1, 5, (5, 3)), (2, 3, (9, 7)), (2, 1, (4, 4)),
    (2, 5, (3, 4, 5)), (1, 3, (3, 1, 2)),
]
LAYOUTS = ("contig", "strided", "channels_last")


def shape_id(B, H, S):
    return f"B{B}-H{H}-S" + ("x".join(map(str, S)) if S else "0")


CASES = [pytest.param(B, H, S, layout, id=f"{shape_id(B, H, S)}-{layout}")
         for (B, H, S) in SHAPES for layout in LAYOUTS if layout != "channels_last" or S]


def strided(t: torch.Tensor, kind: int) -> torch.Tensor:
    """The same values in a non-contiguous layout; kind picks channel slice / step-2 / permuted storage."""
    if kind % 3 == 0:
        # a channel slice of a wider tensor: batch and channel strides of the parent
        big = torch.randn(t.shape[0], t.shape[1] + 3, *t.shape[2:], dtype=t.dtype, device=t.device)
        out = big[:, 2:2 + t.shape[1]]
    elif kind % 3 == 1:
        # every other element along the last dim (a step along the merged spatial axis, or the channels)
        big = torch.randn(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        out = big[..., ::2]
    else:
        # reversed dim order in memory: spatial dims cannot merge (the launcher copies), [B, C] is column-major
        out = t.permute(*reversed(range(t.dim()))).contiguous().permute(*reversed(range(t.dim())))
        return out
    return out.copy_(t)


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """The same values with the channels innermost in memory (channels-last; 1D and 3D alike), as the CUDA
    convolutions leave them under RIM_FAST_CUDA_LAYOUT=channels_last."""
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


def check_layouts(outs, like, layout):
    """Every output [B, C, *S] is channels-last where the inputs were (and C > 1, S not all 1), else contiguous."""
    for i, o in enumerate(outs):
        if o.dim() < 3:
            continue
        expected = layout == "channels_last" and o.shape[1] > 1 and any(s > 1 for s in o.shape[2:])
        assert K.channels_last(o) == expected, f"output {i}: strides {o.stride()} for shape {tuple(o.shape)}"
        assert expected or o.is_contiguous(), f"output {i}: strides {o.stride()}"


def make_inputs(B, H, S, layout, device=DEV, dtype=torch.float32, seed=0):
    """wx, uzr, uh, h, z (in (0,1)), bias_z, bias_r, bias_h with values on the scale a GRU sees."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, scale=1.0: (scale * torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
                                     ).to(device=device, dtype=dtype)
    wx, uzr, uh, h = rnd(B, 3 * H, *S, scale=1.5), rnd(B, 2 * H, *S), rnd(B, H, *S), rnd(B, H, *S)
    z = torch.rand(B, H, *S, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    biases = [rnd(H, scale=0.5) for _ in range(3)]
    if layout == "strided":
        wx, uzr, uh, h, z = (strided(t, k) for k, t in enumerate((wx, uzr, uh, h, z)))
        assert not (wx.is_contiguous() and uzr.is_contiguous() and uh.is_contiguous())
    if layout == "channels_last":
        wx, uzr, uh, h, z = map(channels_last, (wx, uzr, uh, h, z))
    return wx, uzr, uh, h, z, *biases


def leaves(*ts):
    return [t.detach().requires_grad_() for t in ts]


def compare(fn_ref, fn_new, inputs, n_out, dtype=torch.float32, cotangent_seed=1):
    """Forward outputs and the gradients of every input under one random cotangent per output."""
    ref_in, new_in = leaves(*inputs), leaves(*inputs)
    out_ref, out_new = fn_ref(*ref_in), fn_new(*new_in)
    if n_out == 1:
        out_ref, out_new = (out_ref,), (out_new,)
    g = torch.Generator().manual_seed(cotangent_seed)
    cots = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o) for o in out_ref]
    assert len(out_new) == len(out_ref) == n_out
    for i, (a, b) in enumerate(zip(out_new, out_ref)):
        assert b.dtype == a.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, **tol(dtype), msg=lambda m: f"output {i}: {m}")
    grads_ref = torch.autograd.grad(out_ref, ref_in, cots, allow_unused=True)
    grads_new = torch.autograd.grad(out_new, new_in, cots, allow_unused=True)
    assert len(grads_new) == len(grads_ref) == len(ref_in)
    for i, (a, b, x) in enumerate(zip(grads_new, grads_ref, ref_in)):
        assert a is not None, f"grad {i} missing"
        # an input the reference's graph does not reach (h when only z is used) has a zero gradient
        b = torch.zeros_like(x) if b is None else b
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, **tol(dtype), msg=lambda m: f"grad of input {i}: {m}")
    return out_new, grads_new


# ---- forward and backward against the references --------------------------------------------------------

@pytest.mark.parametrize("B,H,S,layout", CASES)
def test_zr(B, H, S, layout):
    wx, uzr, uh, h, z, bz, br, bh = make_inputs(B, H, S, layout)
    outs, _ = compare(reference.gru_gates_zr, _triton.gru_gates_zr, (wx, uzr, h, bz, br), 2)
    if layout != "strided":
        check_layouts(outs, wx, layout)
        check_layouts(K.gru_gates_zr_bwd(h, h, wx, uzr, h, z, br)[:2], wx, layout)


@pytest.mark.parametrize("B,H,S,layout", CASES)
def test_h(B, H, S, layout):
    wx, uzr, uh, h, z, bz, br, bh = make_inputs(B, H, S, layout)
    outs, _ = compare(reference.gru_gates_h, _triton.gru_gates_h, (wx, uh, z, h, bh), 1)
    if layout != "strided":
        check_layouts(outs, wx, layout)
        check_layouts(K.gru_gates_h_bwd(h, wx, uh, z, h, bh)[:3], wx, layout)


@pytest.mark.parametrize("B,H,S,layout", CASES)
def test_zero_state(B, H, S, layout):
    wx, uzr, uh, h, z, bz, br, bh = make_inputs(B, H, S, layout)
    wzh = uzr * 1.5 if layout != "strided" else strided(uzr * 1.5, 1)
    outs, _ = compare(reference.gru_gates_zero_state, _triton.gru_gates_zero_state, (wzh, bz, bh), 1)
    if layout != "strided":
        check_layouts(outs, wzh, layout)
        check_layouts(K.gru_gates_zero_state_bwd(h, wzh, bz, bh)[:1], wzh, layout)


@pytest.mark.parametrize("which", ["z_only", "rh_only"])
def test_zr_one_output_used(which):
    """Autograd hands the backward an undefined (or zero) grad for the unused output."""
    wx, uzr, uh, h, z, bz, br, bh = make_inputs(2, 5, (6,), "contig")

    def pick(fn):
        return lambda *a: fn(*a)[0 if which == "z_only" else 1]
    compare(pick(reference.gru_gates_zr), pick(_triton.gru_gates_zr), (wx, uzr, h, bz, br), 1)


def test_full_cell_chain():
    """zr -> U_h conv -> h as the GRU chains them: wx feeds both ops, its two gradient halves accumulate."""
    B, H, S = 2, 5, (7, 6)
    wx, uzr, uh, h, z, bz, br, bh = make_inputs(B, H, S, "contig")
    u_h = torch.randn(H, H, 3, 3, dtype=torch.float32, device=DEV) * 0.3

    def cell(gates_zr, gates_h):
        def f(wx, uzr, h, bz, br, bh):
            z, rh = gates_zr(wx, uzr, h, bz, br)
            return gates_h(wx, torch.nn.functional.conv2d(rh, u_h, padding=1), z, h, bh)
        return f
    compare(cell(reference.gru_gates_zr, reference.gru_gates_h),
            cell(_triton.gru_gates_zr, _triton.gru_gates_h), (wx, uzr, h, bz, br, bh), 1)


def test_tanh_accuracy_small_and_saturated():
    """Relative accuracy of the in-kernel tanh near 0 (where 2 sigmoid(2x) - 1 cancels) and saturation."""
    H, N = 4, 64
    x = torch.cat([torch.logspace(-9, 0, N // 2), -torch.logspace(-9, 1.5, N // 2)]).repeat(H, 1)
    wzh = torch.cat([torch.full((H, N), 30.0), x]).unsqueeze(0).to(DEV)  # z = sigmoid(30) = 1 in fp32
    zeros = torch.zeros(H, device=DEV)
    out = _triton.gru_gates_zero_state(wzh, zeros, zeros)
    expected = reference.gru_gates_zero_state(wzh.double(), zeros.double(), zeros.double()).float()
    torch.testing.assert_close(out, expected, rtol=2e-6, atol=0)
    # and the tanh/sigmoid extremes do not produce NaN/inf in the backward
    big = torch.cat([torch.full((1, H, N), -80.0), torch.full((1, H, N), 80.0)], 1).to(DEV)
    compare(reference.gru_gates_zero_state, _triton.gru_gates_zero_state, (big, zeros, zeros), 1)


# ---- the tests can fail --------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["gru_gates_h", "gru_gates_zero_state"])
def test_tanh_slope_relative_accuracy_where_tanh_saturates(op):
    """The backward's tanh slope 1 - tanh(a)^2 comes from e = exp(-2|a|) as 4e / (1 + e)^2, accurate to a few ulp
    relative where 1 - t*t (the reference's formula) cancels near |t| = 1 (1e-3 relative at |a| = 5, all of it
    lost from |a| ~ 9 on). Checked on the gradient of the tanh's pre-activation with z = 1 and a unit cotangent,
    against float64, for |a| from 0 to 12."""
    H, N = 3, 96
    a = torch.linspace(0, 12, N, dtype=torch.float64)
    a = torch.stack([a, -a, a.flip(0)])  # both signs, and the series' range |a| < 1/8 at both ends of a row
    zero = torch.zeros(H, dtype=torch.float64)
    one = torch.ones(1, H, N, dtype=torch.float64)
    if op == "gru_gates_h":
        # wx = [., ., a], uh = 0, z = 1, h = 0: h' = tanh(a), d h'/d wx[:, 2H:] = 1 - tanh(a)^2
        wx = torch.cat([torch.zeros(1, 2 * H, N, dtype=torch.float64), a[None]], 1)
        args64 = (wx, torch.zeros(1, H, N, dtype=torch.float64), one, torch.zeros(1, H, N, dtype=torch.float64),
                  zero)
        fn, take = _triton.gru_gates_h, lambda g: g[0][:, 2 * H:]
    else:
        # wzh = [40, a]: z = sigmoid(40) = 1 in fp32, h' = tanh(a)
        args64 = (torch.cat([torch.full((1, H, N), 40.0, dtype=torch.float64), a[None]], 1), zero, zero)
        fn, take = _triton.gru_gates_zero_state, lambda g: g[0][:, H:]
    args = [t.float().to(DEV).requires_grad_(i == 0) for i, t in enumerate(args64)]
    slope = take(torch.autograd.grad(fn(*args), args[:1], torch.ones(1, H, N, device=DEV)))
    expected = 1 - torch.tanh(a[None].float().double()) ** 2  # at the fp32 inputs the kernel sees
    rel = ((slope.double().cpu() - expected) / expected).abs()
    # 1e-5: a few ulp, plus on CUDA tl.exp's rounding of 2|a| log2(e) (~1e-6 relative at |a| = 12)
    assert rel.max() < 1e-5, f"worst relative error {rel.max():.2e} at |a| = {a.flatten()[rel.argmax()]:.2f}"
    assert torch.all(slope > 0), "the slope underflowed to 0 (or went negative) within |a| <= 12"


def test_poison_detects_unwritten_elements(monkeypatch):
    """A launch that skips one program leaves NaN in the output (so the comparisons above would fail)."""
    wx, uzr, uh, h, z, bz, br, bh = make_inputs(2, 5, (7,), "contig")
    def short_grid(*args):
        launch = K._Launch(*args)
        launch.grid = (launch.grid[0] - 1, launch.grid[1])
        return launch
    monkeypatch.setattr(K, "_launch", short_grid)
    out = _triton.gru_gates_h(wx, uh, z, h, bh)
    assert torch.isnan(out).any() and not torch.isnan(out).all()


def test_outputs_not_zero_and_not_constant():
    """Guards against interpreter/numpy pairs that return all-zero outputs (triton #4440)."""
    wx, uzr, uh, h, z, bz, br, bh = make_inputs(3, 5, (9,), "contig")
    z_new, rh = _triton.gru_gates_zr(wx, uzr, h, bz, br)
    outs = [z_new, rh, _triton.gru_gates_h(wx, uh, z, h, bh),
            _triton.gru_gates_zero_state(uzr, bz, bh)]
    for o in outs:
        assert torch.isfinite(o).all() and (o != 0).float().mean() > 0.99 and o.std() > 0.05
    g_zr, g_h, g_b = torch.ops.rim_fast.gru_gates_zr_backward(torch.randn_like(h), torch.randn_like(h), wx, uzr,
                                                               h, z_new, br)
    for o in (g_zr, g_h, g_b):
        assert torch.isfinite(o).all() and (o != 0).float().mean() > 0.99


# ---- op registration ----------------------------------------------------------------------------------

def _opcheck_utils(device):
    # the Triton interpreter cannot run under AOT dispatch (fake/functional tensors): those two checks need CUDA
    if device == "cuda":
        return ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    return ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("S,layout", [((), "contig"), ((5,), "contig"), ((3, 4), "contig"),
                                      ((3, 4), "channels_last"), ((2, 3, 2), "channels_last")],
                         ids=["S0", "S5", "S3x4", "S3x4-channels_last", "S2x3x2-channels_last"])
def test_opcheck(device, S, layout):
    """Schema, autograd registration and the fakes (their strides too: channels-last in, channels-last out)."""
    wx, uzr, uh, h, z, bz, br, bh = make_inputs(2, 3, S, layout, device=device)
    calls = [
        (torch.ops.rim_fast.gru_gates_zr.default, leaves(wx, uzr, h, bz, br)),
        (torch.ops.rim_fast.gru_gates_h.default, leaves(wx, uh, z, h, bh)),
        (torch.ops.rim_fast.gru_gates_zero_state.default, leaves(uzr, bz, bh)),
        (torch.ops.rim_fast.gru_gates_zr_backward.default, [h, uh, wx, uzr, h, z, br]),
        (torch.ops.rim_fast.gru_gates_h_backward.default, [uh, wx, uh, z, h, bh]),
        (torch.ops.rim_fast.gru_gates_zero_state_backward.default, [h, uzr, bz, bh]),
    ]
    for op, args in calls:
        torch.library.opcheck(op, args, test_utils=_opcheck_utils(device))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_mixed_dtypes(device):
    """The fakes promote dtypes as the kernels do: z from (wx, uzr, b_z) only, rh with h too."""
    wx, uzr, uh, h, z, bz, br, bh = make_inputs(2, 3, (5,), "contig", device=device)
    half = [t.half() for t in (wx, uzr, bz, br)]
    z, rh = torch.ops.rim_fast.gru_gates_zr(half[0], half[1], h, half[2], half[3])
    assert z.dtype == torch.float16 and rh.dtype == torch.float32
    torch.library.opcheck(torch.ops.rim_fast.gru_gates_zr.default, [half[0], half[1], h, half[2], half[3]],
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("S", [(), (3,), (2, 3)], ids=["S0", "S3", "S2x3"])
def test_gradcheck_references(S):
    wx, uzr, uh, h, z, bz, br, bh = make_inputs(2, 3, S, "contig", dtype=torch.float64)
    assert torch.autograd.gradcheck(reference.gru_gates_zr, leaves(wx, uzr, h, bz, br))
    assert torch.autograd.gradcheck(reference.gru_gates_h, leaves(wx, uh, z, h, bh))
    assert torch.autograd.gradcheck(reference.gru_gates_zero_state, leaves(uzr, bz, bh))


# ---- dispatch ----------------------------------------------------------------------------------------

def test_dispatch_picks_triton_with_kernels_backend():
    wx, uzr, uh, h, z, bz, br, bh = make_inputs(2, 3, (4,), "contig")
    with ops.use_backend("kernels"), ops.trace() as calls:
        ops.gru_gates_zr(wx, uzr, h, bz, br)
        ops.gru_gates_h(wx, uh, z, h, bh)
        ops.gru_gates_zero_state(uzr, bz, bh)
    assert calls == {(name, "triton"): 1 for name in GATE_OPS}
    with ops.use_backend("auto"), ops.trace() as calls:
        ops.gru_gates_zr(wx, uzr, h, bz, br)
    # on the CPU the reference is faster than the interpreter; on CUDA a small eager call is launch-bound and the
    # reference's aten kernels launch faster (test_cuda_auto_backend_choice: the kernels for large calls)
    assert calls == {("gru_gates_zr", "reference"): 1}
    assert not _triton.usable(wx.double(), uzr.double(), h.double(), bz.double(), br.double())


# ---- the zero-state shortcut --------------------------------------------------------------------------

def _nonzero_biases(module):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "bias_" in name:
                p.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("backend", ["reference", "kernels"])
@pytest.mark.parametrize("dims,S", [(0, ()), (1, (9,)), (2, (5, 6)), (3, (3, 4, 2))], ids=["0D", "1D", "2D", "3D"])
def test_gru_forward_zero_state(backend, dims, S):
    gru = rim_fast.GRU(3, hidden_units=5, kernel_size=3, dimensions=dims).to(DEV)
    _nonzero_biases(gru)
    x = torch.randn(2, 3, *S, device=DEV, requires_grad=True)
    with ops.use_backend(backend), ops.trace() as calls:
        fast = gru.forward_zero_state(x)
        full = gru(x, torch.zeros(2, 5, *S, device=DEV))[0]
    torch.testing.assert_close(fast, full, **tol(torch.float32))
    impl = "triton" if backend == "kernels" else "reference"
    gates = {k: v for k, v in calls.items() if k[0] in GATE_OPS}
    assert gates == {("gru_gates_zero_state", impl): 1, ("gru_gates_zr", impl): 1, ("gru_gates_h", impl): 1}
    # and the gradients of x and of every parameter agree (the unused ones are exactly zero)
    params = [x] + list(gru.parameters())
    g_fast = torch.autograd.grad(fast.square().sum(), params)
    g_full = torch.autograd.grad(full.square().sum(), params)
    assert len(g_fast) == len(g_full) == len(params)
    for a, b in zip(g_fast, g_full):
        torch.testing.assert_close(a, b, **tol(torch.float32))


@pytest.mark.parametrize("backend", ["reference", "kernels"])
@pytest.mark.parametrize("hint", ["all", "first", "second"])
def test_gru_block_zero_state_hint(backend, hint):
    """Each promise computes what the block computes without one (torch_rim's stale first GRU): "all" and
    "second" return h_2 alone, the half of the full state that is not zero."""
    block = rim_fast.GRUBlock(4, hidden_units=6, kernel_size=3, dimensions=2, conv_kernel_size=3).to(DEV)
    _nonzero_biases(block)
    x = torch.randn(2, 4, 6, 5, device=DEV)
    h = torch.zeros(2, 6, 6, 5, device=DEV)
    if hint != "all":
        h[:, 3:] = torch.randn(2, 3, 6, 5, device=DEV)
    impl = "triton" if backend == "kernels" else "reference"
    with ops.use_backend(backend):
        with ops.trace() as hinted:
            out_hint, h_hint = block(x, h[:, 3:] if hint == "second" else h, zero_state=hint)
        with ops.trace() as plain:
            out, h_new = block(x, h)
    torch.testing.assert_close(out_hint, out, **tol(torch.float32))
    if hint == "first":
        torch.testing.assert_close(h_hint, h_new, **tol(torch.float32))
    else:
        assert torch.count_nonzero(h_new[:, :3]) == 0  # the half left out is zero
        torch.testing.assert_close(h_hint, h_new[:, 3:], **tol(torch.float32))
    gates = lambda calls: {k: v for k, v in calls.items() if k[0] in GATE_OPS}  # noqa: E731
    if hint == "all":
        assert gates(hinted) == {("gru_gates_zero_state", impl): 2}
    else:
        assert gates(hinted) == {("gru_gates_zero_state", impl): 1, ("gru_gates_zr", impl): 1,
                                 ("gru_gates_h", impl): 1}
    # no hint: the shortcut is never taken
    assert gates(plain) == {("gru_gates_zr", impl): 2, ("gru_gates_h", impl): 2}


@pytest.mark.parametrize("compat", ["torch_rim", "fixed"])
def test_gru_block_zero_state_hint_follows_its_compat(compat):
    """The block knows what stays zero: all of the initial state; after a call, h_1 only where it returns the
    h_1 it received (stale_gru_state: left out after "all" and "second", kept after "first"), nothing otherwise.
    The promise it gives holds on the state it returns."""
    block = rim_fast.GRUBlock(4, hidden_units=6, kernel_size=3, dimensions=1, conv_kernel_size=3, compat=compat)
    _nonzero_biases(block)
    stale = compat == "torch_rim"
    assert block.zero_state_hint(initial=True) == "all"
    assert block.zero_state_hint("all") == block.zero_state_hint("second") == ("second" if stale else None)
    assert block.zero_state_hint("first") == ("first" if stale else None)
    assert block.zero_state_hint(None) is None
    _, h = block(torch.randn(2, 4, 8), torch.zeros(2, 6, 8), zero_state="all")
    if stale:
        assert h.shape == (2, 3, 8) and torch.count_nonzero(h) > 0  # h_2 alone
        _, h2 = block(torch.randn(2, 4, 8), h, zero_state="second")
        assert h2.shape == (2, 3, 8)
        _, h_first = block(torch.randn(2, 4, 8), torch.cat([torch.zeros(2, 3, 8), h], 1), zero_state="first")
        assert h_first.shape == (2, 6, 8) and torch.count_nonzero(h_first[:, :3]) == 0
    else:
        assert h.shape == (2, 6, 8) and torch.count_nonzero(h[:, :3]) > 0 and torch.count_nonzero(h[:, 3:]) > 0


# ---- a whole RIM on the kernels -------------------------------------------------------------------------

def _all_ops():
    return list(OPS.values())


@pytest.mark.parametrize("dims,S", [(1, (8,)), (2, (8, 8))], ids=["1D", "2D"])
def test_rim_on_gate_kernels(monkeypatch, dims, S):
    # only the gate ops are under test: every other op keeps its reference (its kernels may need a build)
    for op in _all_ops():
        if op.name not in GATE_OPS:
            monkeypatch.setattr(op, "impls", [])
    # TF32 convolutions would turn the last-bit differences of the gates into 1e-3 ones
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(3)
    model = rim_fast.Hourglass(channels=1, dimensions=dims, nf=4, ch_mult=(2, 2), hidden_units=8, kernel_size=3)
    _nonzero_biases(model)
    rim = rim_fast.RIM(S, model, score_fn=lambda x, y: y - 0.8 * x, T=2, device=DEV)
    y, x_true = torch.randn(2, 1, *S, device=DEV), torch.randn(2, 1, *S, device=DEV)
    results = {}
    for backend in ("reference", "kernels"):
        model.zero_grad()
        with ops.use_backend(backend), ops.trace() as calls:
            trajectory = rim(y)
            loss = rim.loss_fn(y, x_true)
            loss.backward()
        results[backend] = (trajectory, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()},
                            calls)
    (traj_ref, loss_ref, grads_ref, _), (traj_new, loss_new, grads_new, calls) = results["reference"], results["kernels"]
    assert len(traj_new) == len(traj_ref) == rim.T
    for a, b in zip(traj_new, traj_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_new, loss_ref, rtol=1e-5, atol=1e-6)
    for name in grads_ref:
        torch.testing.assert_close(grads_new[name], grads_ref[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert any(g.abs().sum() > 0 for n, g in grads_new.items() if "gru_layer" in n)
    gates = {k: v for k, v in calls.items() if k[0] in GATE_OPS}
    # every GRU cell call was served by the kernels: 2 passes (forward, loss_fn) x T=2 steps x 2 cells, each
    # cell either the zero-state shortcut or zr + h
    assert all(impl == "triton" for _, impl in gates), gates
    zero, zr, h = (gates.get((name, "triton"), 0) for name in ("gru_gates_zero_state", "gru_gates_zr", "gru_gates_h"))
    assert zero + zr == 2 * 2 * 2 and zr == h and zr > 0 and zero > 0


# ---- GPU only -----------------------------------------------------------------------------------------

def _low_precision_runs(fn_ref, fn_new, inputs, n_out, dtype):
    """(kernel, reference, float64 reference): outputs and input gradients, the first two in `dtype`."""
    def run(fn, ins):
        ins = leaves(*ins)
        outs = fn(*ins)
        outs = (outs,) if n_out == 1 else outs
        g = torch.Generator(device=ins[0].device).manual_seed(5)
        cots = [torch.randn(o.shape, generator=g, device=o.device, dtype=torch.float64).to(o.dtype) for o in outs]
        grads = torch.autograd.grad(outs, ins, cots)
        return [t.double() for t in (*outs, *grads)]
    exact = run(fn_ref, [t.double() for t in inputs])
    return run(fn_new, [t.to(dtype) for t in inputs]), run(fn_ref, [t.to(dtype) for t in inputs]), exact


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("S", [(), (33,), (16, 15), (4, 5, 3)], ids=["S0", "S33", "S16x15", "S4x5x3"])
def test_cuda_low_precision(dtype, S):
    """In bf16/fp16 the kernels (fp32 math inside) stay within the error budget (conftest) of the reference."""
    wx, uzr, uh, h, z, bz, br, bh = make_inputs(4, 12, S, "contig", device="cuda")
    for fn_ref, fn_new, ins, n in (
            (reference.gru_gates_zr, _triton.gru_gates_zr, (wx, uzr, h, bz, br), 2),
            (reference.gru_gates_h, _triton.gru_gates_h, (wx, uh, z, h, bh), 1),
            (reference.gru_gates_zero_state, _triton.gru_gates_zero_state, (uzr, bz, bh), 1)):
        assert_error_budget(*_low_precision_runs(fn_ref, fn_new, ins, n, dtype), dtype, what=fn_ref.__name__)


@requires_cuda
def test_cuda_on_second_device():
    """Tensors on a GPU that is not the current one: the launches go to their GPU (Triton launches on the current
    device), forward and backward, gates and bias_tanh."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    assert torch.cuda.current_device() == 0
    wx, uzr, uh, h, z, bz, br, bh = make_inputs(2, 5, (7, 3), "contig", device="cuda:1")
    for fn_ref, fn_new, ins in ((reference.gru_gates_zr, _triton.gru_gates_zr, (wx, uzr, h, bz, br)),
                                (reference.gru_gates_h, _triton.gru_gates_h, (wx, uh, z, h, bh)),
                                (reference.gru_gates_zero_state, _triton.gru_gates_zero_state, (uzr, bz, bh)),
                                (reference.bias_tanh, _triton.bias_tanh, (wx, torch.randn(15, device="cuda:1")))):
        a_ins, b_ins = leaves(*ins), leaves(*ins)
        new, ref = fn_new(*a_ins), fn_ref(*b_ins)
        new, ref = (new,) if isinstance(new, torch.Tensor) else new, (ref,) if isinstance(ref, torch.Tensor) else ref
        for a, b in zip(new, ref):
            assert a.device == b.device == torch.device("cuda:1")
            torch.testing.assert_close(a, b, **tol(torch.float32))
        grads = torch.autograd.grad(sum(o.square().sum() for o in new), a_ins)
        expected = torch.autograd.grad(sum(o.square().sum() for o in ref), b_ins)
        for a, b in zip(grads, expected):
            torch.testing.assert_close(a, b, **tol(torch.float32))


@requires_cuda
def test_cuda_int64_offsets():
    """More than 2**31 elements: offsets past int32 (bf16 to keep it at ~13 GB)."""
    B, H, N = 2049, 16, 65536
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2 ** 30:
        pytest.skip("needs a GPU with >= 40 GB")
    wzh = torch.randn(B, 2 * H, N, device="cuda", dtype=torch.bfloat16)
    bz, bh = torch.randn(H, device="cuda"), torch.randn(H, device="cuda")
    out = _triton.gru_gates_zero_state(wzh, bz.bfloat16(), bh.bfloat16())
    assert out.numel() > 2 ** 31
    for b in (0, B // 2, B - 1):
        expected = reference.gru_gates_zero_state(wzh[b:b + 1].float(), bz.bfloat16().float(), bh.bfloat16().float())
        torch.testing.assert_close(out[b:b + 1].float(), expected, **tol(torch.bfloat16))
    del wzh, out
    torch.cuda.empty_cache()


@requires_cuda
@pytest.mark.parametrize("dims,S", [(0, ()), (2, (16, 16))], ids=["0D", "2D"])
def test_cuda_compile_sees_kernels(dims, S):
    """torch.compile(fullgraph=True) of a GRU cell forward+backward on the kernels: no graph break, same numbers
    as eager, and the generated code launches the gate kernels (forward and backward)."""
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    gru = rim_fast.GRU(8, hidden_units=12, kernel_size=3, dimensions=dims).cuda()
    _nonzero_biases(gru)
    x, h = torch.randn(4, 8, *S, device="cuda"), torch.randn(4, 12, *S, device="cuda")

    def cell(x, h):
        out = gru(x, h)[0]
        return gru(x, out)[0] + gru.forward_zero_state(x)

    inputs = [x.requires_grad_(), h.requires_grad_()] + list(gru.parameters())

    def run(fn):
        out = fn(x, h)
        return out, torch.autograd.grad(out.square().sum(), inputs)

    with ops.use_backend("kernels"):
        eager_out, eager_grads = run(cell)
        compiled = torch.compile(cell, fullgraph=True)
        (out, grads), code = run_and_get_code(run, compiled)
    torch.testing.assert_close(out, eager_out, **tol(torch.float32))
    assert len(grads) == len(eager_grads) == len(inputs)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    source = "\n".join(code)
    for name in ("_gru_zr_fwd_kernel", "_gru_h_fwd_kernel", "_gru_zero_state_fwd_kernel",
                 "_gru_zr_bwd_kernel", "_gru_h_bwd_kernel", "_gru_zero_state_bwd_kernel"):
        assert name in source, f"{name} not in the compiled code"


@requires_cuda
def test_cuda_auto_backend_choice():
    """auto: the kernels for large eager calls and under CUDA-graph capture; the reference for small eager calls
    (launch-bound: the aten kernels launch faster)."""
    small = make_inputs(2, 3, (4,), "contig", device="cuda")
    large = make_inputs(1, 16, (1 << 19,), "contig", device="cuda")
    for inputs, impl in ((small, "reference"), (large, "triton")):
        wx, uzr, uh, h, z, bz, br, bh = inputs
        with ops.use_backend("auto"), ops.trace() as calls:
            ops.gru_gates_zr(wx, uzr, h, bz, br)
        assert calls == {("gru_gates_zr", impl): 1}
    wx, uzr, uh, h, z, bz, br, bh = small
    ops.gru_gates_zr(wx, uzr, h, bz, br)  # warm up (compile the kernel) outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), ops.use_backend("auto"):
        _triton.gru_gates_zr(wx, uzr, h, bz, br)
        graph = torch.cuda.CUDAGraph()
        with ops.trace() as calls, torch.cuda.graph(graph):
            z_g, rh_g = ops.gru_gates_zr(wx, uzr, h, bz, br)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    assert calls == {("gru_gates_zr", "triton"): 1}
    z_ref, rh_ref = reference.gru_gates_zr(wx, uzr, h, bz, br)
    torch.testing.assert_close(z_g, z_ref, **tol(torch.float32))
    torch.testing.assert_close(rh_g, rh_ref, **tol(torch.float32))


def test_mixed_activation_dtypes_take_the_reference():
    # under autocast the convolutions hand bf16 pre-activations next to a float32 state
    from rim_fast.ops import _triton
    wx = torch.randn(2, 6, 5, dtype=torch.bfloat16)
    uzr = torch.randn(2, 4, 5, dtype=torch.bfloat16)
    h = torch.randn(2, 2, 5)
    b = torch.zeros(2)
    assert not _triton.usable(wx, uzr, h, b, b)
    assert _triton.usable(wx.float(), uzr.float(), h, b, b) == (_triton.missing() is None
                                                                    and _triton.K.INTERPRETED)


def test_launch_tiles_run_along_memory():
    """A tile spans N first for NC* tensors and the channels first (up to 64) for channels-last ones, so that a
    warp's accesses are contiguous either way; the partial-sum rows follow the tiles."""
    cpu = torch.device("cpu")  # one program is enough on the CPU: the largest tile
    nchw = K._Launch(2, 16, 4096, cpu)
    cl = K._Launch(2, 16, 4096, cpu, channels_inner=True)
    assert nchw.block_n > nchw.block_c and nchw.block_n == min(4096, K._MAX_BLOCK_N)
    assert cl.block_c == 16 and cl.block_n * cl.block_c == K._MAX_TILE
    assert cl.grid == (2 * cl.n_blocks, 1) and cl.rows == 2 * cl.n_blocks
    assert K._Launch(2, 100, 4096, cpu, channels_inner=True).block_c == 64
    # [B, H] (N = 1): the batch runs along N whatever the layout flag
    assert K._Launch(8, 16, 1, cpu, channels_inner=True).block_n == K._Launch(8, 16, 1, cpu).block_n
