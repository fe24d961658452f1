"""The CPU memory pool of a RIM call (rim_fast.cpu_pool, csrc/cpu_pool.cpp): blocks reused within and across calls,
small requests and other times left to torch's allocator, the allocator restored, tensors that outlive the pool
intact and listed when freed, nesting, threads, the switch, and the RIM's use of it (CPU calls, their backward
passes through the outputs too; outputs and gradients bit for bit those without the pool). Its speed is measured in
bench/results (page faults), not here."""
import os
import threading

import pytest
import torch

import rim_fast
from rim_fast import cpu_pool

MIB = 1 << 20


@pytest.fixture(autouse=True)
def pool():
    os.environ.pop("RIM_FAST_CPU_POOL", None)
    if not cpu_pool.available():
        pytest.skip("rim_fast._C is not loaded: no CPU pool")
    cpu_pool.release()
    yield
    assert cpu_pool.stats().depth == 0
    cpu_pool.release()


def _big(nbytes=MIB):
    return torch.empty(nbytes // 4, dtype=torch.float32)


def test_freed_block_is_handed_out_again():
    with cpu_pool.pooled() as opened:
        assert opened
        a = _big()
        ptr = a.data_ptr()
        before = cpu_pool.stats()
        del a
        assert cpu_pool.stats().listed == before.listed + 1
        b = _big()
        assert b.data_ptr() == ptr
        assert cpu_pool.stats().hits == before.hits + 1
        b.fill_(2.0)
        assert float(b.sum()) == 2.0 * b.numel()


def test_sizes_are_matched_by_page():
    # a request of another size is not served by a listed block; one in the same 4 KiB page count is
    with cpu_pool.pooled():
        a = _big()
        ptr = a.data_ptr()
        del a
        c = _big(2 * MIB)
        assert c.data_ptr() != ptr
        d = torch.empty(MIB // 4 - 10, dtype=torch.float32)
        assert d.data_ptr() == ptr


def test_small_requests_and_closed_pool_bypass_it():
    with cpu_pool.pooled():
        in_use = cpu_pool.stats().in_use
        small = torch.empty(1000)
        assert cpu_pool.stats().in_use == in_use
        del small
    # closed: torch's allocator is restored
    before = cpu_pool.stats()
    outside = _big()
    assert cpu_pool.stats().in_use == before.in_use and cpu_pool.stats().misses == before.misses
    del outside


def test_tensor_outliving_the_pool_stays_valid_and_is_listed_when_freed():
    with cpu_pool.pooled():
        a = torch.arange(MIB // 4, dtype=torch.float32)
        in_use = cpu_pool.stats().in_use
    assert torch.equal(a[:5], torch.arange(5, dtype=torch.float32))
    listed = cpu_pool.stats().listed
    # resized after the pool closed: the storage's allocator (the pool's) allocates while closed
    a.resize_(MIB)
    a[-1] = 7.0
    assert torch.equal(a[:5], torch.arange(5, dtype=torch.float32)) and float(a[-1]) == 7.0
    del a
    stats = cpu_pool.stats()
    # freed while closed (as the optimizer frees a training step's gradients): listed for the next call
    assert stats.in_use == in_use - 1 and stats.listed == listed + 2
    with cpu_pool.pooled():
        b = _big(4 * MIB)
        assert cpu_pool.stats().listed == listed + 1
        del b


def test_kept_for_two_calls_then_released():
    with cpu_pool.pooled():
        a = _big()
        ptr = a.data_ptr()
        del a
    assert cpu_pool.stats().listed == 1  # kept for the next call
    with cpu_pool.pooled():
        b = _big()
        assert b.data_ptr() == ptr  # the next call's first request reuses it
        del b
        c = _big(3 * MIB)
        del c
    assert cpu_pool.stats().listed == 2
    with cpu_pool.pooled():
        d = _big(2 * MIB)
        del d
    # both listed during the previous call or later: kept
    assert cpu_pool.stats().listed == 3
    with cpu_pool.pooled():
        e = _big(2 * MIB)
        del e
    # the 1 and 3 MiB blocks, last listed before the previous call and not reused since, were freed
    assert cpu_pool.stats().listed == 1 and cpu_pool.stats().listed_bytes == 2 * MIB
    with cpu_pool.pooled(keep=False):
        pass
    assert cpu_pool.stats().listed == 0
    with cpu_pool.pooled():
        f = _big()
        del f
    cpu_pool.release()
    assert cpu_pool.stats().listed_bytes == 0


def test_nested_opens_share_the_pool():
    with cpu_pool.pooled():
        with cpu_pool.pooled() as inner:
            assert inner and cpu_pool.stats().depth == 2
            a = _big()
            ptr = a.data_ptr()
        assert cpu_pool.stats().depth == 1
        del a  # still open: listed
        b = _big()
        assert b.data_ptr() == ptr
    assert cpu_pool.stats().depth == 0


def test_closed_after_an_error():
    with pytest.raises(RuntimeError, match="boom"):
        with cpu_pool.pooled():
            raise RuntimeError("boom")
    assert cpu_pool.stats().depth == 0


def test_switch_off(monkeypatch):
    monkeypatch.setenv("RIM_FAST_CPU_POOL", "0")
    assert not cpu_pool.available()
    with cpu_pool.pooled() as opened:
        assert not opened and cpu_pool.stats().depth == 0


def test_threads():
    # four threads open, allocate, write, check and free concurrently; blocks never alias between live tensors
    errors = []

    def work(seed):
        try:
            for i in range(30):
                with cpu_pool.pooled():
                    tensors = [torch.full((MIB // 4 * (1 + (seed + i + k) % 3),), float(seed * 100 + k))
                               for k in range(4)]
                    for k, t in enumerate(tensors):
                        if not bool((t == float(seed * 100 + k)).all()):
                            errors.append((seed, i, k))
                    del tensors
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert cpu_pool.stats().depth == 0


def _rim():
    torch.manual_seed(0)
    # activations of 4 x 16 x 66 x 62 floats (1 MiB): above the pool's 128 KiB
    net = rim_fast.Hourglass(1, dimensions=2, nf=16, ch_mult=(2,), hidden_units=8)
    score = lambda x, y: y - x  # noqa: E731
    return rim_fast.RIM((66, 62), net, T=3, score_fn=score, device="cpu")


def test_rim_predict_uses_the_pool_and_matches(monkeypatch):
    rim = _rim()
    y = torch.randn(4, 1, 66, 62)
    monkeypatch.setenv("RIM_FAST_CPU_POOL", "0")
    with torch.no_grad():
        expected = rim.predict(y)
    monkeypatch.delenv("RIM_FAST_CPU_POOL")
    before = cpu_pool.stats()
    with torch.no_grad():
        got = rim.predict(y)
        again = rim.predict(y)
    after = cpu_pool.stats()
    assert after.hits + after.misses > before.hits + before.misses  # the call allocated through the pool
    assert after.depth == 0
    assert torch.equal(got, expected) and torch.equal(again, expected)
    assert got.data_ptr() != again.data_ptr()  # a kept block is never one still in use


def _train_step(rim, y, x_true, pool: str):
    os.environ["RIM_FAST_CPU_POOL"] = pool
    try:
        rim.model.zero_grad(set_to_none=True)
        loss = rim.loss_fn(y, x_true)
        depths = []
        # the pool's depth while the backward pass computes a weight's gradient
        handle = rim.model.input_layer.weight.register_hook(lambda g: depths.append(cpu_pool.stats().depth))
        try:
            loss.backward()
        finally:
            handle.remove()
        return loss.detach(), [p.grad.clone() for p in rim.model.parameters()], depths
    finally:
        os.environ.pop("RIM_FAST_CPU_POOL")


def test_rim_training_uses_the_pool_in_forward_and_backward_and_matches():
    rim = _rim()
    y, x_true = torch.randn(4, 1, 66, 62), torch.randn(4, 1, 66, 62)
    expected_loss, expected_grads, depths = _train_step(rim, y, x_true, "0")
    assert depths == [0]
    misses = []
    for _ in range(3):
        before = cpu_pool.stats()
        loss, grads, depths = _train_step(rim, y, x_true, "1")
        after = cpu_pool.stats()
        misses.append(after.misses - before.misses)
        assert depths == [1]  # the backward pass ran with the pool open
        assert after.depth == 0  # and closed it at its end
        assert after.hits > before.hits
        assert torch.equal(loss, expected_loss)
        assert all(torch.equal(g, e) for g, e in zip(grads, expected_grads))
    # the second and later steps reuse the memory that the previous step's backward pass and optimizer freed
    assert misses[0] > 0 and misses[1] == misses[2] == 0


def test_trajectory_outputs_open_it_in_backward():
    rim = _rim()
    y = torch.randn(4, 1, 66, 62)
    out = rim(y)
    depths = []
    handle = rim.model.input_layer.weight.register_hook(lambda g: depths.append(cpu_pool.stats().depth))
    sum(x.square().mean() for x in out).backward()
    handle.remove()
    assert depths and min(depths) >= 1 and cpu_pool.stats().depth == 0
    with torch.no_grad():
        assert all(x.grad_fn is None and not x._backward_hooks for x in rim(y))


def test_a_failed_backward_pass_leaves_it_closed_at_the_next_call():
    def fail(grad):
        raise RuntimeError("boom in backward")

    rim = _rim()
    rim.model.input_layer.weight.register_hook(fail)
    y, x_true = torch.randn(4, 1, 66, 62), torch.randn(4, 1, 66, 62)
    with pytest.raises(RuntimeError, match="boom in backward"):
        rim.loss_fn(y, x_true).backward()
    # autograd runs no final callback for a failed pass: the pool is still open, until the next call closes it
    assert cpu_pool.stats().depth == 1
    with torch.no_grad():
        rim.predict(y)
    assert cpu_pool.stats().depth == 0
    with pytest.raises(RuntimeError, match="boom in backward"):
        rim.loss_fn(y, x_true).backward()
    assert cpu_pool.stats().depth == 1
    cpu_pool.release()  # release closes it too
    assert cpu_pool.stats().depth == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_while_another_thread_uses_the_pool():
    """A process forked (a DataLoader worker) while another thread holds the pool's lock gets it unlocked: each
    child allocates and frees a pooled block and exits. Without the fork handlers ~6 of 100 children hung."""
    import time
    import warnings
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            for _ in range(200):
                torch.empty(MIB // 4)  # allocated and freed through the pool (open for every thread)

    hung = 0
    with cpu_pool.pooled() as opened:
        assert opened
        thread = threading.Thread(target=churn)
        thread.start()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # Python 3.12: fork of a threaded process
                for _ in range(100):
                    pid = os.fork()
                    if pid == 0:
                        x = torch.empty(MIB // 4)
                        del x
                        os._exit(0)
                    deadline = time.monotonic() + 5.0
                    while os.waitpid(pid, os.WNOHANG)[0] == 0:
                        if time.monotonic() > deadline:
                            os.kill(pid, 9)
                            os.waitpid(pid, 0)
                            hung += 1
                            break
                        time.sleep(0.002)
        finally:
            stop.set()
            thread.join()
    assert hung == 0, f"{hung} of 100 forked children hung"


def test_benchmark_runs_in_smoke_mode():
    """bench/bench_cpu_pool.py (the pool's measured number) runs: the machine line, then a row per workload."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RIM_FAST_BENCH_", "PYTEST_XDIST_"))}
    env.update(RIM_FAST_BENCH_SMOKE="1", PYTHONPATH=root + os.pathsep + env.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "bench.bench_cpu_pool", "--rounds", "2"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("machine: ")
    assert "pool available: True" in proc.stdout
    rows = [line for line in lines if line.startswith("| S")]
    assert [row.split("|")[1].strip() for row in rows] == ["S1", "S2", "S3"]
