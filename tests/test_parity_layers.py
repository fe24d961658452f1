"""Layer-level parity with score_models 0.5.11 / torch_rim 0.2.9 on random weights."""
import pytest
import torch
from score_models.layers import conv1dsame, conv2dsame, conv3dsame
from score_models.layers.up_or_downsampling import downsample as sm_downsample
from score_models.layers.up_or_downsampling import upsample as sm_upsample

import rim
import rim_fast
from rim_fast import layers

from helpers import assert_close

SM_CONV = {1: conv1dsame.Conv1dSame, 2: conv2dsame.Conv2dSame, 3: conv3dsame.Conv3dSame}
SM_CONVT = {1: conv1dsame.ConvTransposed1dSame, 2: conv2dsame.ConvTransposed2dSame,
            3: conv3dsame.ConvTransposed3dSame}
SIZES = {1: [(7,), (15,), (16,)], 2: [(15, 16), (16, 15), (9, 9)], 3: [(5, 6, 7)]}


def _cases():
    for dims, sizes in SIZES.items():
        for size in sizes:
            for k in (1, 2, 3, 4, 5):
                for stride in (1, 2):
                    yield pytest.param(dims, size, k, stride, id=f"{dims}D-{'x'.join(map(str, size))}-k{k}-s{stride}")


@pytest.mark.parametrize("dims,size,k,stride", list(_cases()))
def test_conv_same_matches_score_models(dims, size, k, stride):
    ref = SM_CONV[dims](3, 5, k, stride=stride)
    new = getattr(rim_fast, f"Conv{dims}dSame")(3, 5, k, stride=stride)
    assert set(ref.state_dict()) == set(new.state_dict())
    new.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, *size, requires_grad=True)
    a = ref(x)
    ga, = torch.autograd.grad(a.square().sum(), x)
    # the reference path is the same computation: same bits
    with rim_fast.ops.use_backend("reference"):
        b = new(x)
    assert a.shape == b.shape
    assert torch.equal(a, b)
    gb, = torch.autograd.grad(b.square().sum(), x)
    assert torch.equal(ga, gb)
    # the default path (channels-last convs on CPU) within rounding
    b = new(x)
    gb, = torch.autograd.grad(b.square().sum(), x)
    assert_close(a, b)
    assert_close(ga, gb)


def test_conv_same_axis_swap_shapes_and_fix():
    # score_models: Conv2dSame(k=4, s=2) maps (15, 16) -> (8, 7); the fixed padding gives floor(n/2) per axis
    compat = rim_fast.Conv2dSame(1, 1, 4, stride=2)
    fixed = rim_fast.Conv2dSame(1, 1, 4, stride=2, axis_swap=False)
    x = torch.randn(1, 1, 15, 16)
    assert compat(x).shape[2:] == (8, 7)
    assert fixed(x).shape[2:] == (7, 8)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_conv_transposed_same_matches_score_models(dims, k):
    ref = SM_CONVT[dims](4, 3, k, stride=2)
    new = getattr(rim_fast, f"ConvTransposed{dims}dSame")(4, 3, k, stride=2)
    assert set(ref.state_dict()) == set(new.state_dict())
    new.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, *([5] * dims))
    a = ref(x)
    with rim_fast.ops.use_backend("reference"):
        assert torch.equal(a, new(x))
    b = new(x)
    assert_close(a, b)
    # even kernels give 2n+1 in score_models; the crop option gives 2n
    expected = 2 * 5 + (1 if k % 2 == 0 else 0)
    assert a.shape[2:] == (expected,) * dims
    crop = getattr(rim_fast, f"ConvTransposed{dims}dSame")(4, 3, k, stride=2, crop_to_stride_multiple=True)
    assert crop(x).shape[2:] == (10,) * dims


def test_spectral_norm_keys_match():
    ref = conv2dsame.Conv2dSame(2, 3, 3, spectral_norm=True)
    new = rim_fast.Conv2dSame(2, 3, 3, spectral_norm=True)
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in new.state_dict().items()}
    new.load_state_dict(ref.state_dict())
    x = torch.randn(1, 2, 8, 8)
    assert_close(ref(x), new(x))


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("n", [7, 8, 15])
@pytest.mark.parametrize("k", [None, (1, 3, 3, 1), (1, 2, 1)])
def test_fir_resampling_matches_score_models(dims, n, k):
    x = torch.randn(2, 3, *([n] * dims))
    up_ref = sm_upsample(x, k=k, dimensions=dims)
    up_new = rim_fast.upsample(x, k=k, dimensions=dims)
    assert up_ref.shape == up_new.shape
    assert_close(up_ref, up_new, rtol=1e-6, atol=1e-7)
    down_ref = sm_downsample(x, k=k, dimensions=dims)
    down_new = rim_fast.downsample(x, k=k, dimensions=dims)
    assert down_ref.shape == down_new.shape
    assert_close(down_ref, down_new, rtol=1e-6, atol=1e-7)


def test_fir_resampling_float64_works():
    # score_models raises on float64; rim_fast casts its kernel to the input's dtype
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    assert rim_fast.upsample(x, k=(1, 3, 3, 1)).dtype == torch.float64
    y = rim_fast.downsample(torch.ones(1, 1, 8, 8), k=(1, 3, 3, 1))
    assert y[0, 0, 2, 2] == pytest.approx(1.0) and y[0, 0, 0, 0] == pytest.approx(0.765625)


@pytest.mark.parametrize("dims,size", [(0, ()), (1, (9,)), (2, (7, 6)), (3, (3, 4, 5))])
def test_gru_matches_torch_rim(dims, size):
    torch.manual_seed(0)
    ref = rim.GRU(3, 5, 3, dims)
    new = rim_fast.GRU(3, 5, 3, dims)
    assert set(ref.state_dict()) == set(new.state_dict())
    new.load_state_dict(ref.state_dict())
    with torch.no_grad():
        for p in (ref.bias_z, ref.bias_r, ref.bias_h):
            p.uniform_(-1, 1)
        new.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, *size, requires_grad=True)
    h = torch.randn(2, 5, *size, requires_grad=True)
    a, _ = ref(x, h)
    b, _ = new(x, h)
    assert_close(a, b)
    cot = torch.randn_like(a)
    ga = torch.autograd.grad(a, [x, h, *ref.parameters()], cot)
    gb = torch.autograd.grad(b, [x, h, *new.parameters()], cot)
    names = ["x", "h"] + [n for n, _ in ref.named_parameters()]
    assert len(names) == len(ga) == len(gb)
    for name, u, v in zip(names, ga, gb):
        assert_close(u, v, msg=name)


@pytest.mark.parametrize("dims,size", [(0, ()), (1, (8,)), (2, (5, 6)), (3, (3, 4, 4))])
def test_gru_block_matches_torch_rim(dims, size):
    ref = rim.GRUBlock(3, 6, 3, dims, 5)
    new = rim_fast.GRUBlock(3, 6, 3, dims, 5)
    new.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, *size, requires_grad=True)
    h = torch.randn(2, 6, *size, requires_grad=True)
    a = ref(x, h)
    b = new(x, h)
    assert len(a) == len(b) == 2
    for u, v in zip(a, b):
        assert_close(u, v)
    # stale first state (bug 1) is reproduced
    assert torch.equal(b[1][:, :3], h[:, :3])
    loss_a = (a[0] * 1.3).sum() + (a[1] ** 2).sum()
    loss_b = (b[0] * 1.3).sum() + (b[1] ** 2).sum()
    ga = torch.autograd.grad(loss_a, [x, h, *ref.parameters()], allow_unused=True)
    gb = torch.autograd.grad(loss_b, [x, h, *new.parameters()], allow_unused=True)
    assert len(ga) == len(gb)
    for u, v in zip(ga, gb):
        if u is None:
            assert v is None or torch.count_nonzero(v) == 0
        else:
            assert_close(u, v)


def test_gru_block_fixed_state():
    block = rim_fast.GRUBlock(3, 6, 3, 1, 5, compat="fixed")
    x, h = torch.randn(2, 3, 8), torch.randn(2, 6, 8)
    _, h_new = block(x, h)
    h1, _ = block.gru1(x, h[:, :3])
    assert torch.equal(h_new[:, :3], h1)


def test_gru_block_hidden_units_must_be_even():
    with pytest.raises(ValueError, match="hidden units"):
        rim_fast.GRUBlock(3, 5, 3, 1)


def test_layers_reexports():
    for name in ["Conv1dSame", "Conv2dSame", "Conv3dSame", "ConvTransposed1dSame", "ConvTransposed2dSame",
                 "ConvTransposed3dSame", "upsample", "downsample", "GRU", "GRUBlock"]:
        assert hasattr(layers, name)
    from rim_fast.utils import NullEMA, get_activation, load_architecture  # noqa: F401
    from rim_fast.architectures import Hourglass, Unet  # noqa: F401
