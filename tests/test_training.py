"""The production training path: gradient checkpointing (memory flat in T), mixed precision, loss weights,
gradient accumulation, exact resume, kill -9 safety, corrupt files, NaN handling, retention, progress bar and
loss curve. Distributed training is in test_ddp.py."""
import logging
import math
import os
import re
import runpy
import signal
import subprocess
import sys
import time
import warnings
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import rim
import rim_fast
from rim_fast import checkpoints as ckpt, ops
from rim_fast import training

from conftest import requires_cuda
from helpers import assert_close

D = (16,)


def score_fn(x, y):
    return y - 0.8 * x


def energy_fn(x, y):
    return 0.5 * ((y - 0.8 * x) ** 2).flatten(1).sum(1)


def _data(n=8, seed=0, dims=D):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, *dims, generator=g)
    y = 0.8 * x + 0.1 * torch.randn(n, 1, *dims, generator=g)
    return y, x, torch.utils.data.TensorDataset(y, x)


def _rim(seed=0, device="cpu", **kw):
    torch.manual_seed(seed)
    net = rim_fast.Hourglass(1, dimensions=1, nf=4, hidden_units=6)
    kw.setdefault("score_fn", score_fn)
    kw.setdefault("T", 3)
    return rim_fast.RIM(D, net, device=device, **kw)


def _state(r):
    return {k: v.detach().clone() for k, v in r.model.state_dict().items()}


def _assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- gradient checkpointing ---------------------------------------------------------------------------------

class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors created inside the block and still alive (storage-level, freed by weakref):
    what forward keeps for backward, plus what backward holds at its peak (recomputed activations included).
    A dispatch mode also sees the ops inside torch.func transforms, which saved_tensors_hooks cannot wrap."""

    def __init__(self):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0

    def _free(self, key):
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out


def _memory(T, checkpointing, size=16):
    """(bytes alive after forward, peak bytes over forward + backward) of loss_fn at T, default Hourglass."""
    torch.manual_seed(0)
    net = rim_fast.Hourglass(1, dimensions=2)  # torch_rim's defaults: nf=32, ch_mult=(2, 2), hidden_units=32
    r = rim_fast.RIM((size, size), net, score_fn=score_fn, T=T, device="cpu",
                     gradient_checkpointing=checkpointing)
    y, x = torch.randn(2, 1, size, size), torch.randn(2, 1, size, size)
    mode = LiveBytes()
    with mode:
        loss = r.loss_fn(y, x)
        after_forward = mode.current
        loss.backward()
    return after_forward, mode.peak


def test_gradient_checkpointing_keeps_memory_flat_in_T():
    plain = {T: _memory(T, False) for T in (10, 40)}
    flat = {T: _memory(T, True) for T in (10, 40)}
    print(f"\nbytes kept after forward / peak over forward+backward (default Hourglass, B=2, 16x16): "
          f"plain T=10 {plain[10]}, T=40 {plain[40]}; checkpointing T=10 {flat[10]}, T=40 {flat[40]}")
    # without checkpointing every step's activations are kept: memory grows ~linearly in T (the measure sees it)
    assert plain[40][1] > 3 * plain[10][1]
    assert flat[40][1] <= 1.3 * flat[10][1]
    assert flat[40][1] < plain[40][1] / 5


@pytest.mark.parametrize("kw", [
    dict(score_fn=score_fn, score_preprocessing_method="ADAM"),
    dict(score_fn=None, energy_fn=energy_fn, initialization_method="model", compat="fixed"),
    dict(score_fn=score_fn, score_preprocessing_method="RMSPROP", link_function=torch.nn.functional.softplus,
         inverse_link_function=lambda x: x + torch.log(-torch.expm1(-x))),
], ids=["adam", "energy-model-init", "rmsprop-link"])
def test_gradient_checkpointing_gives_the_same_gradients(kw):
    plain, ckpted = _rim(**kw), _rim(gradient_checkpointing=True, **kw)
    y, x, _ = _data(3)
    x = x.abs() + 0.1
    loss_p, loss_c = plain.loss_fn(y, x), ckpted.loss_fn(y, x)
    assert torch.equal(loss_p, loss_c)
    loss_p.backward()
    loss_c.backward()
    named_plain, params_ckpted = list(plain.model.named_parameters()), list(ckpted.model.parameters())
    assert len(named_plain) == len(params_ckpted)
    # rtol 1e-5 and atol 1e-6 of the gradient's largest entry: with checkpointing each step builds its own derived
    # weights (the merged output conv's product), so their gradients reach the parameters step by step instead of
    # summed over the steps first (another summation order: an entry that cancels to 1e-3 of its tensor's largest
    # moved by 1e-5 of itself)
    for (name, a), b in zip(named_plain, params_ckpted):
        assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6 * a.grad.abs().max().item(), msg=name)
    assert any(torch.count_nonzero(p.grad) for p in ckpted.model.parameters())


def test_gradient_checkpointing_loop_traces_as_one_graph():
    r = _rim(gradient_checkpointing=True, score_preprocessing_method="ADAM")
    y, x, _ = _data(2)
    explanation = torch._dynamo.explain(r._loop)(y, (), {}, x, False, None, torch.ones(3), False)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_fit_gradient_checkpointing_argument():
    _, _, data = _data(4)
    a, b = _rim(), _rim()
    losses_a = a.fit(data, epochs=2, batch_size=2, learning_rate=1e-3, verbose=-1)
    losses_b = b.fit(data, epochs=2, batch_size=2, learning_rate=1e-3, verbose=-1, gradient_checkpointing=True)
    assert losses_b == pytest.approx(losses_a, rel=1e-6)
    assert b.gradient_checkpointing is False  # fit's argument lasts for the call


# ---- mixed precision ----------------------------------------------------------------------------------------

def test_autocast_runs_the_network_in_bf16_and_keeps_the_state_fp32():
    r = _rim(score_preprocessing_method="ADAM", initialization_method="model", compat="fixed")
    y, x, _ = _data(2)
    seen = []
    r.model.register_forward_pre_hook(lambda m, args: seen.append(tuple(a.dtype for a in args
                                                                         if isinstance(a, torch.Tensor))))
    conv_out = []
    r.model.input_layer.register_forward_hook(lambda m, i, o: conv_out.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16), ops.trace() as calls:
        trajectory = r(y)
        prediction = r.predict(y)
        loss = r.loss_fn(y, x)
    # every conv + tanh in autocast's dtype: none as oneDNN's float32 fused primitive
    assert calls[("conv_tanh", "unfused")] > 0 and calls[("conv_tanh", "onednn_fused")] == 0
    assert all(dtype == torch.float32 for call in seen for dtype in call)  # x, y, score, h
    assert set(conv_out) == {torch.bfloat16}
    assert all(t.dtype == torch.float32 for t in trajectory) and prediction.dtype == torch.float32
    assert loss.dtype == torch.float32
    reference = r.loss_fn(y, x)
    assert_close(loss, reference, rtol=5e-2, atol=1e-3)
    assert not torch.equal(loss, reference)  # the network really ran in bf16
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in r.model.parameters())


def test_fit_bf16_mixed_trains():
    _, _, data = _data(8)
    r = _rim()
    losses = r.fit(data, epochs=6, batch_size=4, learning_rate=3e-3, precision="bf16-mixed", verbose=-1)
    assert all(l == l for l in losses) and losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in r.model.parameters())


def test_validation_metrics_are_computed_in_float32_under_mixed_precision(monkeypatch, one_thread):
    """SSIM's variances are differences of nearly equal moments: under a bfloat16 autocast its convolutions lose
    them (val_ssim of 1.0x for images of SSIM 0.98), so the metrics run with autocast off."""
    from rim_fast import metrics as fit_metrics
    seen, original = [], fit_metrics.image_metrics

    def spy(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return original(*args, **kwargs)
    monkeypatch.setattr(fit_metrics, "image_metrics", spy)
    _, _, data = _data(8)
    _rim().fit(data, epochs=1, batch_size=4, precision="bf16-mixed", val_dataset=data, verbose=-1)
    assert seen and not any(seen)


def test_bf16_mixed_needs_a_gpu_that_computes_in_bfloat16(monkeypatch):
    """Compute capability 8.0 on (torch.cuda.is_bf16_supported() also says yes where it emulates bfloat16)."""
    cuda = torch.device("cuda", 0)
    for capability, ok in (((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        if ok:
            training._check_precision("bf16-mixed", cuda)
        else:
            with pytest.raises(ValueError, match=rf"compute capability 8.0 or later\); cuda:0 has "
                                                 rf"{capability[0]}.{capability[1]}, where it is emulated"):
                training._check_precision("bf16-mixed", cuda)
        training._check_precision("16-mixed", cuda)
    training._check_precision("bf16-mixed", torch.device("cpu"))


def test_a_dataset_already_on_the_device_is_not_pinned():
    """Only CPU tensors can be pinned: fit's DataLoader pins nothing for a dataset kept on the GPU (meta tensors
    stand for it here), and pin_memory=True for one is an error naming the argument and the dataset."""
    from rim_fast import data as fit_data
    from rim_fast.fit_config import FitConfig
    cuda = torch.device("cuda", 0)
    on_gpu = torch.utils.data.TensorDataset(torch.empty(4, 1, 8, device="meta"), torch.empty(4, 1, 8, device="meta"))
    _, _, on_cpu = _data(4)
    assert fit_data._pinned(FitConfig(), cuda, on_cpu) and not fit_data._pinned(FitConfig(), cuda, on_gpu)
    with pytest.raises(ValueError, match=r"pin_memory=True, but val_dataset yields tensors on meta \(only CPU "
                                         r"tensors can be pinned\)"):
        fit_data._pinned(FitConfig(pin_memory=True), cuda, on_gpu, "val_dataset")


def test_the_optimizer_file_is_loaded_to_the_cpu(monkeypatch, tmp_path):
    """Optimizer.load_state_dict places each state tensor by its own policy (the moments on the parameters' device,
    a plain optimizer's step counter on the host): a file loaded onto a GPU would leave e.g. Adagrad's step
    counters there, a host sync per parameter and step."""
    files = ckpt.CheckpointFiles(index=1, score=None, model="m.pt", optimizer="o.pt", trainstate=None)
    calls = []
    monkeypatch.setattr(ckpt, "load_file", lambda path, map_location: calls.append((path, map_location)) or {})
    training._load_candidate(files, torch.device("cuda", 0))
    assert calls == [("m.pt", torch.device("cuda", 0)), ("o.pt", "cpu")]


# ---- loss weights -------------------------------------------------------------------------------------------

def test_time_weights_and_pixel_weights_match_the_trajectory():
    r = _rim(score_preprocessing_method="ADAM")
    y, x, _ = _data(3)
    B = y.shape[0]
    trajectory = r(y)
    per_step = torch.stack([((xt - x) ** 2).sum() / B for xt in trajectory])
    assert_close(r.loss_fn(y, x), per_step.sum())
    for t in range(r.T):
        one_hot = torch.zeros(r.T)
        one_hot[t] = 1
        assert_close(r.loss_fn(y, x, time_weights=one_hot), per_step[t])
    tw = [0.5, 1.0, 2.0]
    assert_close(r.loss_fn(y, x, time_weights=tw), (torch.tensor(tw) * per_step).sum())
    w = torch.rand(1, 1, *D)
    expected = sum((w * (xt - x) ** 2).sum() for xt in trajectory) / B
    assert_close(r.loss_fn(y, x, w=w), expected)
    # the defaults are torch_rim's loss, bit for bit
    assert torch.equal(r.loss_fn(y, x, w=torch.ones_like(x), time_weights=torch.ones(3)), r.loss_fn(y, x))
    # and through forward (the DDP pattern)
    assert torch.equal(r(y, x_true=x, w=w, time_weights=tw), r.loss_fn(y, x, w=w, time_weights=tw))


def test_time_weights_with_model_initialization_weigh_x0():
    r = _rim(initialization_method="model", compat="fixed", T=2)
    y, x, _ = _data(2)
    trajectory = r(y)
    assert len(trajectory) == 3
    per_step = torch.stack([((xt - x) ** 2).sum() / 2 for xt in trajectory])
    assert_close(r.loss_fn(y, x, time_weights=[1.0, 0.0, 0.0]), per_step[0])
    assert_close(r.loss_fn(y, x, time_weights=[0.0, 0.0, 3.0]), 3 * per_step[2])
    with pytest.raises(ValueError, match=r"shape \[3\].*T \+ 1"):
        r.loss_fn(y, x, time_weights=[1.0, 1.0])


def test_fit_with_weights():
    y, x, data = _data(4)
    w = torch.rand(1, 1, *D)
    a = _rim()
    # a tiny learning rate keeps the weights: the epoch loss is the weighted loss at the initial weights
    expected = a.loss_fn(y, x, w=w, time_weights=[0.0, 1.0, 2.0]).item()
    losses = a.fit(data, epochs=1, batch_size=4, learning_rate=1e-30, w=lambda y, x_true: w,
                   time_weights=[0.0, 1.0, 2.0], verbose=-1)
    assert losses[0] == pytest.approx(expected, rel=1e-6)


# ---- gradient accumulation ----------------------------------------------------------------------------------

def test_accumulation_equals_the_larger_batch_including_a_short_last_window():
    _, _, data = _data(6)
    a, b = _rim(), _rim()
    # batches of 2 in windows of 2 (the epoch's last window has 1 batch) = batches of 4 and 2
    losses_a = a.fit(data, epochs=3, batch_size=2, accumulate_grad_batches=2, learning_rate=1e-3, verbose=-1)
    b.fit(data, epochs=3, batch_size=4, learning_rate=1e-3, verbose=-1)
    named_a, params_b = list(a.model.named_parameters()), list(b.model.parameters())
    assert len(named_a) == len(params_b)
    for (name, pa), pb in zip(named_a, params_b):
        assert_close(pa, pb, rtol=1e-5, atol=1e-7, msg=name)
    assert len(losses_a) == 3


# ---- exact resume -------------------------------------------------------------------------------------------

def _scheduler(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)


RESUME_KW = dict(batch_size=2, shuffle=True, seed=5, learning_rate=3e-3, ema_decay=0.9, warmup=3,
                 scheduler=_scheduler, checkpoints=1, verbose=-1)


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path):
    _, _, data = _data(8)
    one_go = _rim(score_preprocessing_method="ADAM")
    losses = one_go.fit(data, epochs=4, checkpoints_directory=str(tmp_path / "a"), **RESUME_KW)
    first = _rim(score_preprocessing_method="ADAM")
    half = first.fit(data, epochs=2, checkpoints_directory=str(tmp_path / "b"), **RESUME_KW)
    # a fresh process would start from a fresh RIM (other weights) and a fresh RNG
    torch.manual_seed(1234)
    second = _rim(seed=99, score_preprocessing_method="ADAM")
    rest = second.fit(data, epochs=2, checkpoints_directory=str(tmp_path / "b"), **RESUME_KW)
    assert half + rest == losses  # exact float equality
    _assert_states_equal(_state(second), _state(one_go))
    # max_epochs counts from the checkpoint: nothing left to do
    assert second.fit(data, max_epochs=4, checkpoints_directory=str(tmp_path / "b"), **RESUME_KW) == []


def test_resume_on_more_processes_gives_the_new_ranks_their_own_streams():
    """A checkpoint saved by one process (or by fewer than resume it): rank 0 continues the saved streams, a rank
    the checkpoint has not draws its own from them, the same on every resume."""
    import random
    import types
    cpu = torch.device("cpu")

    def draws(rank, state):
        run = types.SimpleNamespace(group=types.SimpleNamespace(rank=rank), device=cpu)
        training._restore_rng(run, state)
        return torch.rand(4), random.random()

    torch.manual_seed(3)
    saved = {"rng": training._rng_state(cpu)}
    expected = torch.rand(4)
    assert torch.equal(draws(0, saved)[0], expected)
    new_rank = draws(1, saved)
    assert not torch.equal(new_rank[0], expected) and not torch.equal(new_rank[0], draws(2, saved)[0])
    assert torch.equal(draws(1, saved)[0], new_rank[0]) and draws(1, saved)[1] == new_rank[1]
    # saved per rank: each takes its own
    torch.manual_seed(4)
    mine = training._rng_state(cpu)
    own = torch.rand(4)
    per_rank = {"rng": saved["rng"], "rng_ranks": [saved["rng"], mine]}
    assert torch.equal(draws(1, per_rank)[0], own) and torch.equal(draws(0, per_rank)[0], expected)


def test_kill_9_at_any_moment_leaves_a_directory_that_loads_and_resumes_exactly(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("""
import sys, torch, rim_fast


def main(directory, final):
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 16, generator=g)
    y = 0.8 * x + 0.1 * torch.randn(16, 1, 16, generator=g)
    torch.manual_seed(0)
    net = rim_fast.Hourglass(1, dimensions=1, nf=4, hidden_units=6)
    r = rim_fast.RIM((16,), net, score_fn=lambda x, y: y - 0.8 * x, T=2, score_preprocessing_method="ADAM",
                     device="cpu")
    print("ready", flush=True)
    r.fit(torch.utils.data.TensorDataset(y, x), max_epochs=14, batch_size=2, shuffle=True, seed=3, ema_decay=0.9,
          learning_rate=1e-3, checkpoints_directory=directory, checkpoints=1, models_to_keep=2, verbose=-1)
    torch.save(r.model.state_dict(), final)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
""")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(__file__)),
                                                       os.environ.get("PYTHONPATH", "")]))

    def saved(directory):
        try:
            with open(os.path.join(directory, "score_sheet.txt")) as f:
                return len(f.read().splitlines())
        except FileNotFoundError:
            return 0

    def run(directory, final, kill=None):
        proc = subprocess.Popen([sys.executable, str(script), directory, final], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        if kill is None:
            _, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err[-3000:]
            return
        # kill once `after` checkpoints exist, `delay` seconds later: whatever the machine's speed, the kills
        # land at different points of an epoch (mid-step, mid-write, between files)
        after, delay = kill
        deadline = time.monotonic() + 120
        while saved(directory) < after and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)

    # the uninterrupted run, in this process (one thread, as the script)
    reference = str(tmp_path / "reference")
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(script))["main"](reference, str(tmp_path / "reference.pt"))
    finally:
        torch.set_num_threads(threads)
    directory = str(tmp_path / "killed")
    epochs_done = []
    for kill in ((2, 0.0), (6, 0.021), (10, 0.047)):
        run(directory, str(tmp_path / "unused.pt"), kill)
        found = ckpt.list_checkpoints(directory)
        if found:
            # every listed index is complete and every file loads; torch_rim and rim_fast read the directory
            for files in found:
                assert files.optimizer and files.trainstate
                for path in (files.model, files.optimizer, files.trainstate):
                    torch.load(path)
            epochs_done.append(torch.load(found[-1].trainstate)["epoch"])
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                rim_fast.RIM((16,), checkpoints_directory=directory, score_fn=score_fn, T=2, device="cpu")
            rim.RIM((16,), checkpoints_directory=directory, score_fn=score_fn, T=2, device="cpu")
    assert epochs_done and epochs_done[-1] < 14  # the kills interrupted training
    run(directory, str(tmp_path / "final.pt"))
    _assert_states_equal(torch.load(str(tmp_path / "final.pt")), torch.load(str(tmp_path / "reference.pt")))
    history = torch.load(ckpt.list_checkpoints(directory)[-1].trainstate)["losses"]
    assert history == torch.load(ckpt.list_checkpoints(reference)[-1].trainstate)["losses"]
    assert len(history) == 14
    assert not [n for n in os.listdir(directory) if n.startswith(".tmp_")]


# ---- corrupt files, NaN, retention --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["trainstate", "optimizer", "model"])
def test_corrupt_latest_files_fall_back_to_the_previous_checkpoint(tmp_path, kind):
    directory = str(tmp_path / "run")
    _, _, data = _data(4)
    r = _rim()
    r.fit(data, epochs=3, batch_size=2, checkpoints_directory=directory, checkpoints=1, models_to_keep=5,
          verbose=-1)
    found = ckpt.list_checkpoints(directory)
    bad = {"trainstate": found[-1].trainstate, "optimizer": found[-1].optimizer, "model": found[-1].model}[kind]
    with open(bad, "r+b") as f:
        f.truncate(os.path.getsize(bad) // 2)
    other = _rim(seed=7)
    with pytest.warns(RuntimeWarning, match=re.escape(os.path.basename(bad))):
        other.fit(data, epochs=0, checkpoints_directory=directory, verbose=-1)
    _assert_states_equal(_state(other), torch.load(found[-2].model))
    # training goes on with a new index: the corrupt one is never reused
    other.fit(data, epochs=1, batch_size=2, checkpoints_directory=directory, models_to_keep=5, verbose=-1)
    assert ckpt.list_checkpoints(directory)[-1].index == 4


def test_all_checkpoints_corrupt_is_an_error_naming_the_directory(tmp_path):
    directory = str(tmp_path / "run")
    _, _, data = _data(4)
    _rim().fit(data, epochs=1, batch_size=4, checkpoints_directory=directory, verbose=-1)
    with open(ckpt.list_checkpoints(directory)[0].model, "wb") as f:
        f.write(b"\0garbage")
    with pytest.warns(RuntimeWarning, match="checkpoint_"), pytest.raises(RuntimeError, match="no readable checkpoint"):
        _rim().fit(data, epochs=1, checkpoints_directory=directory, verbose=-1)


class _Poisoned(torch.utils.data.Dataset):
    """(y, x) pairs; y of the samples in ``bad`` (or of every sample after ``after`` reads) is NaN."""

    def __init__(self, y, x, bad=(), after=None):
        self.y, self.x, self.bad, self.after, self.reads = y, x, set(bad), after, 0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        self.reads += 1
        y = self.y[i]
        if i in self.bad or (self.after is not None and self.reads > self.after):
            y = torch.full_like(y, float("nan"))
        return y, self.x[i]


def test_nan_stops_without_touching_the_last_good_checkpoint(tmp_path):
    directory = str(tmp_path / "run")
    y, x, _ = _data(4)
    r = _rim()
    # 2 batches (4 reads) per epoch; epoch 3 reads NaN
    data = _Poisoned(y, x, after=8)
    with pytest.warns(RuntimeWarning, match="non-finite loss .* epoch 3.*reloaded from the last good checkpoint"):
        losses = r.fit(data, epochs=5, batch_size=2, checkpoints_directory=directory, checkpoints=1,
                       check_finite=False, verbose=-1)
    assert len(losses) == 2
    found = ckpt.list_checkpoints(directory)
    assert [f.index for f in found] == [1, 2]
    _assert_states_equal(_state(r), torch.load(found[-1].model))
    assert all(torch.isfinite(p).all() for p in r.model.parameters())
    with open(os.path.join(directory, "score_sheet.txt")) as f:
        assert len(f.read().splitlines()) == 2


def test_nan_skip_drops_only_the_bad_steps():
    y, x, _ = _data(4)
    a = _rim()
    with pytest.warns(RuntimeWarning, match="skipped 1 optimizer step"):
        losses = a.fit(_Poisoned(y, x, bad=[1]), epochs=2, batch_size=1, learning_rate=1e-3, on_nan="skip",
                       check_finite=False, verbose=-1)
    # the same as training on the three good samples
    b = _rim()
    keep = [0, 2, 3]
    expected = b.fit(torch.utils.data.TensorDataset(y[keep], x[keep]), epochs=2, batch_size=1, learning_rate=1e-3,
                     verbose=-1)
    assert losses == expected
    _assert_states_equal(_state(a), _state(b))


def test_check_finite_in_fit_and_in_the_rim():
    y, x, _ = _data(4)
    bad = _Poisoned(y, x, bad=[2])
    with pytest.raises(ValueError, match="y of batch 1 contains NaN or inf"):
        _rim().fit(bad, epochs=1, batch_size=2, verbose=-1)
    with pytest.warns(RuntimeWarning, match="contains NaN or inf"):
        _rim().fit(bad, epochs=1, batch_size=2, check_finite="warn", on_nan="skip", verbose=-1)
    y_bad = y.clone()
    y_bad[0, 0, 3] = float("inf")
    with pytest.raises(ValueError, match="y contains NaN or inf"):
        _rim(check_finite=True).predict(y_bad)
    with pytest.warns(RuntimeWarning, match="y contains NaN or inf"):
        _rim(check_finite="warn").predict(y_bad)
    _rim().predict(y_bad)  # off by default: no host sync


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, torch.complex64])
def test_the_batch_finite_check_is_exact(dtype):
    """fit's check of CPU batches (a sum, then the element check when the sum is not finite): every NaN or inf is
    found, and finite values whose sum overflows are not taken for one."""
    from rim_fast.data import _all_finite

    big = torch.finfo(dtype).max if not dtype.is_complex else torch.finfo(torch.float32).max
    x = torch.randn(3, 5, 7).to(dtype)
    assert _all_finite(x) and _all_finite(x[:0])
    assert _all_finite(torch.full((4,), big, dtype=dtype))  # the sum overflows; every element is finite
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in ((0, 0, 0), (2, 4, 6), (1, 2, 3)):
            y = x.clone()
            y[where] = bad
            assert not _all_finite(y), (bad, where)
    y = x.clone()
    y[0, 0, 0], y[1, 1, 1] = float("inf"), -float("inf")  # inf - inf: NaN
    assert not _all_finite(y)
    if dtype.is_complex:
        y = x.clone()
        y[1, 1, 1] = complex(0.0, float("nan"))
        assert not _all_finite(y)


def test_retention_prunes_every_file_and_orphans(tmp_path):
    directory = str(tmp_path / "run")
    _, _, data = _data(4)
    _rim().fit(data, epochs=1, batch_size=4, checkpoints_directory=directory, verbose=-1)
    # what a kill between the trainstate/optimizer writes and the model write leaves behind
    for kind in ("trainstate", "optimizer"):
        ckpt.atomic_save({}, os.path.join(directory, ckpt.checkpoint_name(kind, 1.0, 2)))
    with open(os.path.join(directory, ".tmp_abc_checkpoint_1.0000e+00_002.pt"), "wb") as f:
        f.write(b"partial")
    r = _rim()
    r.fit(data, epochs=4, batch_size=4, checkpoints_directory=directory, checkpoints=1, models_to_keep=2,
          verbose=-1)
    found = ckpt.list_checkpoints(directory)
    assert [f.index for f in found] == [5, 6]  # index 2 belonged to the interrupted write
    names = sorted(n for n in os.listdir(directory) if n.endswith((".pt", ".pth")) or n.startswith("."))
    assert names == sorted(os.path.basename(p) for f in found for p in (f.model, f.optimizer, f.trainstate))


def test_torch_rim_reads_and_prunes_a_rim_fast_directory(tmp_path):
    directory = str(tmp_path / "run")
    y, x, data = _data(4)
    trainer = _rim(T=2)
    trainer.fit(data, epochs=3, batch_size=2, ema_decay=0.5, checkpoints_directory=directory, checkpoints=1,
                verbose=-1)
    ref = rim.RIM(D, checkpoints_directory=directory, score_fn=score_fn, T=2, device="cpu")
    assert_close(ref.predict(y), trainer.predict(y))
    # torch_rim's retention globs *.pt: the .pth training states must not confuse it
    ref.fit(data, epochs=3, batch_size=2, checkpoints_directory=directory, checkpoints=1, models_to_keep=2)
    # and rim_fast resumes from torch_rim's newest checkpoint (no training state: weights and optimizer only)
    other = _rim(seed=3, T=2)
    other.fit(data, epochs=1, batch_size=2, checkpoints_directory=directory, checkpoints=1, models_to_keep=2,
              verbose=-1)
    found = ckpt.list_checkpoints(directory)
    assert [f.index for f in found] == [6, 7]
    # the training states orphaned by torch_rim's pruning are gone
    assert [n for n in os.listdir(directory) if n.endswith(".pth")] == [os.path.basename(found[-1].trainstate)]


# ---- progress bar and loss curve ----------------------------------------------------------------------------

def test_progress_bar_shows_running_loss_and_rate(capsys, monkeypatch):
    monkeypatch.setattr(training, "_PROGRESS_INTERVAL_S", 0.0)
    _, _, data = _data(4)
    _rim().fit(data, epochs=2, batch_size=2, verbose=0)
    err = capsys.readouterr().err
    assert re.search(r"loss=[0-9.]+e[+-][0-9]+", err)
    assert "step/s" in err or "s/step" in err
    assert "epoch=2" in err


def test_loss_curve_png_and_its_absence_without_matplotlib(tmp_path, monkeypatch, caplog):
    _, _, data = _data(4)
    directory = str(tmp_path / "run")
    _rim().fit(data, epochs=2, batch_size=4, checkpoints_directory=directory, verbose=-1)
    with open(os.path.join(directory, "loss_curve.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    directory = str(tmp_path / "run2")
    with caplog.at_level(logging.INFO, logger="rim_fast"):
        _rim().fit(data, epochs=2, batch_size=4, checkpoints_directory=directory, verbose=-1)
    assert "matplotlib is not installed" in caplog.text  # an information message (logging, not stdout)
    assert not os.path.exists(os.path.join(directory, "loss_curve.png"))
    assert len(ckpt.list_checkpoints(directory)) == 1


# ---- CUDA: the training path on the GPU (skipped without one) -----------------------------------------------

def _cuda_pair(**kw):
    """The same RIM (same seed, so the same weights) on the CPU and on CUDA."""
    return _rim(**kw), _rim(device="cuda", **kw)


@requires_cuda
@pytest.mark.parametrize("kw", [dict(score_preprocessing_method="ADAM"),
                                dict(score_preprocessing_method="RMSPROP", gradient_checkpointing=True)],
                         ids=["adam", "rmsprop-checkpointing"])
def test_cuda_fit_matches_the_cpu(kw):
    """fit on CUDA (CPU batches moved to the GPU, the auto backend's kernels, the GPU optimizer) gives the CPU's
    losses (fp32; TF32 off: the CPU has none. Not the weights element by element: Adam turns the rounding
    noise of a near-zero gradient into a full learning-rate step)."""
    _, _, data = _data(8)
    cpu, gpu = _cuda_pair(**kw)
    losses_cpu = cpu.fit(data, epochs=3, batch_size=4, learning_rate=1e-3, verbose=-1)
    losses_gpu = gpu.fit(data, epochs=3, batch_size=4, learning_rate=1e-3, verbose=-1)
    assert losses_gpu == pytest.approx(losses_cpu, rel=1e-3)
    assert all(p.is_cuda and bool(torch.isfinite(p).all()) for p in gpu.model.parameters())


@requires_cuda
def test_cuda_resume_continues_the_run(tmp_path):
    """A run on CUDA stopped after 2 epochs and resumed for 2 more (its training state, RNG states included, loaded
    onto the GPU) gives the uninterrupted run's losses."""
    _, _, data = _data(8)
    losses = _rim(device="cuda", score_preprocessing_method="ADAM").fit(
        data, epochs=4, checkpoints_directory=str(tmp_path / "a"), **RESUME_KW)
    half = _rim(device="cuda", score_preprocessing_method="ADAM").fit(
        data, epochs=2, checkpoints_directory=str(tmp_path / "b"), **RESUME_KW)
    torch.manual_seed(1234)
    rest = _rim(device="cuda", seed=99, score_preprocessing_method="ADAM").fit(
        data, epochs=2, checkpoints_directory=str(tmp_path / "b"), **RESUME_KW)
    assert half + rest == pytest.approx(losses, rel=1e-4)


@requires_cuda
def test_cuda_fit_with_compile_and_cuda_graphs_trains_like_eager():
    """fit(compile=True) on CUDA: the loop compiled with reduce-overhead (CUDA graphs), forward and backward,
    inside the training loop: the eager run's losses."""
    torch._dynamo.reset()
    _, _, data = _data(8)
    _, eager = _cuda_pair(score_preprocessing_method="ADAM")
    _, compiled = _cuda_pair(score_preprocessing_method="ADAM")
    losses_e = eager.fit(data, epochs=3, batch_size=4, learning_rate=1e-3, verbose=-1)
    losses_c = compiled.fit(data, epochs=3, batch_size=4, learning_rate=1e-3, verbose=-1, compile=True)
    assert compiled.__dict__.get("_uses_cuda_graphs") is True
    assert losses_c == pytest.approx(losses_e, rel=1e-3)


@requires_cuda
def test_cuda_fit_with_compile_and_gradient_accumulation_trains_like_eager():
    """accumulate_grad_batches=2 under rim.compile()'s CUDA graphs: the window's second backward adds into
    gradients the first left, which must not be graph memory the second replay overwrote."""
    torch._dynamo.reset()
    _, _, data = _data(8)
    _, eager = _cuda_pair(score_preprocessing_method="ADAM")
    _, compiled = _cuda_pair(score_preprocessing_method="ADAM")
    kw = dict(epochs=3, batch_size=2, accumulate_grad_batches=2, learning_rate=1e-3, verbose=-1)
    losses_e = eager.fit(data, **kw)
    losses_c = compiled.fit(data, compile=True, **kw)
    assert compiled.__dict__.get("_uses_cuda_graphs") is True
    assert losses_c == pytest.approx(losses_e, rel=1e-3)


@requires_cuda
def test_cuda_fit_bf16_mixed_trains():
    _, _, data = _data(8)
    _, r = _cuda_pair()
    losses = r.fit(data, epochs=6, batch_size=4, learning_rate=3e-3, precision="bf16-mixed", verbose=-1)
    assert all(l == l for l in losses) and losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 and p.is_cuda for p in r.model.parameters())


def _cuda_peak_bytes(T, checkpointing):
    """Peak CUDA bytes over loss_fn + backward above what was allocated before (default Hourglass, B=4, 64x64)."""
    torch.manual_seed(0)
    net = rim_fast.Hourglass(1, dimensions=2)
    r = rim_fast.RIM((64, 64), net, score_fn=score_fn, T=T, device="cuda", gradient_checkpointing=checkpointing)
    y, x = torch.randn(4, 1, 64, 64, device="cuda"), torch.randn(4, 1, 64, 64, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    r.loss_fn(y, x).backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@requires_cuda
def test_cuda_gradient_checkpointing_keeps_training_memory_flat_in_T():
    plain = {T: _cuda_peak_bytes(T, False) for T in (10, 40)}
    flat = {T: _cuda_peak_bytes(T, True) for T in (10, 40)}
    print(f"\nCUDA peak bytes over loss+backward (default Hourglass, B=4, 64x64): plain T=10 {plain[10]}, "
          f"T=40 {plain[40]}; checkpointing T=10 {flat[10]}, T=40 {flat[40]}")
    assert plain[40] > 2.5 * plain[10]  # every step's activations kept: ~linear in T
    # with checkpointing only each step's inputs (x, h, moments) are kept: growth at least 10x smaller
    assert flat[40] - flat[10] < (plain[40] - plain[10]) / 10
    assert flat[40] < plain[40] / 4


# ---- real training runs: validation, monitor, best checkpoints, loggers (issue 14) ---------------------------

def _deblur_rim(problem, seed=0):
    torch.manual_seed(seed)
    net = rim_fast.Unet(1, dimensions=2, nf=4, ch_mult=(2, 2), hidden_units=6)
    return rim_fast.RIM((16, 16), net, score_fn=problem.score_fn, T=2, score_preprocessing_method="ADAM",
                        initialization_method="approximate_inverse", approximate_inverse_fn=lambda y: y, device="cpu")


def test_deblur_run_with_validation_keeps_the_best_checkpoints_by_val_psnr(tmp_path, one_thread):
    """The demo's deblurring problem with a validation set: metrics.csv and the TensorBoard events read back,
    the checkpoints kept are the best by val_psnr (and the latest), and the best reloaded gives its epoch's PSNR."""
    pytest.importorskip("tensorboard")
    import csv
    import json
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from rim_fast.demo import DeblurProblem
    from rim_fast import metrics

    problem = DeblurProblem(size=16, seed=0)
    y, x, s = problem.sample(32)
    yv, xv, sv = problem.sample(8)
    directory = str(tmp_path / "run")
    _deblur_rim(problem).fit(
        torch.utils.data.TensorDataset(y, x, s), epochs=8, batch_size=8, learning_rate=1e-2,
        checkpoints_directory=directory, checkpoints=1, models_to_keep=2, loss_curve=False, verbose=-1,
        val_dataset=torch.utils.data.TensorDataset(yv, xv, sv), data_range=1.0, monitor="val_psnr",
        loggers=["csv", "tensorboard"])
    with open(os.path.join(directory, "metrics.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    psnr = {int(r["epoch"]): float(r["val_psnr"]) for r in rows}
    assert sorted(psnr) == list(range(1, 9)) and all(r["val_ssim"] and r["val_loss"] for r in rows)
    best_epoch = max(psnr, key=psnr.get)
    assert best_epoch != 8, psnr  # the data make the best not the latest: the test tells best from newest

    # kept: the two best by val_psnr and the latest (for resume); one checkpoint per epoch, so index = epoch
    kept = [f.index for f in ckpt.list_checkpoints(directory)]
    assert kept == sorted(set(sorted(psnr, key=psnr.get, reverse=True)[:2]) | {8})
    assert all(int(r["checkpoint"]) == int(r["epoch"]) for r in rows)
    best = ckpt.best_checkpoint(directory, "val_psnr")
    assert best.index == best_epoch

    # the best reloaded gives that epoch's PSNR (the model file holds the weights validation used)
    reloaded = _deblur_rim(problem, seed=1)
    reloaded.model.load_state_dict(torch.load(best.model))
    with torch.no_grad():
        value = metrics.psnr(reloaded.predict(yv, sv), xv, data_range=1.0).mean().item()
    assert value == pytest.approx(psnr[best_epoch], rel=1e-5)

    # the TensorBoard events hold the same values, and validation images of the 2D data
    events = EventAccumulator(os.path.join(directory, "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("val/psnr")] == list(range(1, 9))
    assert [e.value for e in events.Scalars("val/psnr")] == pytest.approx([psnr[e] for e in range(1, 9)], rel=1e-6)
    assert {"val/observation", "val/estimate", "val/target"} <= set(events.Tags()["images"])
    # the configuration, in readable form, with the directory and in each training state
    with open(os.path.join(directory, "fit_config.json")) as f:
        saved = json.load(f)
    assert saved["monitor"] == "val_psnr" and saved["data_range"] == 1.0
    assert torch.load(best.trainstate)["config"] == saved


def test_an_empty_dataloader_is_refused():
    _, _, data = _data(8)
    with pytest.raises(ValueError, match="dataset: the DataLoader gives no batch$"):
        _rim().fit(torch.utils.data.DataLoader(data, batch_size=10, drop_last=True), epochs=1, verbose=-1)


def test_fits_warnings_point_at_the_users_line():
    """However deep in fit a warning is raised, it names the caller's file and line (not rim.py's RIM.fit)."""
    _, _, data = _data(4)
    loader = torch.utils.data.DataLoader(data, batch_sampler=[[0, 1], [2, 3]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        _rim().fit(loader, epochs=1, accumulate_grad_batches=2, optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                   learning_rate=0.5, verbose=-1)
    ours = [w for w in caught if "accumulate_grad_batches=2" in str(w.message) or "is unused" in str(w.message)]
    assert len(ours) == 2
    assert all((w.filename, w.lineno) == (__file__, line) for w in ours), [(w.filename, w.lineno) for w in ours]


def test_your_dataloader_and_fits_workers_train_alike(one_thread):
    """fit(DataLoader) = fit(dataset) at the same batches; num_workers=2 (persistent) = num_workers=0 with a
    shuffled, seeded order; set_epoch is called on a sampler that has it; batches are not pinned on the CPU."""
    _, _, data = _data(8)
    kw = dict(epochs=2, learning_rate=1e-3, verbose=-1)
    reference = _rim().fit(data, batch_size=2, shuffle=True, seed=4, **kw)
    workers = _rim().fit(data, batch_size=2, shuffle=True, seed=4, num_workers=2, persistent_workers=True, **kw)
    assert workers == reference

    class EpochSampler(torch.utils.data.SequentialSampler):
        epochs = []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

    loader = torch.utils.data.DataLoader(data, batch_size=2, sampler=EpochSampler(data))
    assert _rim().fit(loader, **kw) == _rim().fit(data, batch_size=2, **kw)
    assert EpochSampler.epochs == [0, 1]


def test_batches_move_non_blocking_only_when_pinned(monkeypatch, caplog, one_thread):
    from rim_fast import data as fit_data
    from rim_fast.fit_config import FitConfig
    calls = []
    original = fit_data.to_device
    monkeypatch.setattr(fit_data, "to_device", lambda v, d, non_blocking: calls.append(non_blocking) or
                        original(v, d, non_blocking))
    _, _, data = _data(4)
    with caplog.at_level(logging.INFO, logger="rim_fast"):
        _rim().fit(data, epochs=1, batch_size=2, pin_memory=True, verbose=-1)
    assert calls and not any(calls)  # the CPU: nothing pinned, plain copies
    assert "batches are not pinned" in caplog.text
    # on CUDA pinning is the default, and can be turned off
    cuda = torch.device("cuda", 0)
    assert fit_data._pinned(FitConfig(), cuda) and not fit_data._pinned(FitConfig(pin_memory=False), cuda)


def test_bad_data_arguments_name_the_argument(tmp_path, one_thread):
    _, _, data = _data(4)
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    with pytest.raises(ValueError, match=r"num_workers, drop_last: options of the DataLoader fit builds"):
        _rim().fit(loader, epochs=1, num_workers=2, drop_last=True, verbose=-1)
    with pytest.raises(ValueError, match=r"batch_size=4 but the DataLoader given as dataset has batch_size=2"):
        _rim().fit(loader, epochs=1, batch_size=4, verbose=-1)
    with pytest.raises(ValueError, match=r"persistent_workers=True needs worker processes"):
        _rim().fit(data, epochs=1, persistent_workers=True, verbose=-1)
    with pytest.raises(ValueError, match=r"multiprocessing_context='spawn' needs worker processes"):
        _rim().fit(data, epochs=1, multiprocessing_context="spawn", verbose=-1)
    with pytest.raises(ValueError, match=r"multiprocessing_context must be one of \(.*'forkserver'.*\), got "
                                         r"'fork_server'"):
        _rim().fit(data, epochs=1, num_workers=1, multiprocessing_context="fork_server", verbose=-1)
    with pytest.raises(TypeError, match=r"multiprocessing_context must be None, a start method name or a "
                                        r"multiprocessing context, got int"):
        _rim().fit(data, epochs=1, num_workers=1, multiprocessing_context=1, verbose=-1)
    by_sampler = torch.utils.data.DataLoader(data, batch_sampler=[[0, 1], [2], [3]])
    with pytest.warns(RuntimeWarning, match=r"accumulate_grad_batches=2 with a DataLoader \(dataset\) that has no "
                                            r"fixed batch_size"):
        _rim().fit(by_sampler, epochs=1, accumulate_grad_batches=2, verbose=-1)
    with pytest.raises(ValueError, match=r"drop_last=True leaves no batch: 4 samples < batch_size=8"):
        _rim().fit(data, epochs=1, batch_size=8, drop_last=True, verbose=-1)


def test_multiprocessing_context_reaches_fits_dataloaders():
    """multiprocessing_context (a start method's name or a context) starts the workers of the DataLoaders fit
    builds, for training and validation; under DDP the validation DataLoader of the user's, rebuilt sharded, keeps
    its own."""
    import multiprocessing
    from types import SimpleNamespace
    from rim_fast import data as fit_data
    from rim_fast.fit_config import FitConfig
    _, _, data = _data(4)
    cpu, alone = torch.device("cpu"), SimpleNamespace(on=False)
    for given in ("forkserver", multiprocessing.get_context("spawn")):
        config = FitConfig(num_workers=1, multiprocessing_context=given)
        expected = multiprocessing.get_context(given) if isinstance(given, str) else given
        assert fit_data.train_loader(data, config, alone, cpu, None)[0].multiprocessing_context is expected
        assert fit_data.val_loader(data, config, alone, cpu)[0].multiprocessing_context is expected
    assert fit_data.train_loader(data, FitConfig(num_workers=1), alone, cpu, None)[0].multiprocessing_context is None
    user = torch.utils.data.DataLoader(data, batch_size=2, num_workers=1, multiprocessing_context="spawn")
    sharded = fit_data.val_loader(user, FitConfig(), SimpleNamespace(on=True, rank=0, world=2), cpu)[0]
    assert sharded is not user and sharded.multiprocessing_context is user.multiprocessing_context


def test_bad_validation_and_monitor_name_the_argument_and_write_nothing(tmp_path, one_thread):
    y, x, data = _data(4)
    directory = str(tmp_path / "run")
    cases = [
        (dict(val_dataset=torch.utils.data.TensorDataset(y, x, x)), ValueError,
         r"val_dataset yields tuples of 3 \(y, x_true and 1 score-function arguments\) but the training data "
         r"yields 2"),
        (dict(val_dataset=torch.utils.data.TensorDataset(y, x[..., :8])), ValueError,
         r"val_dataset: x_true of item 0 has shape \(1, 8\); the RIM's x is \[C, \*dimensions\] = \(1, 16\)"),
        (dict(val_dataset=torch.utils.data.TensorDataset(y[..., :12], x)), ValueError,
         r"val_dataset: y of item 0 has shape \(1, 12\), the training data's has \(1, 16\)"),
        (dict(val_dataset=[torch.zeros(3)]), ValueError, r"val_dataset must yield tuples \(y, x_true, \*args\)"),
        (dict(monitor="val_accuracy"), ValueError, r"monitor must be one of \('train_loss', 'val_loss', "),
        (dict(monitor="val_psnr"), ValueError, r"monitor='val_psnr' follows a validation metric: pass val_dataset"),
        (dict(optimizer="adam"), TypeError, r"optimizer must be callable \(an optimizer class"),
        (dict(val_every=0), ValueError, r"val_every must be an int >= 1, got 0"),
        (dict(data_range=0), ValueError, r"data_range must be a finite number > 0"),
    ]
    for kw, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            _rim(T=2).fit(data, epochs=1, checkpoints_directory=directory, verbose=-1, **kw)
        assert not os.path.exists(directory), kw
    small = rim_fast.RIM((8,), rim_fast.Hourglass(1, dimensions=1, nf=4, hidden_units=6), score_fn=score_fn, T=2,
                         device="cpu")
    with pytest.raises(ValueError, match=r"monitor='val_ssim': SSIM's Gaussian window needs spatial sizes >= 11, "
                                         r"the RIM's are \(8,\)"):
        small.fit(torch.utils.data.TensorDataset(y[..., :8], x[..., :8]), epochs=1, monitor="val_ssim",
                  val_dataset=torch.utils.data.TensorDataset(y[..., :8], x[..., :8]), verbose=-1)
    # an unwritable logdir (a file in the way; a permission check means nothing to root)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"logdir: cannot create .*file/run' \(logdir/logname\)"):
        _rim().fit(data, epochs=1, logdir=str(blocker), logname="run", verbose=-1)


def test_validation_metrics_are_the_mean_over_samples_with_the_ema_weights(tmp_path, one_thread):
    """val_* = the metrics of predict (EMA weights) averaged over the samples, whatever the batching; the
    estimate is predict's (physical space, link function applied)."""
    from rim_fast import metrics
    y, x, data = _data(8)
    x = x.abs() + 0.5
    link = dict(link_function=torch.nn.functional.softplus,
                inverse_link_function=lambda v: v + torch.log(-torch.expm1(-v)))
    val = torch.utils.data.TensorDataset(y[:5], x[:5])
    seen = []

    class Keep(rim_fast.loggers.Logger):
        def on_epoch_end(self, state):
            seen.append(state.val)

    r = _rim(**link)
    r.fit(torch.utils.data.TensorDataset(y, x), epochs=2, batch_size=4, learning_rate=1e-2, ema_decay=0.5,
          val_dataset=val, val_batch_size=2, loggers=[Keep()], verbose=-1)
    # after fit the network holds the EMA weights: what validation used at the last epoch
    with torch.no_grad():
        estimate = r.predict(y[:5])
        expected = {"val_mse": metrics.mse(estimate, x[:5]).mean(), "val_psnr": metrics.psnr(estimate, x[:5]).mean(),
                    "val_nmse": metrics.nmse(estimate, x[:5]).mean(), "val_ssim": metrics.ssim(estimate, x[:5]).mean(),
                    "val_loss": r.loss_fn(y[:5], x[:5])}
    assert set(seen[-1]) == set(expected)
    for name, value in expected.items():
        assert seen[-1][name] == pytest.approx(float(value), rel=1e-5), name


def test_monitor_drives_patience_in_validations(one_thread):
    y, x, data = _data(4)
    # a tiny learning rate: val_loss never improves after the first validation; patience counts validations
    losses = _rim().fit(data, epochs=20, batch_size=4, learning_rate=1e-30, val_dataset=data, val_every=2,
                        monitor="val_loss", patience=2, tolerance=0.5, verbose=-1)
    assert len(losses) == 6  # validations at epochs 2 (best), 4, 6 (patience 0)


@pytest.mark.parametrize("precision", ["32", "16-mixed"])
def test_optimizer_argument_and_16_mixed_resume_exactly(tmp_path, precision, one_thread):
    """optimizer= a class or a callable; 16-mixed (GradScaler) with accumulation, clipping and on_nan='skip'
    trains, and resumes bit for bit (the scaler's state is in the training state)."""
    import functools
    _, _, data = _data(8)
    # batches of 1 and windows of 2: enough optimizer steps for the GradScaler to find its scale (it skips the
    # steps whose float16 gradients overflow, halving the scale from 2**16)
    kw = dict(batch_size=1, accumulate_grad_batches=2, clip=1.0, on_nan="skip", checkpoints=1, shuffle=True, seed=2,
              precision=precision, optimizer=functools.partial(torch.optim.AdamW, lr=3e-3, weight_decay=0.1),
              verbose=-1, loss_curve=False)
    one_go = _rim().fit(data, epochs=4, checkpoints_directory=str(tmp_path / "a"), **kw)
    half = _rim().fit(data, epochs=2, checkpoints_directory=str(tmp_path / "b"), **kw)
    torch.manual_seed(99)
    rest = _rim(seed=5).fit(data, epochs=2, checkpoints_directory=str(tmp_path / "b"), **kw)
    assert half + rest == one_go and all(math.isfinite(l) for l in one_go) and one_go[-1] < one_go[0]
    state = torch.load(ckpt.list_checkpoints(str(tmp_path / "b"))[-1].trainstate)
    assert state["optimizer_class"] == "AdamW" and ("scaler" in state) == (precision == "16-mixed")
    with pytest.raises(RuntimeError, match=r"was trained with AdamW; optimizer= gives Adam"):
        _rim().fit(data, epochs=1, checkpoints_directory=str(tmp_path / "b"), verbose=-1)
    # an optimizer class takes learning_rate; torch.optim.Adam is the default, number for number
    a = _rim().fit(data, epochs=2, batch_size=4, learning_rate=1e-3, optimizer=torch.optim.Adam, verbose=-1)
    assert a == _rim().fit(data, epochs=2, batch_size=4, learning_rate=1e-3, verbose=-1)


def test_fit_phases_are_short_and_the_config_is_one_object():
    """fit's arguments become one FitConfig; the phases of training are named functions of at most 80 lines."""
    import inspect
    from rim_fast import fit_config
    too_long = [name for name, fn in inspect.getmembers(training, inspect.isfunction)
                if fn.__module__ == training.__name__ and len(inspect.getsource(fn).splitlines()) > 80 + 1]
    assert not too_long
    for phase in ("_prepare", "_open_directory", "_resume", "_loaders", "_train_epoch", "train_step",
                  "_optimizer_step", "_validate", "_monitor", "_checkpoint", "_end"):
        assert callable(getattr(training, phase))
    fit_args = set(inspect.signature(training.fit).parameters) - {"rim", "dataset", "val_dataset"}
    assert fit_args == {f.name for f in __import__("dataclasses").fields(fit_config.FitConfig)}
