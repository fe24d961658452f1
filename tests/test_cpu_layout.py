"""CPU channels-last convolutions and the sigmoid-form tanh against their references."""
import pytest
import torch

from rim_fast.ops import cpu_layout, reference

from conftest import tol


def conv_tol(dtype):
    # another summation order over C_in * k^N (up to 81 here) terms of O(1) products: absolute error
    # ~ eps * sqrt(terms) * |terms|, so the float32 bound is absolute at the output's scale
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else tol(dtype)

CASES = [
    pytest.param(1, (1,), 3, 1, id="1D-L1-k3"),
    pytest.param(1, (17,), 3, 2, id="1D-L17-k3-s2"),
    pytest.param(1, (16,), 4, 2, id="1D-L16-k4-s2"),
    pytest.param(2, (7, 9), 3, 1, id="2D-7x9-k3"),
    pytest.param(2, (8, 5), 5, 2, id="2D-8x5-k5-s2"),
    pytest.param(3, (3, 4, 5), 3, 1, id="3D-3x4x5-k3"),
    pytest.param(3, (4, 4, 4), 3, 2, id="3D-4x4x4-k3-s2"),
]


@pytest.mark.parametrize("dims,size,k,stride", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_channels_last_convs_match_reference(dims, size, k, stride, dtype):
    x = torch.randn(2, 3, *size, dtype=dtype, requires_grad=True)
    w = torch.randn(5, 3, *([k] * dims), dtype=dtype, requires_grad=True)
    b = torch.randn(5, dtype=dtype, requires_grad=True)
    if stride == 1:
        args = (w, b, 1, "same", 1, 1)
        ref, new = reference.conv(x, *args), cpu_layout.conv(x, *args)
    else:
        args = (w, b, k, stride, 1, 1, True)
        ref, new = reference.conv_same(x, *args), cpu_layout.conv_same(x, *args)
    assert new.shape == ref.shape
    torch.testing.assert_close(new, ref, **conv_tol(dtype))
    cot = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, (x, w, b), cot)
    g_new = torch.autograd.grad(new, (x, w, b), cot)
    for a, c in zip(g_new, g_ref):
        torch.testing.assert_close(a, c, **conv_tol(dtype))

    wt = torch.randn(3, 4, *([k] * dims), dtype=dtype)
    ref_t = reference.conv_transpose(x, wt, None, 2, (k - 1) // 2, 1, 1, 1)
    new_t = cpu_layout.conv_transpose(x, wt, None, 2, (k - 1) // 2, 1, 1, 1)
    torch.testing.assert_close(new_t, ref_t, **conv_tol(dtype))


def test_one_d_outputs_chain_without_copies():
    x = torch.randn(2, 4, 16)
    w = torch.randn(4, 4, 3)
    y = cpu_layout.conv(x, w, None)
    # the squeezed [B, C, 1, L] channels-last output is taken as is by the next conv
    assert cpu_layout._to_cl(y).data_ptr() == y.data_ptr()
    torch.testing.assert_close(cpu_layout.conv(y, w, None), reference.conv(reference.conv(x, w, None), w, None),
                               **tol(torch.float32))


def test_sigmoid_form_tanh():
    x = torch.cat([torch.linspace(-20, 20, 10001), torch.logspace(-9, 0, 100), -torch.logspace(-9, 0, 100)])
    x.requires_grad_(True)
    y = cpu_layout.tanh(x)
    assert (y - torch.tanh(x)).abs().max() <= 2.5e-7
    g, = torch.autograd.grad(y, x, torch.ones_like(y))
    torch.testing.assert_close(g, 1 - torch.tanh(x.detach()) ** 2, rtol=0, atol=5e-7)
    x64 = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(cpu_layout._SigmoidTanh.apply, (x64,))


@pytest.mark.parametrize("dims,size,k", [(1, (9,), 3), (2, (7, 6), 3), (3, (3, 4, 5), 3), (2, (8, 8), 1)],
                         ids=["1D", "2D", "3D", "2D-k1"])
def test_conv_tanh_fused_and_unfused_match_reference(dims, size, k):
    from rim_fast import ops
    x = torch.randn(2, 3, *size)
    w = torch.randn(4, 3, *([k] * dims))
    b = torch.randn(4)
    expected = reference.conv_tanh(x, w, b, "same", 1, 1)
    with torch.no_grad():
        assert cpu_layout.conv_tanh_usable(x, w, b, "same", 1, 1) == cpu_layout._fused_works()
        if cpu_layout._fused_works():
            torch.testing.assert_close(cpu_layout.conv_tanh(x, w, b, "same", 1, 1), expected, rtol=1e-5, atol=1e-6)
        with ops.trace() as calls:
            ops.conv_tanh(x, w, b, "same", 1, 1)
    assert calls[("conv_tanh", "onednn_fused" if cpu_layout._fused_works() else "channels_last")] == 1
    # with autograd the fused primitive (no derivative) is not taken, and gradients match the reference
    w.requires_grad_(True)
    assert not cpu_layout.conv_tanh_usable(x, w, b, "same", 1, 1)
    out = ops.conv_tanh(x, w, b, "same", 1, 1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    g, = torch.autograd.grad(out.sum(), w)
    g_ref, = torch.autograd.grad(reference.conv_tanh(x, w, b, "same", 1, 1).sum(), w)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


def test_conv_tanh_even_kernel_is_not_fused():
    x, w = torch.randn(1, 2, 8, 8), torch.randn(2, 2, 4, 4)
    with torch.no_grad():
        assert not cpu_layout.conv_tanh_usable(x, w, None, "same", 1, 1)


def test_layer_hooks_see_the_conv_output():
    """A same-conv followed by tanh runs as one op only when no forward hook watches the layer."""
    import rim_fast
    from rim_fast import ops
    net = rim_fast.Hourglass(1, dimensions=1, nf=4, hidden_units=6)
    x = torch.randn(2, 1, 16)
    h = torch.zeros(2, 6, 4)
    seen = []
    with torch.no_grad():
        with ops.trace() as calls:
            net(x, None, x, h)
        assert calls[("conv_tanh", "onednn_fused" if cpu_layout._fused_works() else "channels_last")] > 0
        handle = net.input_layer.register_forward_hook(lambda m, i, o: seen.append(o))
        out = net(x, None, x, h)
        handle.remove()
    assert len(seen) == 1 and seen[0].shape == (2, 4, 16)
    # the hooked layer's output is the conv's, before the activation
    torch.testing.assert_close(seen[0], reference.conv(torch.cat([x, x], 1), net.input_layer.weight,
                                                       net.input_layer.bias), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(out[0], net(x, None, x, h)[0], rtol=1e-5, atol=1e-6)
