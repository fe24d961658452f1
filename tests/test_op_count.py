"""bench/op_count.py: ops per RIM step that would launch a GPU kernel, counted on the CPU."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.op_count import LaunchCounter, count  # noqa: E402


def test_views_metadata_and_allocations_launch_nothing():
    x = torch.randn(4, 6)
    with LaunchCounter() as counter:
        x.view(2, 12)
        x.t()
        x[:, 1:3]
        x.unsqueeze(0).expand(3, 4, 6)
        x.reshape(24)
        torch.empty(5)
        torch.empty_like(x)
        x.shape, x.size(0)
    assert counter.total == 0, counter.counts
    with LaunchCounter() as counter:
        y = x + 1
        torch.tanh(y)
        x.t().contiguous()  # a real copy
        torch.cat([x, x])
    assert counter.total == 4, counter.counts


def test_counts_per_provider_and_mode():
    """On a tiny workload: torch_rim launches the most, the references fewer, and with each gate and update-step
    call as one kernel fewer still; a training step more than a prediction."""
    totals = {(p, m): sum(count(p, m, "S1", T=2).values())
              for p in ("torch_rim", "reference", "kernels") for m in ("predict", "train_step")}
    for mode in ("predict", "train_step"):
        assert totals[("kernels", mode)] < totals[("reference", mode)] < totals[("torch_rim", mode)], totals
    for provider in ("torch_rim", "reference", "kernels"):
        assert totals[(provider, "train_step")] > totals[(provider, "predict")]
    kernels = count("kernels", "train_step", "S1", T=2)
    assert kernels["rim_fast::update_state"] == 2 and kernels["rim_fast::update_state_backward"] == 2
    assert "rim_fast::preprocess_score" not in kernels  # Identity preprocessing launches nothing


def test_merged_gru_weights_are_built_once_per_call():
    """layers.per_call_cache: the GRUs' merged weights (and the zero-state shortcut's zero-gradient term) are built
    once per RIM call, so the ops that grow with T are the steps' own: two more steps add two steps' worth."""
    for mode in ("predict", "train_step"):
        c2, c4, c6 = (count("kernels", mode, "S1", T=T) for T in (2, 4, 6))
        step = {op: (c4[op] - c2[op]) / 2 for op in c4}
        assert all(c6[op] - c4[op] == c4[op] - c2[op] for op in c6), (c2, c4, c6)  # linear in T
        # per step: the network's input [x, score] only; no weight concatenation, and no state [h_1, h_2]: with
        # torch_rim's stale first GRU the GRUBlock carries h_2 alone (h_1 stays zero)
        assert step["aten.cat"] == 1, step
        assert c2["aten.cat"] - 2 * step["aten.cat"] >= 4  # the merged weights, once per call
