"""End-to-end RIM benchmark: torch_rim 0.2.9 against rim_fast, eager and compiled (pytest-benchmark).

One case = workload x mode x provider, all on one device (``RIM_FAST_BENCH_DEVICE``, default cuda when
available). Every provider runs the same weights (torch_rim's model, its state_dict copied into rim_fast's),
the same inputs and the same linear score function (a fixed [1, 2, 1]/4 blur A per axis: A^T (y - A x)).

Providers
  torch_rim            torch_rim's RIM, eager (the baseline of every Hourglass workload)
  torch_rim_compiled   torch.compile(rim.predict) / torch.compile(rim.loss_fn), default settings: what a user
                       would try; the graph count and graph breaks are recorded
  rim_fast_reference   rim_fast with ``ops.use_backend("reference")`` (pure PyTorch)
  rim_fast             rim_fast as imported (``RIM_FAST_BACKEND``, default auto)
  rim_fast_compiled    ``RIM.compile()``: the whole T-step loop as one graph (CUDA graphs on CUDA)
Modes
  predict              ``rim.predict(y)`` under ``torch.no_grad``
  train_step           zero_grad, ``loss_fn(y, x_true)``, backward, Adam step (the optimizer stays eager)

U2 runs rim_fast's Unet; torch_rim 0.2.9's ``Unet`` is an empty stub, so its torch_rim cases are skipped and its
baseline is ``rim_fast_reference``.

Each case: warm-up calls (compile, autotune, CUDA-graph capture) outside the timed region; then one check call
(train_step restores the initial weights first) whose output (predict) or loss and parameter gradients
(train_step) are compared with the baseline's; then ``rounds`` timed calls, each ending with a device sync.
``benchmark.extra_info`` holds the check (``check_ok``, ``check_err``, ``check_tol``), the memory, the first-call
time (compile included) and, for compiled providers, the graph and graph-break counts.

Correctness check
  CPU  relative error max|a - b| / max|b| against the baseline in fp32: predict and loss <= 1e-5, each
       parameter gradient <= 1e-4 (its denominator floored at 1e-6 of the largest gradient).
  CUDA TF32 stays at PyTorch's defaults (cuDNN convolutions use TF32), so the providers are compared with a
       float64 run of the baseline (torch_rim, or the rim_fast reference for U2; train_step in batch chunks of
       8): a provider passes when its error against float64 is at most max(2 x the fp32 baseline's own error,
       the CPU tolerance). RIM_FAST_BENCH_CHECK=fp32|fp64 chooses either check on either device.
  A failing case is timed and marked; the report gives it no speedup.
Memory
  CUDA torch.cuda.max_memory_allocated over the warm-up and the check call (CUDA-graph capture included),
       minus what was allocated before the case was built: its weights, optimizer state and activations (the
       inputs, shared by every case, were allocated before).
  CPU  train_step only: bytes of the distinct non-parameter storages saved for backward. Eager providers: by
       the backbone's calls (saved_tensors_hooks around ``model.forward``; they cannot wrap the torch.func
       score); compiled providers: by the compiled graph (hooks around the whole call).

Environment (all optional; lists are comma-separated)
  RIM_FAST_BENCH_DEVICE     cpu | cuda
  RIM_FAST_BENCH_PROVIDERS  subset of the providers above
  RIM_FAST_BENCH_MODES      predict,train_step
  RIM_FAST_BENCH_WORKLOADS  S1,S2,S3,L2,U2 (those that run on the device)
  RIM_FAST_BENCH_ROUNDS     timed calls per case (default: as many as fit in 60 s on cpu, 10 s on cuda, from
                            3 to 5 on cpu, 10 to 50 on cuda, estimated from the check call; smoke 1)
  RIM_FAST_BENCH_WARMUP     untimed calls before the check call (default: cpu 1, cuda 3; smoke 0)
  RIM_FAST_BENCH_T          RIM steps (default 10; smoke 2)
  RIM_FAST_BENCH_CHECK      fp32 | fp64: the check's reference (default: fp64 on cuda, fp32 on cpu)
  RIM_FAST_BENCH_STATUS     a file to which every case appends one JSON line (ok / skipped / error + reason)
  RIM_FAST_BENCH_SMOKE=1    the tiny workloads of bench.common
"""
from __future__ import annotations

import contextlib
import copy
import functools
import gc
import json
import os
import time
import warnings

import pytest
import torch
import torch.nn.functional as F

import rim
import rim_fast
from bench.common import MODEL, SMOKE, T as DEFAULT_T, end_to_end_workloads, synchronize

PROVIDERS = ("torch_rim", "torch_rim_compiled", "rim_fast_reference", "rim_fast", "rim_fast_compiled")
COMPILED = ("torch_rim_compiled", "rim_fast_compiled")
MODES = ("predict", "train_step")
#: CPU fp32 tolerances of the check (relative to the largest magnitude of the baseline's tensor)
CPU_TOL = {"predict": 1e-5, "loss": 1e-5, "grads": 1e-4}
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


DEVICE = os.environ.get("RIM_FAST_BENCH_DEVICE", "").strip() or ("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE not in ("cpu", "cuda"):
    raise ValueError(f"RIM_FAST_BENCH_DEVICE={DEVICE!r}: expected cpu or cuda")
CUDA = DEVICE == "cuda"
#: the check's reference: "fp64" (default on CUDA) or "fp32" (default on CPU); see the module docstring
CHECK = os.environ.get("RIM_FAST_BENCH_CHECK", "").strip() or ("fp64" if CUDA else "fp32")
if CHECK not in ("fp32", "fp64"):
    raise ValueError(f"RIM_FAST_BENCH_CHECK={CHECK!r}: expected fp32 or fp64")
T = _env_int("RIM_FAST_BENCH_T", 2 if SMOKE else DEFAULT_T)
#: timed calls per case: RIM_FAST_BENCH_ROUNDS exactly, else up to MAX_ROUNDS within BUDGET_S (estimated from the
#: check call), at least MIN_ROUNDS
ROUNDS = 1 if SMOKE else _env_int("RIM_FAST_BENCH_ROUNDS", 0)
MAX_ROUNDS, MIN_ROUNDS, BUDGET_S = (50, 10, 10.0) if CUDA else (5, 3, 60.0)
WARMUP = 0 if SMOKE else _env_int("RIM_FAST_BENCH_WARMUP", 3 if CUDA else 1)
ALL_WORKLOADS = end_to_end_workloads()
WORKLOAD_NAMES = _env_list("RIM_FAST_BENCH_WORKLOADS", ALL_WORKLOADS,
                           [n for n, w in ALL_WORKLOADS.items() if DEVICE in w["devices"]])
MODE_NAMES = _env_list("RIM_FAST_BENCH_MODES", MODES, MODES)
PROVIDER_NAMES = _env_list("RIM_FAST_BENCH_PROVIDERS", PROVIDERS, PROVIDERS)

CASES = [pytest.param(w, m, p, id=f"{w}-{DEVICE}-{m}-{p}")
         for w in WORKLOAD_NAMES for m in MODE_NAMES for p in PROVIDERS if p in PROVIDER_NAMES]


# ---- the workload: weights, inputs, score function ---------------------------------------------------------

def _blur_kernel(dims: int) -> torch.Tensor:
    k1 = torch.tensor([0.25, 0.5, 0.25])
    k = k1
    for _ in range(dims - 1):
        k = k[..., None] * k1
    return k[None, None]  # [1, 1, 3, ..., 3]


def make_score_fn(dims: int, device):
    """A^T (y - A x) for A a zero-padded [1, 2, 1]/4 blur per axis (symmetric, so A^T = A); C = 1."""
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    kernel = _blur_kernel(dims).to(device)

    def blur(x):
        return conv(x, kernel.to(x.dtype), padding=1)

    def score_fn(x, y):
        return blur(y - blur(x))
    return score_fn


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
    y = blur(x_true, _blur_kernel(dims), padding=1) + 0.01 * torch.randn(shape, generator=gen)
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
    return rim_fast.RIM(spec["size"], model, score_fn=data["score_fn"], T=T, device=DEVICE)


def _backend_ctx(provider: str):
    return rim_fast.ops.use_backend("reference") if provider == "rim_fast_reference" else contextlib.nullcontext()


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


@functools.lru_cache(maxsize=None)
def reference(name: str, mode: str) -> dict:
    """The baseline's fp32 outputs at the initial weights and, with the fp64 check, a float64 run and the fp32
    baseline's error against it. Cached per workload and mode."""
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
    return ref


def check(name: str, mode: str, out: dict) -> dict:
    """{"ok", "err", "tol", "against"} for a provider's outputs at the initial weights."""
    ref = reference(name, mode)
    if CHECK == "fp64":
        err = errors(out, ref["fp64"])
        tol = {k: max(2 * ref["baseline_err"][k], CPU_TOL[k]) for k in err}
        against = f"float64 {ref['baseline']}"
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

def _log_status(**record) -> None:
    path = os.environ.get("RIM_FAST_BENCH_STATUS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _dynamo_counts() -> dict:
    from torch._dynamo.utils import counters
    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "graph_break_reasons": sorted(counters["graph_break"])[:5]}


@pytest.mark.parametrize("workload,mode,provider", CASES)
def test_rim(benchmark, workload, mode, provider):
    info = dict(workload=workload, mode=mode, provider=provider, device=DEVICE)
    oom = None
    try:
        _run_case(benchmark, workload, mode, provider)
    except pytest.skip.Exception as e:
        _log_status(**info, status="skipped", reason=str(getattr(e, "msg", e)))
        raise
    except torch.cuda.OutOfMemoryError as e:
        oom = f"out of memory: {str(e).splitlines()[0][:200]}"
    except BaseException as e:
        _log_status(**info, status="error", reason=f"{type(e).__name__}: {str(e)[:300]}")
        raise
    if oom is not None:
        # the traceback (and the case's tensors) are gone once the except block has ended
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
        _log_status(**info, status="skipped", reason=oom)
        pytest.skip(oom)
    _log_status(**info, status="ok", reason="")


def _check_call(r, mode, provider, predict_fn, loss_fn, optimizer, initial, y, x_true):
    """One call from the initial weights whose outputs the check compares; on CPU train_step it also counts
    the bytes saved for backward. Returns (outputs, SavedBytes)."""
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
    optimizer.zero_grad(set_to_none=True)
    # CPU: compiled graphs: hooks around the whole call; eager: around the backbone (torch.func refuses hooks)
    if CUDA:
        hooks = contextlib.nullcontext()
    else:
        hooks = saved.hooks() if provider in COMPILED else hook_backbone(r.model, saved)
    with backend:
        try:
            with hooks:
                loss = loss_fn(y, x_true)
        except Exception as err:  # noqa: BLE001 - e.g. a recompilation that meets torch.func under the hooks
            saved.error = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            loss = loss_fn(y, x_true)
        loss.backward()
        synchronize(DEVICE)
        out = {"loss": loss.detach().clone(), "grads": _grads(r.model)}
        optimizer.step()
    synchronize(DEVICE)
    return out, saved


def _run_case(benchmark, workload, mode, provider):
    spec = ALL_WORKLOADS[workload]
    if provider.startswith("torch_rim") and not _has_torch_rim(spec):
        pytest.skip(f"torch_rim 0.2.9 has no {spec['arch']} (its Unet is an empty stub)")
    data = workload_data(workload)
    y, x_true = data["y"], data["x_true"]
    benchmark.group = f"{workload} {mode}"
    benchmark.extra_info.update(
        workload=workload, mode=mode, provider=provider, device=DEVICE, arch=spec["arch"], dims=spec["dims"],
        size=list(spec["size"]), batch=spec["batch"], channels=1, T=T, baseline=baseline_of(spec),
        rounds_requested=ROUNDS or f"{MIN_ROUNDS}-{MAX_ROUNDS} in {BUDGET_S:g} s",
        warmup_requested=WARMUP, rim_fast_backend=rim_fast.ops.backend(),
        triton_interpret=os.environ.get("TRITON_INTERPRET", ""), smoke=SMOKE, check=CHECK)
    if CUDA:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the allow_tf32 flags may be deprecated for fp32_precision
            benchmark.extra_info.update(cudnn_allow_tf32=bool(torch.backends.cudnn.allow_tf32),
                                        matmul_allow_tf32=bool(torch.backends.cuda.matmul.allow_tf32))
    reference(workload, mode)  # computed (and cached) before this case's memory is measured

    compiled = provider in COMPILED
    if compiled:
        torch._dynamo.reset()  # every case compiles afresh: no cache-size limit, no automatic dynamic shapes
        from torch._dynamo.utils import counters
        counters.clear()
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
        mem_before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    r = build(workload, provider)
    initial = [p.detach().clone() for p in r.model.parameters()]
    if provider == "torch_rim_compiled":
        predict_fn, loss_fn = torch.compile(r.predict), torch.compile(r.loss_fn)
    else:
        if provider == "rim_fast_compiled":
            r.compile()
        predict_fn, loss_fn = r.predict, r.loss_fn
    optimizer = torch.optim.Adam(r.model.parameters(), lr=LEARNING_RATE) if mode == "train_step" else None

    if mode == "predict":
        def step():
            with _backend_ctx(provider), torch.no_grad():
                out = predict_fn(y)
            synchronize(DEVICE)
            return out
    else:
        def step():
            with _backend_ctx(provider):
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(y, x_true)
                loss.backward()
                optimizer.step()
            synchronize(DEVICE)
            return loss

    # warm-up: compile, autotune, CUDA-graph capture; then the check call, from the initial weights.
    # Eager providers record which implementation served each op; a compiled graph would guard on the trace.
    with (contextlib.nullcontext(None) if compiled else rim_fast.ops.trace()) as impls:
        t0 = time.perf_counter()
        # compiled providers compile before the check call, whose hooks torch.func refuses to trace under
        warmup = max(WARMUP, 1) if compiled else WARMUP
        benchmark.extra_info["warmup"] = warmup
        for i in range(warmup):
            step()
            if i == 0:
                benchmark.extra_info["first_call_s"] = time.perf_counter() - t0
        t_check = time.perf_counter()
        out, saved = _check_call(r, mode, provider, predict_fn, loss_fn, optimizer, initial, y, x_true)
        t_check = time.perf_counter() - t_check
        if warmup == 0:
            benchmark.extra_info["first_call_s"] = t_check
    del initial

    result = check(workload, mode, out)
    benchmark.extra_info.update(check_ok=result["ok"], check_err=result["err"], check_tol=result["tol"],
                                check_against=result["against"])
    del out
    if not result["ok"]:
        warnings.warn(f"{workload} {mode} {provider}: check failed, errors {result['err']} > {result['tol']}")
    benchmark.extra_info["impls"] = sorted(f"{op}:{impl}" for op, impl in impls) if impls is not None else []
    if CUDA:
        benchmark.extra_info["memory_bytes"] = torch.cuda.max_memory_allocated() - mem_before
        benchmark.extra_info["memory_kind"] = "cuda peak allocated (warm-up + check call)"
    elif mode == "train_step":
        benchmark.extra_info["memory_bytes"] = saved.total if saved.error is None else None
        benchmark.extra_info["memory_error"] = saved.error
        benchmark.extra_info["memory_kind"] = ("saved for backward by the compiled graph" if compiled
                                               else "saved for backward by the backbone")
    else:
        benchmark.extra_info["memory_bytes"] = None
        benchmark.extra_info["memory_kind"] = "not measured (CPU predict saves nothing for backward)"

    if compiled:
        before = _dynamo_counts()
        benchmark.extra_info.update(before)

    rounds = ROUNDS or max(MIN_ROUNDS, min(MAX_ROUNDS, int(BUDGET_S / max(t_check, 1e-6))))
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=0)

    if compiled:
        after = _dynamo_counts()
        benchmark.extra_info["recompiled_while_timed"] = after["graphs"] - before["graphs"]
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        step()
        benchmark.extra_info["steady_memory_bytes"] = torch.cuda.max_memory_allocated() - mem_before
    del r, optimizer, predict_fn, loss_fn
    if compiled:
        torch._dynamo.reset()
    gc.collect()
