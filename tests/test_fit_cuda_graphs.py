"""fit(cuda_graphs=True): the training step recorded once and replayed (rim_fast/fit_graph.py). On the CPU through
the stand-in recorder (it replays by running the step again on the static inputs, and refuses host syncs as a CUDA
capture does), against fit(cuda_graphs=False) bit for bit; the real capture on CUDA."""
import contextlib
import functools
import importlib
import warnings

import pytest
import torch

import rim_fast
from rim_fast import checkpoints as ckpt
from rim_fast import fit_graph
from rim_fast.cuda_graphs import CudaRecorder, EagerRecorder, Variant
from rim_fast.fit_config import FitConfig

from conftest import requires_cuda

D = (16,)


def score_fn(x, y):
    return y - 0.8 * x


def syncing_score_fn(x, y):
    return (y - 0.8 * x) * (1 + 0 * float(x.abs().max().item()))


def _data(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, *D, generator=g)
    y = 0.8 * x + 0.1 * torch.randn(n, 1, *D, generator=g)
    return torch.utils.data.TensorDataset(y, x)


def _rim(seed=0, device="cpu", score=score_fn):
    torch.manual_seed(seed)
    net = rim_fast.Hourglass(1, dimensions=1, nf=4, hidden_units=6)
    return rim_fast.RIM(D, net, T=3, score_fn=score, score_preprocessing_method="ADAM", device=device)


class Counting(EagerRecorder):
    def __init__(self):
        self.captures = self.replays = 0

    def capture(self, fn):
        self.captures += 1
        return super().capture(fn)

    def replay(self, graph, out):
        self.replays += 1
        super().replay(graph, out)


@pytest.fixture
def stand_in(monkeypatch, one_thread):
    """fit records its training step with the CPU stand-in, and capturable Adam runs on the CPU (torch allows it on
    GPUs only; its arithmetic is the same); one thread (``conftest.one_thread``, which gives the count back)."""
    recorder = Counting()
    monkeypatch.setattr(rim_fast.RIM, "_graph_recorder", lambda self: recorder)
    for name in ("torch.optim.adam", "torch.optim.adamw"):
        module = importlib.import_module(name)
        if not hasattr(module, "_get_capturable_supported_devices"):
            continue  # AdamW runs Adam's functions (torch >= 2.7)
        supported = module._get_capturable_supported_devices
        monkeypatch.setattr(module, "_get_capturable_supported_devices",
                            lambda *a, supported=supported, **k: [*supported(*a, **k), "cpu"])
    return recorder


def _step_lr(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)


# warm-up over 3 steps, a per-epoch schedule, EMA, clipping that bites, shuffling, a partial last batch (7 = 2+2+2+1)
KW = dict(epochs=3, batch_size=2, learning_rate=3e-3, warmup=3, scheduler=_step_lr, ema_decay=0.9, clip=0.05,
          shuffle=True, seed=1, verbose=-1, loss_curve=False)


def _capturable_adam(params):
    """What fit(cuda_graphs=True) builds by default, given by hand to an eager run."""
    return torch.optim.Adam(params, lr=torch.tensor(3e-3), capturable=True)


def _fit(cuda_graphs, seed=0, score=score_fn, data=None, **kw):
    rim = _rim(seed, score=score)
    losses = rim.fit(_data() if data is None else data, cuda_graphs=cuda_graphs, **{**KW, **kw})
    return rim, losses


def _assert_same(a, b, losses_a, losses_b):
    assert losses_a == losses_b  # exact float equality
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), name


def _graph_warnings(caught):
    return [w for w in caught if "cuda_graphs=True" in str(w.message) or "cannot be recorded" in str(w.message)]


@pytest.mark.parametrize("drop_last", [False, True], ids=["partial-eager", "partial-dropped"])
def test_fit_with_graphs_steps_exactly_like_eager(stand_in, drop_last):
    """Recorded once, replayed for every full batch; the partial batch eagerly (or dropped): the losses and the
    (EMA) weights of fit(cuda_graphs=False) with the same capturable Adam, to the bit."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graphed, losses = _fit(True, drop_last=drop_last)
    assert not _graph_warnings(caught)
    eager, losses_eager = _fit(False, optimizer=_capturable_adam, drop_last=drop_last)
    _assert_same(graphed, eager, losses, losses_eager)
    assert len(losses) == 3
    # 9 full batches: the first eagerly (it creates Adam's state), then one recording and 8 replays
    assert stand_in.captures == 1 and stand_in.replays == 8


def test_fit_times_the_graph_variants_and_still_steps_exactly_like_eager(stand_in, monkeypatch):
    """fit records its step in each of the RIM's graph variants (on a GPU, the two layouts of the convolutions;
    here two that compute alike) and keeps one: the recordings' checks and timed replays are all undone, so the
    training is still eager fit's to the bit."""
    variants = tuple(Variant(name, contextlib.nullcontext) for name in ("a", "b"))
    monkeypatch.setattr(rim_fast.RIM, "cuda_graph_variants", lambda self: variants)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graphed, losses = _fit(True)
    assert not _graph_warnings(caught)
    eager, losses_eager = _fit(False, optimizer=_capturable_adam)
    _assert_same(graphed, eager, losses, losses_eager)
    # two recordings; one replay each to compare them, 3 rounds of 2 timed replays each, then the 8 steps
    assert stand_in.captures == 2 and stand_in.replays == 2 + 12 + 8


def test_fit_with_graphs_trains_like_the_default_eager_fit(stand_in):
    """The default eager fit (float learning rate, Adam not capturable) differs only in rounding."""
    graphed, losses = _fit(True)
    eager, losses_eager = _fit(False)
    assert losses == pytest.approx(losses_eager, rel=1e-5)
    for p, q in zip(graphed.model.parameters(), eager.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_adamw_class_and_user_capturable_optimizers_are_recorded(stand_in):
    adamw, losses = _fit(True, optimizer=torch.optim.AdamW, epochs=2)
    assert stand_in.replays == 5
    eager, losses_eager = _fit(False, epochs=2, optimizer=lambda p: torch.optim.AdamW(p, lr=torch.tensor(3e-3),
                                                                                       capturable=True))
    _assert_same(adamw, eager, losses, losses_eager)
    # a capturable Adam of the user's with a float learning rate: fit makes it a tensor, so the schedule is seen
    user = functools.partial(torch.optim.Adam, lr=3e-3, capturable=True)
    mine, losses = _fit(True, optimizer=user, epochs=2)
    assert stand_in.replays == 10
    eager, losses_eager = _fit(False, epochs=2, optimizer=_capturable_adam)
    _assert_same(mine, eager, losses, losses_eager)


def _sgd(params):
    return torch.optim.SGD(params, lr=3e-3, momentum=0.9)


@pytest.mark.parametrize("kw, why", [
    (dict(on_nan="skip"), "on_nan='skip'"),
    (dict(accumulate_grad_batches=2), "accumulate_grad_batches"),
    (dict(precision="16-mixed"), "16-mixed"),
    (dict(optimizer=_sgd), "SGD is not recorded"),
    (dict(optimizer=functools.partial(torch.optim.Adam, lr=3e-3)), "without capturable=True"),
], ids=["on_nan-skip", "accumulation", "16-mixed", "sgd", "adam-not-capturable"])
def test_what_cannot_be_recorded_warns_once_and_trains_like_eager(stand_in, kw, why):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graphed, losses = _fit(True, **kw)
    messages = [str(w.message) for w in _graph_warnings(caught)]
    assert len(messages) == 1 and why in messages[0] and "runs eagerly" in messages[0], messages
    assert stand_in.captures == 0
    eager, losses_eager = _fit(False, **kw)
    _assert_same(graphed, eager, losses, losses_eager)


def test_a_score_function_that_syncs_falls_back_with_one_warning(stand_in):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graphed, losses = _fit(True, score=syncing_score_fn)
    messages = [str(w.message) for w in _graph_warnings(caught)]
    assert len(messages) == 1 and "training step cannot be recorded" in messages[0], messages
    assert stand_in.captures == 1 and stand_in.replays == 0
    eager, losses_eager = _fit(False, score=syncing_score_fn, optimizer=_capturable_adam)
    # the failed recording's steps were undone: every batch stepped once
    _assert_same(graphed, eager, losses, losses_eager)
    with torch.no_grad():
        graphed.predict(torch.randn(2, 1, *D))  # the RIM stays usable


def test_on_the_cpu_without_a_recorder_it_warns_once_and_runs_eagerly():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graphed, losses = _fit(True, epochs=2)
    messages = [str(w.message) for w in _graph_warnings(caught)]
    assert len(messages) == 1 and "the RIM is on cpu; CUDA graphs need a GPU" in messages[0], messages
    eager, losses_eager = _fit(False, epochs=2)
    _assert_same(graphed, eager, losses, losses_eager)


def test_distributed_and_compile_are_not_recorded():
    class Group:
        on = True

    class Off:
        on = False

    rim = _rim()
    rim._graph_recorder = lambda: EagerRecorder()
    assert fit_graph.blocker(rim, FitConfig(), Group())[1] == "distributed training (DDP) is not recorded"
    assert "compile=True" in fit_graph.blocker(rim, FitConfig(compile=True), Off())[1]
    rim.__dict__["_compiled_loop"] = object()  # rim.compile() before fit
    assert "a compiled RIM" in fit_graph.blocker(rim, FitConfig(), Off())[1]
    del rim.__dict__["_compiled_loop"]
    assert fit_graph.blocker(rim, FitConfig(), Off())[1] is None
    with pytest.raises(TypeError, match="cuda_graphs"):
        FitConfig(cuda_graphs="yes")


def test_resume_with_graphs_reproduces_the_uninterrupted_run(stand_in, tmp_path):
    kw = dict(checkpoints=1, epochs=2)
    _, one_go = _fit(True, checkpoints_directory=str(tmp_path / "a"), **{**kw, "epochs": 4})
    _, half = _fit(True, checkpoints_directory=str(tmp_path / "b"), **kw)
    torch.manual_seed(1234)
    second, rest = _fit(True, seed=99, checkpoints_directory=str(tmp_path / "b"), **kw)
    assert half + rest == one_go
    first, _ = _fit(True, checkpoints_directory=str(tmp_path / "c"), **{**kw, "epochs": 4})
    _assert_same(second, first, rest, one_go[2:])
    # the optimizer file holds the capturable Adam's state: its step counter and moments
    opt = torch.load(ckpt.list_checkpoints(str(tmp_path / "b"))[-1].optimizer)
    assert opt["param_groups"][0]["capturable"] is True and float(opt["state"][0]["step"]) == 16


def test_a_checkpoint_resumes_across_graphs_on_and_off(stand_in, tmp_path):
    """A checkpoint of an eager run resumes with graphs (the Adam made capturable, its step counter on the
    device, its learning rate a tensor again), and the other way round."""
    kw = dict(checkpoints=1, epochs=2)
    _, one_go = _fit(False, checkpoints_directory=str(tmp_path / "a"), **{**kw, "epochs": 4})
    _, half = _fit(False, checkpoints_directory=str(tmp_path / "b"), **kw)
    _, rest = _fit(True, checkpoints_directory=str(tmp_path / "b"), **kw)
    assert stand_in.replays == 5
    assert half + rest == pytest.approx(one_go, rel=1e-5)
    _, back = _fit(False, checkpoints_directory=str(tmp_path / "b"), **kw)
    assert len(back) == 2 and all(l == l for l in back)
    opt = torch.load(ckpt.list_checkpoints(str(tmp_path / "b"))[-1].optimizer)
    assert opt["param_groups"][0]["capturable"] is False and not torch.is_tensor(opt["param_groups"][0]["lr"])


class CountingCuda(CudaRecorder):
    replays = captures = 0

    def capture(self, fn):
        out = super().capture(fn)
        CountingCuda.captures += 1
        return out

    def replay(self, graph, out):
        CountingCuda.replays += 1
        super().replay(graph, out)


@requires_cuda
def test_cuda_fit_with_graphs_trains_like_eager(monkeypatch):
    CountingCuda.replays = CountingCuda.captures = 0
    monkeypatch.setattr(rim_fast.RIM, "_graph_recorder", lambda self: CountingCuda(self.device))
    data = _data(9)
    graphed = _rim(device="cuda")
    losses = graphed.fit(data, cuda_graphs=True, **KW)
    # 11 steps from the graph; recorded in both layouts (RIM_FAST_CUDA_LAYOUT=auto), each graph replays once more
    # for the agreement check (keep_fastest; its timed replays do not go through replay())
    assert CountingCuda.captures == (len(graphed.cuda_graph_variants()) or 1)
    assert CountingCuda.replays == 3 * 4 - 1 + (CountingCuda.captures if CountingCuda.captures > 1 else 0)
    eager = _rim(device="cuda")
    losses_eager = eager.fit(data, optimizer=lambda p: torch.optim.Adam(p, lr=torch.tensor(3e-3, device="cuda"),
                                                                        capturable=True), **KW)
    # the capture runs the kernels (ops.graph_region), eager CUDA may run the references: rounding differs
    assert losses == pytest.approx(losses_eager, rel=1e-3)
    for p, q in zip(graphed.model.parameters(), eager.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)


def test_set_lr_keeps_a_tensor_rate_off_zero(stand_in):
    """A warm-up's first rate, 0, written into a capturable Adam's tensor learning rate would give NaN weights
    where a gradient is exactly zero (the step divides by the rate: 0 / 0): set_lr keeps it at LR_FLOOR, a step
    that leaves the weights where they were."""
    from rim_fast.cuda_graphs import LR_FLOOR, set_lr
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    optimizer = torch.optim.Adam([p], lr=torch.tensor(1e-3), capturable=True)
    set_lr(optimizer, 0.0)
    assert optimizer.param_groups[0]["lr"].item() == pytest.approx(LR_FLOOR, rel=1e-6)
    p.grad = torch.tensor([0.3, 0.0, 2.0])  # a parameter with an exact zero gradient (the zero-state shortcut's)
    optimizer.step()
    assert torch.isfinite(p).all() and torch.equal(p.detach(), torch.tensor([1.0, -2.0, 0.5]))
    set_lr(optimizer, 2e-3)
    assert optimizer.param_groups[0]["lr"].item() == pytest.approx(2e-3)
