"""End-to-end RIM benchmark: torch_rim 0.2.9 against rim_fast, eager and compiled (pytest runs the cases).

One case = workload x mode x provider, all on one device (``RIM_FAST_BENCH_DEVICE``, default cuda when
available). Every provider runs the same weights (torch_rim's model, its state_dict copied into rim_fast's),
the same inputs and the same linear score function (a fixed [1, 2, 1]/4 blur A per axis: A^T (y - A x)).

Order: the (workload, mode) groups run in ``bench.common.PRIORITY`` order (L2 predict, S2 predict, S2 train_step,
S1 predict, S1 train_step, L2 train_step, then the others in table order), each group's providers in ``PROVIDERS``
order (eager first; rim_fast's compiled case before torch_rim's). bench/gpu_check.sh interrupts a run at its time
box, so what a cut loses is the least important. ``RIM_FAST_BENCH_GROUPS=S1:train_step,L2:train_step`` runs exactly
those groups, in that order (e.g. a second GPU run for what the first one cut).

Providers
  torch_rim            torch_rim's RIM, eager (the baseline of every Hourglass workload)
  rim_fast_reference   rim_fast with ``ops.use_backend("reference")`` (pure PyTorch)
  rim_fast             rim_fast as imported (``RIM_FAST_BACKEND``, default auto; on CUDA, predict replays the whole
                       loop from a CUDA graph recorded on the first call, in the faster of the two layouts of the
                       convolutions as that call timed them: rim_fast.cuda_graphs; the report shows the choice)
  rim_fast_nographs    the same with ``RIM(cuda_graphs=False)``: the graphs' effect is its own number (CUDA only; on
                       the CPU it is rim_fast)
  rim_fast_cl          rim_fast with the CUDA convolutions in channels-last layout (``RIM_FAST_CUDA_LAYOUT``,
                       rim_fast/ops/_cudnn.py), graphs and all (CUDA only)
  rim_fast_graphed     train_step only: the whole step recorded once as one CUDA graph and replayed, as
                       ``fit(cuda_graphs=True)`` records it (``rim_fast.cuda_graphs.TrainStepGraph``, Adam with
                       ``capturable=True`` and its learning rate a device tensor). CUDA only by default; named on the
                       CPU it runs through the CPU stand-in recorder (``EagerRecorder``: each "replay" runs the step
                       again) with SGD (momentum 0.9), since Adam reads its step count on the host unless capturable,
                       which only GPUs allow: a test of the plumbing, not a speed
  rim_fast_graphed_cl  rim_fast_graphed in channels-last layout (CUDA only)
  rim_fast_compiled    ``RIM.compile()``: the whole T-step loop as one graph (fullgraph; CUDA graphs on CUDA)
  torch_rim_compiled   torch.compile(rim.predict) / torch.compile(rim.loss_fn), no fullgraph (the graph count and
                       graph breaks are recorded). On CUDA with ``mode="reduce-overhead"``: the fair compiled
                       baseline, CUDA graphs on both sides. On the CPU, where there are no CUDA graphs, default mode.
Modes
  predict              ``rim.predict(y)`` under ``torch.no_grad``
  train_step           zero_grad, ``loss_fn(y, x_true)``, backward, Adam step (the optimizer stays eager, except
                       in rim_fast_graphed's graph)

U2 runs rim_fast's Unet; torch_rim 0.2.9's ``Unet`` is an empty stub, so its torch_rim cases are skipped and its
baseline is ``rim_fast_reference``.

Each group (workload, mode) runs its providers side by side, so that a machine's drift (another job, clocks,
thermal state) hits them all alike: first each provider is built, warmed up (compile, autotune, CUDA-graph capture;
compiled providers 3 calls on CUDA, where the CUDA-graph trees warm up, record, then replay, else 1; eager providers
1), outside the timed region, and given one check call (train_step restores the initial weights first) whose output
(predict) or loss and parameter gradients (train_step) are compared with a reference; then the timed calls are
interleaved round by round, A B C A B C ..., until every provider has at least MIN_ROUNDS calls and MIN_SECONDS of
timed calls (CUDA: 20 calls and 0.5 s; CPU: 5 calls and 2 s), at most MAX_ROUNDS rounds (CUDA 100, CPU 20) or, once
MIN_ROUNDS are done, BUDGET_S seconds per provider (CUDA 3, CPU 60). CUDA: each call between two CUDA events
recorded on the current stream (the GPU's time from the call's start to its last kernel, host launch gaps
included); CPU: host time. A case whose spread (IQR over the median) exceeds 10% is marked noisy in the report.
(Measured on our CPU before this order, bench/results/cpu-ab-a20736a: timed one provider after the other, S2
predict's speedup measured 2.01x, 2.11x, 2.56x and 1.41x in four runs; the same code interleaved call by call gave
1.39-1.42x.) Then, on CUDA, one call per
provider under torch.profiler: the CUDA kernels it launched (memcpy and memset counted apart), divided by T = kernels
per RIM step (train_step: forward, backward and the Adam step together). Compiled providers record their graphs,
graph breaks and Inductor's CUDA-graph skips (``counters["inductor"]["cudagraph_skips"]``, with the logged
reasons), counted over their own calls: on CUDA, rim_fast_compiled must have none, and the report marks it when it
has. Dynamo is reset once per group, before its first provider is built, so every compiled case compiles afresh.

Every provider of a group stays built until the group's rounds end (on CUDA their weights, optimizer states and
CUDA-graph pools are allocated together; the memory columns subtract what was allocated before each one was built).

Results: every case appends one JSON line to ``RIM_FAST_BENCH_STATUS`` (ok with its timings and measurements,
skipped, error, or interrupted); a group's cases end together, when its rounds end, so a run cut at any moment
keeps every finished group. A cut in a group marks each of its providers interrupted (one whose setup had already
failed keeps that outcome), the rounds timed so far kept apart as ``partial_stats`` and never reported as a result;
the planned cases after it have no line (not reached). The file starts with a line describing the run (machine,
settings, TF32 and cudnn.benchmark) and the planned cases (bench/conftest.py). ``bench.report`` turns it into the
report.

Correctness check
  CPU  relative error max|a - b| / max|b| against the baseline in fp32: predict and loss <= 1e-5, each
       parameter gradient <= 1e-4 (its denominator floored at 1e-6 of the largest gradient).
  CUDA TF32 stays at PyTorch's defaults (cuDNN convolutions use TF32), so the providers are compared with a
       float64 run of the baseline (torch_rim, or the rim_fast reference for U2; train_step in batch chunks of
       8): a provider passes when its error against float64 is at most max(2 x the fp32 baseline's own error,
       the CPU tolerance, and with cuDNN's TF32 on TF32_FLOOR = 2^-10, two units of TF32's rounding: which
       convolutions cuDNN runs in TF32 depends on their shapes and layout, so the baseline's own error, float32
       on some shapes and TF32 on others, does not bound another provider's; the first GPU run failed S1's
       rim_fast_nographs at 1.5e-4 against torch_rim's 4e-5. The float32 budget itself is the tests', with TF32
       off). RIM_FAST_BENCH_CHECK=fp32|fp64 chooses either check on either device.
       Cost on L2 (B=32, 256x256, T=10): torch_rim computes 4.2 TFLOP per predict and 12.4 per training step
       (FlopCounterMode at B=1, x32); float64 runs 8-12x slower than float32 on our CPU. At a pessimistic 2-5
       TFLOP/s of float64 convolutions on an H200 that is about 1-2 s (predict) and 3-6 s (train_step), paid once
       per workload and mode, in the prewarm when it runs.
  A failing case is timed and marked; the report gives it no speedup.
Memory
  CUDA torch.cuda.max_memory_allocated over the warm-up and the check call (CUDA-graph capture included),
       minus what was allocated before the case was built: its weights, optimizer state and activations (the
       inputs, shared by every case, were allocated before). L2 train_step saves about 29 GiB for backward (torch_rim,
       measured at B=1 on the CPU, x32).
  CPU  train_step only: bytes of the distinct non-parameter storages saved for backward. Eager providers: by
       the backbone's calls (saved_tensors_hooks around ``model.forward``; they cannot wrap the torch.func
       score); compiled providers: by the compiled graph (hooks around the whole call).

Prewarm (``python -m bench.run --prewarm``; bench/gpu_check.sh runs it beside the build and the tests): the same
cases without timing: the references, saved under ``RIM_FAST_BENCH_REFS`` (the timed run loads them), then one call
of each compiled case, which fills Inductor's on-disk caches (FX graph and AOTAutograd), so that the timed run's
compilations mostly load (on our CPU: 51 s cold, 3.4 s warm for torch_rim_compiled S1 smoke predict). rim_fast's
compiled loop does not call the C++ extension (``auto`` prefers the references under torch.compile), so the prewarm
runs without it (``RIM_FAST_NO_EXT=1``) while the extension is being built.

Environment (all optional; lists are comma-separated)
  RIM_FAST_BENCH_DEVICE     cpu | cuda
  RIM_FAST_BENCH_PROVIDERS  subset of the providers above
  RIM_FAST_BENCH_MODES      predict,train_step
  RIM_FAST_BENCH_WORKLOADS  S1,S2,S3,L2,U2 (those that run on the device); S1B1,S2B1,S3B1 (one sample) when named
  RIM_FAST_BENCH_GROUPS     workload:mode,... run exactly these groups in this order (overrides the two above)
  RIM_FAST_BENCH_ROUNDS     timed rounds per group, exactly (default: see above; smoke 1)
  RIM_FAST_BENCH_WARMUP     untimed calls before the check call, every provider (default: see above; smoke 0, and
                            1 for compiled providers)
  RIM_FAST_BENCH_T          RIM steps (default 10; smoke 2)
  RIM_FAST_BENCH_CHECK      fp32 | fp64: the check's reference (default: fp64 on cuda, fp32 on cpu)
  RIM_FAST_BENCH_STATUS     the results file: one JSON line per case (and the run's description)
  RIM_FAST_BENCH_REFS       a folder for the references (saved by the prewarm, loaded by the timed run)
  RIM_FAST_BENCH_PREWARM_LOG  the prewarm's results file: one JSON line per job
  RIM_FAST_BENCH_SMOKE=1    the tiny workloads of bench.common
  RIM_FAST_BENCH_TF32_PEAK  the GPU's dense TF32 peak in TFLOP/s, for the report's roofline goal (default: the
                            table in bench/report.py, by the GPU's name)
"""
from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import json
import logging
import os
import statistics
import time
import traceback
import warnings

import pytest
import torch
import torch.nn.functional as F

import rim
import rim_fast
from bench import kernel_time
from bench.common import (MODEL, PRIORITY, SMOKE, T as DEFAULT_T, blur_kernel, end_to_end_workloads,
                          error_line, machine_line, make_score_fn, synchronize)

PROVIDERS = ("torch_rim", "rim_fast_reference", "rim_fast", "rim_fast_nographs", "rim_fast_cl", "rim_fast_graphed",
             "rim_fast_graphed_cl", "rim_fast_compiled", "torch_rim_compiled")
COMPILED = ("torch_rim_compiled", "rim_fast_compiled")
#: the training step recorded as one graph (TrainStepGraph, as fit(cuda_graphs=True) records it)
GRAPHED = "rim_fast_graphed"
#: a provider named with this suffix is its base provider with the CUDA convolutions in channels-last layout
#: (``rim_fast.ops.use_cuda_layout``, rim_fast/ops/_cudnn.py)
CHANNELS_LAST = "_cl"
#: providers on the CUDA device only, unless named (on the CPU: nographs is rim_fast, graphed a stand-in, and the
#: channels-last layout is the CPU's own anyway)
CUDA_ONLY = ("rim_fast_nographs", "rim_fast_cl", GRAPHED, GRAPHED + CHANNELS_LAST)
MODES = ("predict", "train_step")
#: providers that run some modes only
PROVIDER_MODES = {GRAPHED: ("train_step",), GRAPHED + CHANNELS_LAST: ("train_step",)}
#: CPU fp32 tolerances of the check (relative to the largest magnitude of the baseline's tensor)
CPU_TOL = {"predict": 1e-5, "loss": 1e-5, "grads": 1e-4}
#: the fp64 check's least tolerance where cuDNN may run convolutions in TF32 (module docstring: Correctness check)
TF32_FLOOR = 2.0 ** -10
LEARNING_RATE = 1e-4
#: batch chunk of the float64 train_step check (its gradients are summed over chunks)
TRUTH_CHUNK = 8


def _env_list(name: str, allowed, default):
    value = os.environ.get(name, "").strip()
    if not value:
        return list(default)
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in allowed]
    if unknown:
        raise ValueError(f"{name}: unknown {unknown}; expected names from {list(allowed)}")
    return items


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


def _env_float(name: str):
    value = os.environ.get(name, "").strip()
    return float(value) if value else None


DEVICE = os.environ.get("RIM_FAST_BENCH_DEVICE", "").strip() or ("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE not in ("cpu", "cuda"):
    raise ValueError(f"RIM_FAST_BENCH_DEVICE={DEVICE!r}: expected cpu or cuda")
CUDA = DEVICE == "cuda"
#: the check's reference: "fp64" (default on CUDA) or "fp32" (default on CPU); see the module docstring
CHECK = os.environ.get("RIM_FAST_BENCH_CHECK", "").strip() or ("fp64" if CUDA else "fp32")
if CHECK not in ("fp32", "fp64"):
    raise ValueError(f"RIM_FAST_BENCH_CHECK={CHECK!r}: expected fp32 or fp64")
T = _env_int("RIM_FAST_BENCH_T", 2 if SMOKE else DEFAULT_T)
#: timed rounds per group (one call of each provider per round): RIM_FAST_BENCH_ROUNDS exactly, else until every
#: provider has MIN_ROUNDS calls and MIN_SECONDS of timed calls, at most MAX_ROUNDS rounds or, after MIN_ROUNDS,
#: BUDGET_S seconds per provider
ROUNDS = 1 if SMOKE else _env_int("RIM_FAST_BENCH_ROUNDS", 0)
MIN_ROUNDS, MIN_SECONDS, MAX_ROUNDS, BUDGET_S = (20, 0.5, 100, 3.0) if CUDA else (5, 2.0, 20, 60.0)
#: a case whose IQR exceeds this fraction of its median is marked noisy (bench/report.py)
NOISY = 0.10
#: untimed calls before the check call; None: 3 for compiled providers on CUDA, else 1 (see _warmup)
WARMUP = 0 if SMOKE else (_env_int("RIM_FAST_BENCH_WARMUP", -1) if os.environ.get("RIM_FAST_BENCH_WARMUP") else None)
ALL_WORKLOADS = end_to_end_workloads()
WORKLOAD_NAMES = _env_list("RIM_FAST_BENCH_WORKLOADS", ALL_WORKLOADS,
                           [n for n, w in ALL_WORKLOADS.items() if DEVICE in w["devices"] and w.get("default", True)])
MODE_NAMES = _env_list("RIM_FAST_BENCH_MODES", MODES, MODES)
PROVIDER_NAMES = _env_list("RIM_FAST_BENCH_PROVIDERS", PROVIDERS,
                           [p for p in PROVIDERS if CUDA or p not in CUDA_ONLY])


def _groups() -> list:
    """The (workload, mode) groups in the order they run: RIM_FAST_BENCH_GROUPS as given, else PRIORITY first."""
    value = os.environ.get("RIM_FAST_BENCH_GROUPS", "").strip()
    if value:
        groups = []
        for item in value.split(","):
            workload, _, mode = item.strip().partition(":")
            if workload not in ALL_WORKLOADS or mode not in MODES:
                raise ValueError(f"RIM_FAST_BENCH_GROUPS: {item!r} is not workload:mode with a workload of "
                                 f"{list(ALL_WORKLOADS)} and a mode of {list(MODES)}")
            groups.append((workload, mode))
        return groups
    chosen = [(w, m) for w in WORKLOAD_NAMES for m in MODE_NAMES]
    return [g for g in PRIORITY if g in chosen] + [g for g in chosen if g not in PRIORITY]


GROUPS = _groups()
CASES = [pytest.param(w, m, p, id=f"{w}-{DEVICE}-{m}-{p}")
         for w, m in GROUPS for p in PROVIDERS if p in PROVIDER_NAMES and m in PROVIDER_MODES.get(p, MODES)]


# ---- the workload: weights, inputs, score function ---------------------------------------------------------

def _arch(spec):
    return rim_fast.Unet if spec["arch"] == "Unet" else rim_fast.Hourglass


def _has_torch_rim(spec) -> bool:
    return spec["arch"] == "Hourglass"


def baseline_of(spec) -> str:
    return "torch_rim" if _has_torch_rim(spec) else "rim_fast_reference"


@functools.lru_cache(maxsize=None)
def workload_data(name: str):
    """Canonical weights (a CPU state_dict), inputs on the device; seeded, so every provider gets the same."""
    spec = ALL_WORKLOADS[name]
    dims = spec["dims"]
    torch.manual_seed(0)
    if _has_torch_rim(spec):
        state = rim.Hourglass(1, dimensions=dims, **MODEL).state_dict()
    else:
        state = rim_fast.Unet(1, dimensions=dims, **MODEL).state_dict()
    gen = torch.Generator().manual_seed(1)
    shape = (spec["batch"], 1, *spec["size"])
    x_true = torch.rand(shape, generator=gen)
    blur = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    y = blur(x_true, blur_kernel(dims), padding=1) + 0.01 * torch.randn(shape, generator=gen)
    return {"state": {k: v.clone() for k, v in state.items()}, "y": y.to(DEVICE), "x_true": x_true.to(DEVICE),
            "score_fn": make_score_fn(dims, DEVICE)}


def build(name: str, provider: str, dtype=torch.float32):
    """A RIM of ``provider``'s library on the device with the workload's weights."""
    spec = ALL_WORKLOADS[name]
    data = workload_data(name)
    if provider.startswith("torch_rim"):
        model = rim.Hourglass(1, dimensions=spec["dims"], **MODEL)
        model.load_state_dict(data["state"])
        model = model.to(DEVICE, dtype)
        return rim.RIM(spec["size"], model, score_fn=data["score_fn"], T=T, device=torch.device(DEVICE))
    model = _arch(spec)(1, dimensions=spec["dims"], **MODEL)
    model.load_state_dict(data["state"])
    model = model.to(DEVICE, dtype)
    return rim_fast.RIM(spec["size"], model, score_fn=data["score_fn"], T=T, device=DEVICE,
                        cuda_graphs=provider != "rim_fast_nographs")


def _base(provider: str) -> str:
    """The provider without its layout suffix (``CHANNELS_LAST``)."""
    return provider[:-len(CHANNELS_LAST)] if provider.endswith(CHANNELS_LAST) else provider


def _backend_ctx(provider: str):
    """What a provider's calls run under: the reference backend, or the channels-last layout of CUDA convolutions
    (which a CUDA graph recorded under it keeps)."""
    if provider == "rim_fast_reference":
        return rim_fast.ops.use_backend("reference")
    if provider.endswith(CHANNELS_LAST):
        return rim_fast.ops.use_cuda_layout("channels_last")
    return contextlib.nullcontext()


@contextlib.contextmanager
def _default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# ---- reference results and the check -----------------------------------------------------------------------

def _outputs(r, provider: str, mode: str, y, x_true, chunk=None):
    """predict: {"predict": x_hat}; train_step: {"loss": loss, "grads": {name: grad}} at the current weights.
    ``chunk`` splits the batch (train_step gradients are sums over the batch, weighted by chunk / B)."""
    B = y.shape[0]
    chunk = chunk or B
    with _backend_ctx(provider):
        if mode == "predict":
            with torch.no_grad():
                return {"predict": torch.cat([r.predict(y[i:i + chunk]) for i in range(0, B, chunk)])}
        r.model.zero_grad(set_to_none=True)
        total = 0.0
        for i in range(0, B, chunk):
            yc, xc = y[i:i + chunk], x_true[i:i + chunk]
            loss = r.loss_fn(yc, xc) * (yc.shape[0] / B)
            loss.backward()
            total = total + loss.detach()
        return {"loss": total, "grads": _grads(r.model)}


def _grads(model):
    return {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters()}


def _rel(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    denom = max(b.abs().max().item(), floor, 1e-30)
    return (a - b).abs().max().item() / denom


def errors(out: dict, ref: dict) -> dict:
    """Relative errors of ``out`` against ``ref``, per quantity (grads: the worst parameter)."""
    if "predict" in out:
        return {"predict": _rel(out["predict"], ref["predict"])}
    ref_grads = ref["grads"]
    if set(out["grads"]) != set(ref_grads):
        raise KeyError(f"parameter names differ: {sorted(set(out['grads']) ^ set(ref_grads))[:5]}")
    scale = max(g.abs().max().item() for g in ref_grads.values())
    grad_err = max(_rel(out["grads"][n], ref_grads[n], floor=1e-6 * scale) for n in ref_grads)
    return {"loss": _rel(out["loss"], ref["loss"]), "grads": grad_err}


def _ref_path(name: str, mode: str) -> str | None:
    """Where the prewarm saved (and a later run finds) the references of a case: RIM_FAST_BENCH_REFS, one file per
    workload, mode and everything else they depend on."""
    folder = os.environ.get("RIM_FAST_BENCH_REFS", "").strip()
    if not folder:
        return None
    key = repr((ALL_WORKLOADS[name], MODEL, T, DEVICE, CHECK, TRUTH_CHUNK, torch.__version__))
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return os.path.join(folder, f"{name}-{mode}-{DEVICE}-{CHECK}-{digest}.pt")


@functools.lru_cache(maxsize=None)
def reference(name: str, mode: str) -> dict:
    """The baseline's fp32 outputs at the initial weights and, with the fp64 check, a float64 run and the fp32
    baseline's error against it. Cached per workload and mode, and on disk under RIM_FAST_BENCH_REFS."""
    path = _ref_path(name, mode)
    if path and os.path.exists(path):
        try:
            return torch.load(path, map_location=DEVICE)
        except Exception as err:  # noqa: BLE001 - a file cut by an interrupted prewarm: compute it again
            warnings.warn(f"{path}: {type(err).__name__}: {err}; computing the references again")
    spec = ALL_WORKLOADS[name]
    data = workload_data(name)
    base = baseline_of(spec)
    r = build(name, base)
    ref = {"baseline": base, "fp32": _outputs(r, base, mode, data["y"], data["x_true"])}
    del r
    if CHECK == "fp64":
        with _default_dtype(torch.float64):  # torch_rim creates x with the default dtype
            r64 = build(name, base, dtype=torch.float64)
            truth = _outputs(r64, base, mode, data["y"].double(), data["x_true"].double(),
                             chunk=TRUTH_CHUNK if mode == "train_step" else None)
        del r64
        ref["fp64"] = truth
        ref["baseline_err"] = errors(ref["fp32"], truth)
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(ref, path + ".tmp")
        os.replace(path + ".tmp", path)  # whole or absent, even when the prewarm is interrupted
    return ref


def fp64_tolerances(baseline_err: dict, tf32: bool) -> dict:
    """The fp64 check's tolerance per output: 2x the fp32 baseline's own error, at least the CPU's, and at least
    ``TF32_FLOOR`` where cuDNN's TF32 is on."""
    return {k: max(2 * e, CPU_TOL[k], TF32_FLOOR if tf32 else 0.0) for k, e in baseline_err.items()}


def check(name: str, mode: str, out: dict) -> dict:
    """{"ok", "err", "tol", "against"} for a provider's outputs at the initial weights."""
    ref = reference(name, mode)
    if CHECK == "fp64":
        err = errors(out, ref["fp64"])
        tf32 = CUDA and torch.backends.cudnn.allow_tf32
        tol = fp64_tolerances(ref["baseline_err"], tf32)
        against = f"float64 {ref['baseline']}" + (f" (cuDNN TF32 on: at least {TF32_FLOOR:.1e})" if tf32 else "")
    else:
        err = errors(out, ref["fp32"])
        tol = {k: CPU_TOL[k] for k in err}
        against = f"fp32 {ref['baseline']}"
    return {"ok": all(err[k] <= tol[k] for k in err), "err": err, "tol": tol, "against": against}


# ---- memory on CPU: bytes saved for backward -----------------------------------------------------------------

class SavedBytes:
    """Pack hook counting the distinct non-parameter storages saved for backward (they stay alive until
    backward, so their addresses do not repeat)."""

    def __init__(self, params):
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.storages = {}
        self.error = None

    def pack(self, t):
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr not in self.params:
            self.storages[ptr] = max(self.storages.get(ptr, 0), s.nbytes())
        return t

    @staticmethod
    def unpack(t):
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


@contextlib.contextmanager
def hook_backbone(model, counter: SavedBytes):
    """Count what the backbone's calls save (an instance-level ``forward`` wrapper, removed afterwards)."""
    original = model.forward

    @functools.wraps(original)
    def forward(*args, **kwargs):
        with counter.hooks():
            return original(*args, **kwargs)
    model.forward = forward
    try:
        yield
    finally:
        del model.forward


# ---- the benchmark -------------------------------------------------------------------------------------------

def _log(path_var: str, record: dict) -> None:
    path = os.environ.get(path_var)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")


def _log_status(**record) -> None:
    _log("RIM_FAST_BENCH_STATUS", record)


def run_settings() -> dict:
    """What the report says about the run: device, T, timing, warm-up, backend, the check, the order, and the
    numerics switches that change the timings (TF32, cudnn.benchmark)."""
    settings = dict(device=DEVICE, T=T, smoke=SMOKE, check=CHECK, rim_fast_backend=rim_fast.ops.backend(),
                    triton_interpret=os.environ.get("TRITON_INTERPRET", ""),
                    rounds=ROUNDS or (f"{MIN_ROUNDS}-{MAX_ROUNDS} interleaved rounds, until every provider has "
                                      f"{MIN_ROUNDS} calls and {MIN_SECONDS:g} s of them (or {BUDGET_S:g} s per "
                                      f"provider have passed)"),
                    order="interleaved: the providers of a group take turns, one call per round",
                    noisy=NOISY,
                    warmup=WARMUP if WARMUP is not None else (
                        "3 (compiled), 1 (eager)" if CUDA else "1"),
                    timer="CUDA events" if CUDA else "host clock",
                    groups=[f"{w}:{m}" for w, m in GROUPS],
                    providers=[p for p in PROVIDERS if p in PROVIDER_NAMES],
                    torch_rim_compiled_mode="reduce-overhead" if CUDA else "default",
                    gpu=torch.cuda.get_device_name() if CUDA else None,
                    tf32_peak_tflops=_env_float("RIM_FAST_BENCH_TF32_PEAK"),
                    cudnn_benchmark=bool(torch.backends.cudnn.benchmark),
                    cudnn_deterministic=bool(torch.backends.cudnn.deterministic),
                    float32_matmul_precision=torch.get_float32_matmul_precision())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the allow_tf32 flags may be deprecated for fp32_precision
        settings.update(cudnn_allow_tf32=bool(torch.backends.cudnn.allow_tf32),
                        matmul_allow_tf32=bool(torch.backends.cuda.matmul.allow_tf32))
    return settings


#: the cases this session runs, in order (bench/conftest.py sets it from pytest's selection): a group runs the
#: providers planned for it
PLANNED: list = []


def log_run(planned) -> None:
    """The first line of the results file: the machine, the settings and the planned cases, in order."""
    PLANNED[:] = [tuple(case) for case in planned]
    _log_status(kind="run", machine=machine_line(), settings=run_settings(),
                planned=[list(case) for case in planned])


class _CudagraphSkips(logging.Handler):
    """Collects the reasons Inductor logs when it skips CUDA graphs (beside its cudagraph_skips counter)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.reasons = []

    def emit(self, record):
        message = record.getMessage()
        if "skipping cudagraphs" in message.lower():
            self.reasons.append(message[:300])


CUDAGRAPH_SKIPS = _CudagraphSkips()
try:
    from torch._inductor import cudagraph_utils as _cudagraph_utils
    # the logger that logs the skips: "cudagraphs" (torch >= 2.6) or "perf_hints" (older)
    for _name in ("cudagraphs_log", "perf_hint_log"):
        _logger = getattr(_cudagraph_utils, _name, None)
        if isinstance(_logger, logging.Logger) and CUDAGRAPH_SKIPS not in _logger.handlers:
            _logger.addHandler(CUDAGRAPH_SKIPS)
except ImportError:
    pass


def _dynamo_counts() -> dict:
    from torch._dynamo.utils import counters
    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "graph_break_reasons": sorted(counters["graph_break"]),
            "graph_break_counts": {r: int(n) for r, n in counters["graph_break"].items()},
            "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"])}


#: (workload, mode) -> {provider: (status, payload)}: the outcomes of the groups that ran
_GROUPS_DONE: dict = {}
#: the group being run: its outcomes so far (setup failures) and its cases (with the rounds timed so far), which an
#: interrupt reports
_IN_FLIGHT: dict = {"outcomes": {}, "cases": []}


def _group_providers(workload: str, mode: str, provider: str) -> list:
    """The providers of a group that this session runs, in order (the planned ones; the case alone when pytest
    was not started through bench/conftest.py)."""
    planned = [p for w, m, p in PLANNED if (w, m) == (workload, mode)]
    return planned if provider in planned else [provider]


def _log_interrupted(workload: str, mode: str, providers: list) -> None:
    """An interrupt (a time box) in a group: one line per provider, in order. Those whose setup had already failed
    keep their outcome; the others are interrupted, with the rounds timed so far kept apart (``partial_stats``,
    never reported as a result: a cut group's providers did not get their minimum count or time)."""
    outcomes = _IN_FLIGHT["outcomes"]
    cases = {c.provider: c for c in _IN_FLIGHT["cases"]}
    for p in providers:
        record = dict(workload=workload, mode=mode, provider=p, device=DEVICE)
        if p in outcomes:
            status, payload = outcomes[p]
            record.update(status=status, reason=payload["reason"], seconds=payload.get("seconds"))
        else:
            case = cases.get(p)
            if case is None:
                where = "before its setup (build, warm-up, check)"
            elif case.times:
                where = f"after {len(case.times)} interleaved round(s), before its minimum count and time"
            else:
                where = "during its group's setup, before the timed rounds"
            record.update(status="interrupted", reason=f"cut by the time box (SIGINT) {where}")
            if case is not None and case.times:
                record["partial_stats"] = summarize(case.times)
        _log_status(**record)


@pytest.mark.parametrize("workload,mode,provider", CASES)
def test_rim(workload, mode, provider):
    group = (workload, mode)
    if group not in _GROUPS_DONE or provider not in _GROUPS_DONE[group]:
        providers = _group_providers(workload, mode, provider)
        try:
            outcomes = _run_group(workload, mode, providers)
        except KeyboardInterrupt:
            _log_interrupted(workload, mode, providers)
            # the results file is complete; a normal exit would wait for Inductor's compile workers (they ignore
            # SIGINT) until gpu_check.sh's SIGKILL
            print(f"\ninterrupted in {workload} {mode} ({', '.join(providers)}): stopping", flush=True)
            os._exit(130)
        # the group's cases end together: one line each, in order
        for p in providers:
            status, payload = outcomes[p]
            record = dict(workload=workload, mode=mode, provider=p, device=DEVICE, status=status)
            if status == "ok":
                record.update(reason="", seconds=payload["seconds"], stats=payload["stats"], info=payload["info"])
            else:
                record.update(reason=payload["reason"], seconds=payload.get("seconds"))
            _log_status(**record)
        _GROUPS_DONE.setdefault(group, {}).update(outcomes)
    status, payload = _GROUPS_DONE[group][provider]
    if status == "skipped":
        pytest.skip(payload["reason"])
    if status == "error":
        pytest.fail(payload["traceback"], pytrace=False)


class _Case:
    """One provider of a group, set up: its RIM, the timed call, what was measured so far. ``seconds``: the time
    spent on this provider alone (setup, its timed calls, the measurements after them)."""

    def __init__(self, provider: str):
        self.provider = provider
        self.compiled = provider in COMPILED
        self.times: list = []
        self.info: dict = {}
        self.step = None
        self.objects: tuple = ()
        self.own_bytes = 0
        self.graphs_while_timed = 0
        self.train_graph = None  # rim_fast_graphed's TrainStepGraph
        self.error = None
        self.seconds = 0.0


def _run_group(workload: str, mode: str, providers: list) -> dict:
    """Set up every provider of the group (build, warm-up, check), time them interleaved, measure the rest.
    Returns {provider: ("ok", {"stats", "info", "seconds"}) | ("skipped" | "error", {"reason", ...})}."""
    spec = ALL_WORKLOADS[workload]
    outcomes, cases = {}, []
    _IN_FLIGHT.update(outcomes=outcomes, cases=cases)
    runnable = []
    for provider in providers:
        if provider.startswith("torch_rim") and not _has_torch_rim(spec):
            outcomes[provider] = ("skipped", {"reason": f"torch_rim 0.2.9 has no {spec['arch']} (its Unet is an "
                                                        f"empty stub)"})
        else:
            runnable.append(provider)
    if not runnable:
        _IN_FLIGHT.update(outcomes={}, cases=[])
        return outcomes
    t_ref = time.perf_counter()
    reference(workload, mode)  # computed (and cached) before any case's memory is measured
    reference_s = time.perf_counter() - t_ref
    if any(p in COMPILED for p in runnable):
        torch._dynamo.reset()  # every case compiles afresh: no cache-size limit, no automatic dynamic shapes
        from torch._dynamo.utils import counters
        counters.clear()
    for provider in runnable:
        t0 = time.perf_counter()
        case = _Case(provider)
        try:
            try:
                _setup_case(case, workload, mode)
            except Exception as e:  # noqa: BLE001
                if not (case.compiled and _repair_inductor_cache(e)):
                    raise
                case = _Case(provider)
                _setup_case(case, workload, mode)
                case.info["retried"] = f"after repairing Inductor's cache: {type(e).__name__}: {str(e)[:200]}"
        except Exception as e:  # noqa: BLE001 - the case fails (an OOM skips it), the group goes on
            outcomes[provider] = _failure(e, time.perf_counter() - t0)
        if provider in outcomes:
            _free(case)  # after the except block: its traceback held the case's tensors
            continue
        case.info["reference_s"] = reference_s
        case.seconds = time.perf_counter() - t0
        cases.append(case)
    _interleave(cases)
    for case in cases:
        t0 = time.perf_counter()
        try:
            _finish_case(case)
        except Exception as e:  # noqa: BLE001 - this case fails, the others are reported
            outcomes[case.provider] = _failure(e, case.seconds + time.perf_counter() - t0)
            continue
        case.seconds += time.perf_counter() - t0
        outcomes[case.provider] = ("ok", {"stats": summarize(case.times), "info": case.info, "seconds": case.seconds})
    for case in cases:
        _free(case)
    if any(p in COMPILED for p in runnable):
        torch._dynamo.reset()
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
    _IN_FLIGHT.update(outcomes={}, cases=[])
    return outcomes


def _failure(err: Exception, seconds: float) -> tuple:
    """A case's outcome after an exception: skipped when out of memory, else an error, which its test reports with
    the traceback (kept as text: the frames would keep the case's tensors alive)."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return "skipped", {"reason": f"out of memory: {str(err).splitlines()[0][:200]}", "seconds": seconds}
    return "error", {"reason": f"{type(err).__name__}: {str(err)[:300]}", "seconds": seconds,
                     "traceback": "".join(traceback.format_exception(type(err), err, err.__traceback__))}


def _free(case: _Case) -> None:
    """Drop the case's RIM, optimizer and functions (and a failed call's traceback, which holds them)."""
    case.step, case.objects, case.error, case.train_graph = None, (), None, None
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def _repair_inductor_cache(err: Exception) -> bool:
    """When a compiled case failed on a file of Inductor's on-disk cache (one cut while it was written: a prewarm
    stopped in the middle of a compilation), delete the files the error names and Inductor's in-memory code caches,
    and say so: the case runs again and compiles what was lost. Other errors: False."""
    import re
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
    except ImportError:
        try:
            from torch._inductor.runtime.runtime_utils import cache_dir
        except ImportError:
            return False
    root = os.path.realpath(cache_dir())
    paths = [p for p in re.findall(r"(/[^\s:'\"]+)", str(err))
             if os.path.realpath(p).startswith(root + os.sep) and os.path.isfile(p)]
    if not paths:
        return False
    for path in paths:
        os.remove(path)
    warnings.warn(f"{type(err).__name__} on Inductor's cache: removed {paths}, running the case again")
    from torch._inductor import codecache
    for name in ("PyCodeCache", "CppCodeCache", "CppPythonBindingsCodeCache"):
        with contextlib.suppress(Exception):
            getattr(codecache, name).cache_clear()
    torch._dynamo.reset()
    gc.collect()
    return True


def _check_call(r, mode, provider, predict_fn, loss_fn, optimizer, initial, y, x_true, graphed=None):
    """One call from the initial weights whose outputs the check compares; on CPU train_step it also counts
    the bytes saved for backward. ``graphed``: rim_fast_graphed's step, whose replay is the call (its gradients
    are the graph's: no zero_grad here, which would unbind them from the parameters). Returns (outputs,
    SavedBytes)."""
    saved = SavedBytes(r.model.parameters())
    backend = _backend_ctx(provider)
    if mode == "predict":
        with backend, torch.no_grad():
            out = {"predict": predict_fn(y).detach().clone()}
        synchronize(DEVICE)
        return out, saved
    with torch.no_grad():
        for p, p0 in zip(r.model.parameters(), initial):
            p.copy_(p0)  # in place: compiled graphs and CUDA graphs keep their parameter addresses
    # CPU: compiled graphs: hooks around the whole call; eager: around the backbone (torch.func refuses hooks)
    if CUDA:
        hooks = contextlib.nullcontext()
    else:
        hooks = saved.hooks() if provider in COMPILED else hook_backbone(r.model, saved)
    if graphed is not None:
        with backend, hooks:
            loss = graphed()  # zero_grad, forward, backward, optimizer step: one replay
        synchronize(DEVICE)
        return {"loss": loss.detach().clone(), "grads": _grads(r.model)}, saved
    optimizer.zero_grad(set_to_none=True)
    with backend:
        try:
            with hooks:
                loss = loss_fn(y, x_true)
        except Exception as err:  # noqa: BLE001 - e.g. a recompilation that meets torch.func under the hooks
            saved.error = error_line(err)
            loss = loss_fn(y, x_true)
        loss.backward()
        synchronize(DEVICE)
        out = {"loss": loss.detach().clone(), "grads": _grads(r.model)}
        optimizer.step()
    synchronize(DEVICE)
    return out, saved


def _warmup(provider: str) -> int:
    compiled = provider in COMPILED
    if WARMUP is not None:
        # compiled providers compile in their first call, rim_fast_graphed records its graph: never in the check
        return max(WARMUP, 1) if compiled or _base(provider) == GRAPHED else WARMUP
    return 3 if CUDA and compiled else 1


def _functions(r, provider: str):
    """(predict, loss_fn) of the provider: compiled for the compiled providers."""
    if provider == "torch_rim_compiled":
        kwargs = {"mode": "reduce-overhead"} if CUDA else {}
        return torch.compile(r.predict, **kwargs), torch.compile(r.loss_fn, **kwargs)
    if provider == "rim_fast_compiled":
        r.compile()
    return r.predict, r.loss_fn


def _optimizer(r, provider: str, mode: str):
    """The case's optimizer (train_step): Adam. rim_fast_graphed's as fit(cuda_graphs=True) builds it on CUDA
    (capturable, its learning rate a device tensor); on the CPU stand-in SGD with momentum (see the module
    docstring)."""
    if mode != "train_step":
        return None
    params = list(r.model.parameters())
    if _base(provider) != GRAPHED:
        return torch.optim.Adam(params, lr=LEARNING_RATE)
    if CUDA:
        from rim_fast import fit_graph
        return fit_graph.capturable_optimizer(torch.optim.Adam, params, LEARNING_RATE, torch.device(DEVICE))
    return torch.optim.SGD(params, lr=LEARNING_RATE, momentum=0.9)


def _graphed_step(r, provider, loss_fn, optimizer, y, x_true):
    """rim_fast_graphed's call and its ``TrainStepGraph``: the other providers' step (zero_grad, forward, backward,
    optimizer step), recorded in the first call (which steps eagerly first, as fit does) and replayed afterwards:
    CUDA graphs on CUDA, the stand-in recorder on the CPU."""
    from rim_fast.cuda_graphs import CudaRecorder, EagerRecorder, TrainStepGraph
    from rim_fast.fit_graph import training_state

    def one_step(y_, x_):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(y_, x_)
        loss.backward()
        optimizer.step()
        return loss.detach()

    recorder = CudaRecorder(torch.device(DEVICE)) if CUDA else EagerRecorder()
    # as fit records it: both layouts of the CUDA convolutions timed under RIM_FAST_CUDA_LAYOUT=auto (the _cl
    # twin's layout is fixed: one recording)
    train = TrainStepGraph(one_step, lambda: training_state(r, optimizer), recorder, variants=r.cuda_graph_variants)

    def step():
        with _backend_ctx(provider):  # the recording too (the first call)
            return train(y, x_true)
    return step, train


def _graph_info(train, optimizer) -> dict:
    """What the report says about rim_fast_graphed's recorded step."""
    return {"train_graph": {"recorder": type(train.recorder).__name__, "eager": train.eager, "reason": train.reason,
                            "replays": train.replays},
            "graph_layouts": [train.tuning] if train.tuning else None,
            "optimizer": (f"{type(optimizer).__name__}("
                          + ", ".join(f"{k}={optimizer.defaults[k]}" for k in ("capturable", "momentum")
                                      if optimizer.defaults.get(k)) + ")")}


def _step_fn(mode, provider, predict_fn, loss_fn, optimizer, y, x_true):
    """One call of the case (no device sync: the caller times it)."""
    if mode == "predict":
        def step():
            with _backend_ctx(provider), torch.no_grad():
                return predict_fn(y)
    else:
        def step():
            with _backend_ctx(provider):
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(y, x_true)
                loss.backward()
                optimizer.step()
            return loss
    return step


def _time_one(step) -> float:
    """Seconds of one call: CUDA events around it on the current stream, or the host clock on the CPU."""
    if CUDA:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def _interleave(cases: list) -> None:
    """The timed calls, round by round: one call of each case per round, in the group's order, until every case has
    MIN_ROUNDS calls and MIN_SECONDS of timed calls, at most MAX_ROUNDS rounds, or once MIN_ROUNDS are done BUDGET_S
    seconds per case in all (RIM_FAST_BENCH_ROUNDS: exactly that many rounds). A case whose call fails leaves the
    rounds (``case.error``); compiled cases count the graphs compiled and the CUDA-graph skips meanwhile."""
    from torch._dynamo.utils import counters
    synchronize(DEVICE)
    active = list(cases)
    start = time.perf_counter()
    rounds = 0
    while active:
        for case in list(active):
            if case.compiled:
                graphs, skips = int(counters["stats"]["unique_graphs"]), int(counters["inductor"]["cudagraph_skips"])
                reasons = len(CUDAGRAPH_SKIPS.reasons)
            t0 = time.perf_counter()
            try:
                case.times.append(_time_one(case.step))
            except Exception as e:  # noqa: BLE001 - reported as this case's outcome
                case.error = e
                active.remove(case)
                continue
            finally:
                case.seconds += time.perf_counter() - t0
            if case.compiled:
                case.graphs_while_timed += int(counters["stats"]["unique_graphs"]) - graphs
                new_skips = int(counters["inductor"]["cudagraph_skips"]) - skips
                if new_skips:
                    case.info["cudagraph_skips"] = case.info.get("cudagraph_skips", 0) + new_skips
                    case.info["cudagraph_skip_reasons"] = (case.info.get("cudagraph_skip_reasons", [])
                                                           + CUDAGRAPH_SKIPS.reasons[reasons:])[:3]
        rounds += 1
        if ROUNDS:
            if rounds >= ROUNDS:
                break
            continue
        if rounds >= MAX_ROUNDS:
            break
        if rounds >= MIN_ROUNDS and (all(sum(c.times) >= MIN_SECONDS for c in active)
                                     or time.perf_counter() - start >= BUDGET_S * len(active)):
            break


def summarize(times: list) -> dict:
    """Median, quartiles, extremes, the spread (IQR over the median; noisy above NOISY) and every time (seconds)."""
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    median = statistics.median(times)
    spread = (q[2] - q[0]) / median if median > 0 else 0.0
    return {"median": median, "q1": q[0], "q3": q[2], "iqr": q[2] - q[0], "min": min(times),
            "max": max(times), "mean": statistics.fmean(times), "rounds": len(times), "spread": spread,
            "noisy": spread > NOISY, "times": times}


def _flop_count(step):
    """The FLOPs of one call (torch.utils.flop_counter: convolutions and matrix products, 2 per multiply-add),
    counted around torch_rim's eager predict: the work every provider does, for the report's roofline (not around
    rim_fast's, whose CUDA-graph replays would hide their ops from the counter)."""
    from torch.utils.flop_counter import FlopCounterMode
    try:
        with FlopCounterMode(display=False) as counter:
            step()
        synchronize(DEVICE)
    except Exception:  # noqa: BLE001 - a measurement, not the case
        return None
    return int(counter.get_total_flops())


def cuda_kernels(events) -> tuple:
    """(memcpy/memset count, [(name, microseconds)] of the kernels) among torch.profiler's events."""
    from torch.autograd import DeviceType
    memory_ops, timed = 0, []
    for event in events:
        # record_function ranges (an optimizer's step, torch.compile's regions) come back as CUDA events too,
        # "gpu_user_annotation": not kernels (torch's own device-time totals leave them out alike)
        if event.device_type != DeviceType.CUDA or getattr(event, "is_user_annotation", False):
            continue
        if event.name.startswith(("Memcpy", "Memset")):
            memory_ops += 1
        else:
            timed.append((event.name, event.time_range.elapsed_us()))
    return memory_ops, timed


def _kernel_counts(step) -> dict:
    """One call under torch.profiler: the CUDA kernels it launched (CUDA graph replays included), memcpy/memset
    apart; kernels_per_step = kernels / T; kernel_time: their time per step by class and by name
    (bench.kernel_time)."""
    from torch.profiler import ProfilerActivity, profile
    try:
        synchronize(DEVICE)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            synchronize(DEVICE)
        memory_ops, timed = cuda_kernels(prof.events())
    except Exception as err:  # noqa: BLE001 - the profiler is a measurement, not the case
        return {"kernels_error": error_line(err)}
    kernels = len(timed)
    result = {"cuda_kernels": kernels, "cuda_memory_ops": memory_ops,
              "kernels_per_step": kernels / T if kernels else None,
              "kernel_time": kernel_time.summarize(timed, T) if kernels else None}
    if not kernels:
        result["kernels_error"] = "the profiler recorded no CUDA kernel (CUPTI unavailable?)"
    return result


def _setup_case(case: _Case, workload: str, mode: str) -> None:
    """Build the provider's RIM, warm it up and run the check call; record what the report shows about them."""
    spec = ALL_WORKLOADS[workload]
    provider = case.provider
    data = workload_data(workload)
    y, x_true = data["y"], data["x_true"]
    info = case.info
    info.update(arch=spec["arch"], dims=spec["dims"], size=list(spec["size"]), batch=spec["batch"], channels=1, T=T,
                baseline=baseline_of(spec))
    compiled = case.compiled
    if compiled:
        CUDAGRAPH_SKIPS.reasons.clear()
        counts_before = _dynamo_counts()
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
        mem_before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    r = build(workload, provider)
    initial = [p.detach().clone() for p in r.model.parameters()]
    predict_fn, loss_fn = _functions(r, provider)
    optimizer = _optimizer(r, provider, mode)
    if _base(provider) == GRAPHED:
        step, case.train_graph = _graphed_step(r, provider, loss_fn, optimizer, y, x_true)
    else:
        step = _step_fn(mode, provider, predict_fn, loss_fn, optimizer, y, x_true)

    # warm-up: compile, autotune, CUDA-graph capture; then the check call, from the initial weights.
    # Eager providers record which implementation served each op; a compiled graph would guard on the trace.
    with (contextlib.nullcontext(None) if compiled else rim_fast.ops.trace()) as impls:
        warmup = _warmup(provider)
        info["warmup"] = warmup
        t0 = time.perf_counter()
        for i in range(warmup):
            step()
            synchronize(DEVICE)
            if i == 0:
                info["first_call_s"] = time.perf_counter() - t0
        t_check = time.perf_counter()
        out, saved = _check_call(r, mode, provider, predict_fn, loss_fn, optimizer, initial, y, x_true,
                                 graphed=step if case.train_graph is not None else None)
        t_check = time.perf_counter() - t_check
        if warmup == 0:
            info["first_call_s"] = t_check
    del initial

    result = check(workload, mode, out)
    info.update(check_ok=result["ok"], check_err=result["err"], check_tol=result["tol"],
                check_against=result["against"])
    del out
    if not result["ok"]:
        warnings.warn(f"{workload} {mode} {provider}: check failed, errors {result['err']} > {result['tol']}")
    info["impls"] = sorted(f"{op}:{impl}" for op, impl in impls) if impls is not None else []
    graphs = None if compiled else r.__dict__.get("_graph_cache")
    if graphs is not None and graphs.tuning:
        # RIM_FAST_CUDA_LAYOUT=auto: the layouts the first call's graph was recorded in, their replay times, the
        # one kept (rim_fast.cuda_graphs.GraphCache.tuning)
        info["graph_layouts"] = [dict(t) for t in graphs.tuning.values()]
    if case.train_graph is not None:
        info.update(_graph_info(case.train_graph, optimizer))
    if mode == "predict" and provider == "torch_rim":
        info["flop"] = _flop_count(step)
    if CUDA:
        info["memory_bytes"] = torch.cuda.max_memory_allocated() - mem_before
        info["memory_kind"] = "cuda peak allocated (warm-up + check call)"
        case.own_bytes = torch.cuda.memory_allocated() - mem_before
    elif mode == "train_step":
        info["memory_bytes"] = saved.total if saved.error is None else None
        info["memory_error"] = saved.error
        info["memory_kind"] = ("saved for backward by the compiled graph" if compiled
                               else "saved for backward by the backbone")
    else:
        info["memory_bytes"] = None
        info["memory_kind"] = "not measured (CPU predict saves nothing for backward)"
    if compiled:
        after = _dynamo_counts()
        info.update(graphs=after["graphs"] - counts_before["graphs"],
                    graph_breaks=after["graph_breaks"] - counts_before["graph_breaks"],
                    graph_break_reasons=[r for r in after["graph_break_reasons"] if after["graph_break_counts"][r]
                                         > counts_before["graph_break_counts"].get(r, 0)][:5],
                    cudagraph_skips=after["cudagraph_skips"] - counts_before["cudagraph_skips"],
                    cudagraph_skip_reasons=CUDAGRAPH_SKIPS.reasons[:3])
    case.step = step
    case.objects = (r, optimizer, predict_fn, loss_fn)


def _finish_case(case: _Case) -> None:
    """After the rounds: the recompilations while timed, and on CUDA the kernels of one call and the steady-state
    memory (the case's own allocations plus the peak of one call). Raises the error of a failed timed call."""
    if case.error is not None:
        raise case.error
    info = case.info
    if case.compiled:
        info["recompiled_while_timed"] = case.graphs_while_timed
    if case.train_graph is not None:
        info.update(_graph_info(case.train_graph, case.objects[1]))
    if CUDA:
        info.update(_kernel_counts(case.step))
        synchronize(DEVICE)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        case.step()
        synchronize(DEVICE)
        info["steady_memory_bytes"] = torch.cuda.max_memory_allocated() - before + case.own_bytes


# ---- the prewarm: references and Inductor's caches, untimed ----------------------------------------------------

def _compile_once(workload: str, mode: str, provider: str) -> None:
    """One call of a compiled case: its graphs land in Inductor's on-disk caches."""
    data = workload_data(workload)
    torch._dynamo.reset()
    r = build(workload, provider)
    predict_fn, loss_fn = _functions(r, provider)
    optimizer = torch.optim.Adam(r.model.parameters(), lr=LEARNING_RATE) if mode == "train_step" else None
    _step_fn(mode, provider, predict_fn, loss_fn, optimizer, data["y"], data["x_true"])()
    synchronize(DEVICE)
    del r, predict_fn, loss_fn, optimizer
    torch._dynamo.reset()
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def prewarm_jobs() -> list:
    """(job, workload, mode, provider) in the order the timed run needs them: the references of the first four
    groups (cheap, and certain to be used), then group by group its compiled cases (a later group's references
    first)."""
    compiled = [p for p in PROVIDERS if p in PROVIDER_NAMES and p in COMPILED]
    jobs = [("reference", w, m, None) for w, m in GROUPS[:4]]
    for i, (w, m) in enumerate(GROUPS):
        if i >= 4:
            jobs.append(("reference", w, m, None))
        jobs += [("compile", w, m, p) for p in compiled
                 if not (p.startswith("torch_rim") and not _has_torch_rim(ALL_WORKLOADS[w]))]
    return jobs


def prewarm() -> int:
    """Run prewarm_jobs(), one JSON line each in RIM_FAST_BENCH_PREWARM_LOG; an interrupt ends it cleanly."""
    for job, workload, mode, provider in prewarm_jobs():
        record = dict(job=job, workload=workload, mode=mode, provider=provider, device=DEVICE)
        t0 = time.perf_counter()
        try:
            if job == "reference":
                reference(workload, mode)
            else:
                try:
                    _compile_once(workload, mode, provider)
                except Exception as err:  # noqa: BLE001
                    if not _repair_inductor_cache(err):
                        raise
                    _compile_once(workload, mode, provider)
                    record["retried"] = f"after repairing Inductor's cache: {str(err)[:200]}"
            record["status"] = "ok"
        except KeyboardInterrupt:
            _log("RIM_FAST_BENCH_PREWARM_LOG", dict(record, status="interrupted", seconds=time.perf_counter() - t0))
            print(f"prewarm interrupted during {job} {workload} {mode} {provider or ''}", flush=True)
            # at once: a normal exit waits for Inductor's compile workers, and gpu_check.sh would SIGKILL them, and
            # the compilers they run, in the middle of writing a cache file
            os._exit(130)
        except Exception as err:  # noqa: BLE001 - the timed run will meet (and report) the same error
            record["status"] = f"error: {type(err).__name__}: {str(err)[:300]}"
            torch._dynamo.reset()
            gc.collect()
            if CUDA:
                torch.cuda.empty_cache()
        record["seconds"] = time.perf_counter() - t0
        _log("RIM_FAST_BENCH_PREWARM_LOG", record)
        print(f"prewarm {job} {workload} {mode} {provider or ''}: {record['status']} in {record['seconds']:.1f} s",
              flush=True)
    return 0
