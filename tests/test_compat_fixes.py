"""Each fixed-mode flag gives the corrected behaviour; bugs no trained model depends on are simply fixed."""
import json
import os

import pytest
import torch

import rim
import rim_fast
from rim_fast import Compat, compat as compat_mod

from helpers import assert_close, paired_models, tiny_hourglass_kwargs


def score_fn(x, y):
    return y - x


def test_compat_resolution():
    assert compat_mod.resolve(None) == rim_fast.TORCH_RIM
    assert compat_mod.resolve("fixed") == rim_fast.FIXED
    assert compat_mod.resolve({"stale_gru_state": False}) == Compat(stale_gru_state=False)
    with pytest.raises(ValueError, match="unknown flag"):
        compat_mod.resolve({"nope": True})
    with pytest.raises(ValueError, match="compat="):
        compat_mod.resolve("sometimes")


def test_fixed_gru_state_changes_the_trajectory_and_keeps_h1():
    net_c = rim_fast.Hourglass(1, dimensions=1, nf=4, hidden_units=6)
    net_f = rim_fast.Hourglass(1, dimensions=1, nf=4, hidden_units=6, compat={"stale_gru_state": False})
    net_f.load_state_dict(net_c.state_dict())
    x, s = torch.randn(2, 1, 16), torch.randn(2, 1, 16)
    h = torch.zeros(2, 6, 4)
    _, h_c = net_c(x, None, s, h)
    _, h_f = net_f(x, None, s, h)
    assert torch.equal(h_c[:, :3], torch.zeros_like(h_c[:, :3]))  # compat: gru1 state stays 0
    assert torch.count_nonzero(h_f[:, :3]) > 0
    assert torch.equal(h_c[:, 3:], h_f[:, 3:])


def test_rmsprop_fixed_uses_a_second_moment():
    net = rim_fast.Hourglass(1, dimensions=1, nf=4, hidden_units=6)
    s = torch.randn(2, 1, 16)
    m = v = torch.zeros_like(s)
    out_c, _, v_c = rim_fast.ops.preprocess_score(s, m, v, 0, method="rmsprop", beta_1=0.9, beta_2=0.999, epsilon=1e-7)
    assert_close(out_c, s / 1e-7)
    assert torch.equal(v_c, v)
    out_f, _, v_f = rim_fast.ops.preprocess_score(s, m, v, 0, method="rmsprop_fixed", beta_1=0.9, beta_2=0.999,
                                                  epsilon=1e-7)
    # first step with bias correction: v_hat = s^2, so out = s / (|s| + eps) = sign(s)
    assert_close(out_f, torch.sign(s), rtol=1e-5, atol=1e-5)
    r = rim_fast.RIM((16,), net, score_fn=score_fn, score_preprocessing_method="RMSPROP", compat="fixed", T=2,
                     device="cpu")
    assert r._preprocessing == "rmsprop_fixed"


def test_model_initialization_argument_order():
    torch.manual_seed(0)
    for compat, expect_swapped in (("torch_rim", True), ("fixed", False)):
        calls = []

        class Spy(rim_fast.Hourglass):
            def forward(self, x, y, score, h, zero_state=None):
                calls.append((y, score))
                return super().forward(x, y, score, h, zero_state)

        net = Spy(1, dimensions=1, nf=4, hidden_units=6, compat=compat)
        r = rim_fast.RIM((16,), net, score_fn=score_fn, initialization_method="model", T=1, device="cpu")
        y = torch.randn(2, 1, 16)
        r(y)
        y_arg, score_arg = calls[0]
        if expect_swapped:
            assert torch.equal(score_arg, y) and torch.count_nonzero(y_arg) == 0
        else:
            assert torch.equal(y_arg, y) and torch.count_nonzero(score_arg) == 0


def test_fixed_conv_same_padding_in_hourglass():
    net = rim_fast.Hourglass(1, dimensions=2, nf=4, hidden_units=6, kernel_size=4, compat="fixed")
    assert all(not m.axis_swap for m in net.modules() if isinstance(m, rim_fast.Conv2dSame))
    net = rim_fast.Hourglass(1, dimensions=2, nf=4, hidden_units=6, kernel_size=4)
    assert all(m.axis_swap for m in net.modules() if isinstance(m, rim_fast.Conv2dSame))


def test_saved_rim_settings(tmp_path):
    directory = str(tmp_path / "run")
    trainer = rim_fast.RIM((8,), rim_fast.Hourglass(1, dimensions=1, nf=4), score_fn=score_fn, T=4,
                           score_preprocessing_method="ADAM", device="cpu")
    x = torch.randn(2, 1, 8)
    trainer.fit(torch.utils.data.TensorDataset(x, x), epochs=1, batch_size=2, checkpoints_directory=directory,
                verbose=-1)
    compat = rim_fast.RIM((8,), checkpoints_directory=directory, score_fn=score_fn, device="cpu")
    assert compat.T == 10 and compat.score_preprocessing_method == "Identity"  # torch_rim: constructor defaults
    fixed = rim_fast.RIM((8,), checkpoints_directory=directory, score_fn=score_fn, device="cpu",
                         compat={"ignore_saved_rim_settings": False})
    assert fixed.T == 4 and fixed.score_preprocessing_method == "ADAM"
    explicit = rim_fast.RIM((8,), checkpoints_directory=directory, score_fn=score_fn, device="cpu", T=2,
                            compat={"ignore_saved_rim_settings": False})
    assert explicit.T == 2


@pytest.mark.parametrize("dims,size", [(2, (16, 32)), (2, (32, 8)), (3, (8, 4, 12)), (1, (12,))])
def test_non_square_sizes_work(dims, size):
    for cls in (rim_fast.Hourglass, rim_fast.Unet):
        net = cls(1, dimensions=dims, nf=4, hidden_units=6)
        r = rim_fast.RIM(size, net, score_fn=score_fn, T=2, device="cpu")
        y = torch.randn(2, 1, *size)
        assert r.predict(y).shape == y.shape


@pytest.mark.parametrize("size", [(15, 15), (16, 14)])
def test_sizes_the_hourglass_cannot_round_trip_raise(size):
    net = rim_fast.Hourglass(1, dimensions=2, nf=4, hidden_units=6)
    with pytest.raises(ValueError, match="multiple of 4"):
        rim_fast.RIM(size, net, score_fn=score_fn, device="cpu")
    with pytest.raises(ValueError, match="multiple of 4"):
        net(torch.randn(1, 1, *size), None, torch.randn(1, 1, *size), torch.zeros(1, 6, 4, 4))


@pytest.mark.parametrize("k", [2, 4])
def test_even_kernel_sizes_give_the_right_size(k):
    net = rim_fast.Hourglass(1, dimensions=1, nf=4, hidden_units=6, kernel_size=k)
    r = rim_fast.RIM((16,), net, score_fn=score_fn, T=2, device="cpu")
    y = torch.randn(2, 1, 16)
    assert r.predict(y).shape == y.shape


def test_square_default_hidden_state_matches_torch_rim():
    ref, new = paired_models(**tiny_hourglass_kwargs(2))
    assert torch.equal(ref.initalize_hidden_states([8, 8], 3), new.initalize_hidden_states([8, 8], 3))
    assert torch.equal(new.initialize_hidden_states([8, 8], 3), new.initalize_hidden_states([8, 8], 3))


def test_fir_resampling_hourglass_builds_and_runs():
    # torch_rim crashed with resample_with_conv=False (bug 5)
    net = rim_fast.Hourglass(1, dimensions=2, nf=4, hidden_units=6, resample_with_conv=False)
    r = rim_fast.RIM((8, 8), net, score_fn=score_fn, T=2, device="cpu")
    y = torch.randn(2, 1, 8, 8)
    loss = r.loss_fn(y, y)
    loss.backward()
    assert r.predict(y).shape == y.shape


def test_model_is_moved_to_the_rim_device():
    # torch_rim left a given model where it was while making x and h on its device; the "meta" device tells the
    # two apart on a machine without a GPU
    net = rim_fast.Hourglass(1, dimensions=1, nf=4)
    net.register_buffer("running_scale", torch.ones(3))
    r = rim_fast.RIM((8,), net, score_fn=score_fn, T=2, device="meta")
    tensors = dict(r.model.named_parameters()) | dict(r.model.named_buffers())
    assert "running_scale" in tensors and len(tensors) > 1
    assert {name: t.device.type for name, t in tensors.items() if t.device.type != "meta"} == {}
    assert r.device == torch.device("meta")


def test_float64_model_gets_a_float64_state():
    # torch_rim forced a float32 state, and a float64 model crashed
    net = rim_fast.Hourglass(1, dimensions=1, nf=4).double()
    r = rim_fast.RIM((8,), net, score_fn=score_fn, T=2, device="cpu")
    y = torch.randn(2, 1, 8, dtype=torch.float64)
    assert r.predict(y).dtype == torch.float64


def test_concurrent_calls_do_not_share_preprocessing_state():
    net = rim_fast.Hourglass(1, dimensions=1, nf=4)
    r = rim_fast.RIM((8,), net, score_fn=score_fn, score_preprocessing_method="ADAM", T=3, device="cpu")
    y1, y2 = torch.randn(2, 1, 8), torch.randn(3, 1, 8)
    a = r.predict(y1)
    r.predict(y2)
    assert torch.equal(a, r.predict(y1))
    assert not hasattr(r, "_score_mean")
