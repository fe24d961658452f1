"""Ops per RIM step that would launch a kernel on a GPU, counted on any device (the CPU in CI).

A ``TorchDispatchMode`` counts the aten ops a call runs, leaving out views and metadata (ops whose output
aliases an input, shape queries) and bare allocations (``empty``), which launch nothing. The count follows what
a GPU would run, whatever device it is taken on:

- ``reference``: rim_fast with ``RIM_FAST_BACKEND=reference`` (the PyTorch references, as on a GPU);
- ``kernels``: the references, except that each call of an op a GPU serves with one kernel (the Triton gates,
  the C++/CUDA update step) counts one, whatever the CPU runs for it; CPU-only implementations (channels-last
  layouts, the C++ CPU tanh, oneDNN's fused conv + tanh) are not used, so their layout copies are not counted;
  a convolution followed by tanh (``conv_tanh``) runs as CUDA runs it: the convolution without its bias, then
  the Triton ``bias_tanh`` kernel (one kernel, and one for its backward plus the bias gradient's ``sum``);
- ``torch_rim``: torch_rim 0.2.9 itself.

In every provider a convolution with a bias counts as CUDA runs it: cuDNN does not handle biases (aten adds the
bias in a kernel of its own after cuDNN's, and reduces its gradient with a ``sum`` after cuDNN's backward), so
``aten.convolution`` with a bias counts 2 (``+ bias add``) and ``aten.convolution_backward`` computing a bias
gradient one more (``+ bias grad``). cuDNN's backward runs the input and weight gradients as two calls: those
still count one, for every provider alike.

Modes: ``predict`` (no autograd) and ``train_step`` (``loss_fn`` and its backward; the optimizer's step is not
counted). Per step = total / T. The RIM is the benchmark's (bench.common: the workload's Hourglass, its blur score
function A^T (y - A x), 3 ops a step; Identity preprocessing, which launches nothing).

    python -m bench.op_count [--workload S2] [--T 10] [--detail]

The counts depend on the number of spatial dimensions, not on the sizes: they are taken at the tiny sizes of
bench.common.SMOKE_WORKLOADS (S2 and L2 count the same). ``bench.run`` adds them to its report.
"""
from __future__ import annotations

import argparse
import contextlib
import re
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

import rim_fast
from bench.common import MODEL, SMOKE_WORKLOADS, T as DEFAULT_T, make_score_fn
from rim_fast.ops import reference
from rim_fast.ops._dispatch import OPS, needs_grad, use_backend
from rim_fast.ops.conv import _conv_same_symmetric, _symmetric_usable

#: the op families a GPU runs as one kernel per call in the ``kernels`` count
ONE_KERNEL_OPS = ("gru_gates_zr", "gru_gates_h", "gru_gates_zero_state", "preprocess_score", "update_state",
                  "bias_tanh")
#: the ops whose GPU backward launches one more kernel beside its own: the bias gradient of bias_tanh is torch's sum
EXTRA_BACKWARD = {"bias_tanh": "aten.sum (bias_tanh's bias gradient)"}
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh",
              "_local_scalar_dense", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size",
              "_has_compatible_shallow_copy_type", "detach_", "_to_copy_meta"}


def _launches(func) -> bool:
    """Whether an aten op launches a kernel: not a view (an output aliasing an input) nor a bare allocation."""
    schema = func._schema
    if any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns):
        return False
    return func._schema.name.split("::")[-1] not in _NO_KERNEL


class LaunchCounter(TorchDispatchMode):
    """Counts the kernel-launching aten ops run inside it (``paused`` leaves some out)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and _launches(func):
            self.counts[str(func.overloadpacket)] += 1
            # cuDNN does not handle biases: aten adds them, and reduces their gradients, in kernels of their own
            if func is torch.ops.aten.convolution.default and args[2] is not None:
                self.counts["aten.convolution + bias add"] += 1
            elif func is torch.ops.aten.convolution_backward.default and args[10][2]:
                self.counts["aten.convolution_backward + bias grad"] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@contextlib.contextmanager
def _paused(counter: LaunchCounter):
    counter.paused += 1
    try:
        yield
    finally:
        counter.paused -= 1


class _OneKernel(torch.autograd.Function):
    """One counted launch forward and one backward around a reference computed uncounted (its outputs
    flattened; ``holder`` receives their structure)."""

    @staticmethod
    def forward(ctx, counter, name, call, holder, *tensors):
        with _paused(counter), torch.enable_grad():
            leaves = [t.detach().requires_grad_(t.requires_grad) for t in tensors]
            flat, holder["spec"] = tree_flatten(call(*leaves))
        ctx.counter, ctx.name, ctx.leaves, ctx.flat = counter, name, leaves, flat
        return tuple(o.detach() for o in flat)

    @staticmethod
    def backward(ctx, *grads):
        ctx.counter.counts[f"rim_fast::{ctx.name}_backward"] += 1
        if ctx.name in EXTRA_BACKWARD:
            ctx.counter.counts[EXTRA_BACKWARD[ctx.name]] += 1
        pairs = [(o, g) for o, g in zip(ctx.flat, grads) if o.requires_grad and g is not None]
        wanted = [t for t in ctx.leaves if t.requires_grad]
        got = {}
        if pairs and wanted:
            with _paused(ctx.counter):
                grads_in = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                               allow_unused=True)
            got = {id(t): g for t, g in zip(wanted, grads_in)}
        return (None, None, None, None) + tuple(got.get(id(t)) for t in ctx.leaves)


@contextlib.contextmanager
def _one_kernel_per_call(counter: LaunchCounter):
    """The ``kernels`` count: each call of a ONE_KERNEL_OPS op counts one, and its backward one more; the
    reference computes the values, uncounted."""
    saved = {name: OPS[name].reference for name in ONE_KERNEL_OPS}

    def counted(name, ref):
        def run(*args):
            if not (name == "preprocess_score" and args[4] == "identity"):  # identity launches nothing
                counter.counts[f"rim_fast::{name}"] += 1
            positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
            tensors = [args[i] for i in positions]
            if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
                with _paused(counter):
                    return ref(*args)

            def call(*ts):
                full = list(args)
                for i, t in zip(positions, ts):
                    full[i] = t
                return ref(*full)

            holder = {}
            flat = _OneKernel.apply(counter, name, call, holder, *tensors)
            return tree_unflatten(list(flat), holder["spec"])
        return run

    conv_tanh = OPS["conv_tanh"].reference
    conv_transpose_tanh = OPS["conv_transpose_tanh"].reference
    conv_same = OPS["conv_same"].reference

    def conv_bias_tanh(x, weight, bias, padding, dilation, groups):
        # CUDA's conv_tanh (rim_fast.ops.conv._conv_bias_tanh): the convolution without its bias, then bias_tanh
        if bias is None:
            return conv_tanh(x, weight, bias, padding, dilation, groups)
        y = OPS["conv"].reference(x, weight, None, 1, padding, dilation, groups)
        return OPS["bias_tanh"].reference(y, bias.to(y.dtype))

    def conv_transpose_bias_tanh(x, weight, bias, stride, padding, output_padding, groups, dilation, crop):
        # CUDA's conv_transpose_tanh (rim_fast.ops.conv._conv_transpose_bias_tanh), inference only
        if bias is None or needs_grad(x, weight, bias):
            return conv_transpose_tanh(x, weight, bias, stride, padding, output_padding, groups, dilation, crop)
        y = OPS["conv_transpose"].reference(x, weight, None, stride, padding, output_padding, groups, dilation)
        return OPS["bias_tanh"].reference(reference.crop_spatial(y, crop), bias.to(y.dtype))

    def conv_same_symmetric(*args):
        # CUDA's conv_same (rim_fast.ops.conv: "symmetric_padding"): no pad kernel
        return _conv_same_symmetric(*args) if _symmetric_usable(*args) else conv_same(*args)

    patched = {"conv_tanh": conv_bias_tanh, "conv_transpose_tanh": conv_transpose_bias_tanh,
               "conv_same": conv_same_symmetric}
    saved.update({name: OPS[name].reference for name in patched})
    folds_bias, rewrites = rim_fast.ops.folds_bias, rim_fast.ops.rewrites
    try:
        for name, ref in saved.items():
            OPS[name].reference = patched[name] if name in patched else counted(name, ref)
        # conv_tanh runs bias_tanh, so a following convolution carries its bias (architectures.base.fold_next_bias)
        rim_fast.ops.folds_bias = lambda x, weight, bias, *args: bias is not None
        rim_fast.ops.rewrites = lambda: True  # the layer rewrites of every backend but reference
        yield
    finally:
        for name, ref in saved.items():
            OPS[name].reference = ref
        rim_fast.ops.folds_bias, rim_fast.ops.rewrites = folds_bias, rewrites


def _rim(library, workload: str, T: int):
    # the ops do not depend on the sizes, only on the number of spatial dimensions: the tiny sizes count fast
    spec = SMOKE_WORKLOADS[workload]
    dims = spec["dims"]
    score_fn = make_score_fn(dims, "cpu")
    torch.manual_seed(0)
    if library == "torch_rim":
        import rim
        net = rim.Hourglass(1, dimensions=dims, **MODEL)
        return rim.RIM(spec["size"], net, T=T, score_fn=score_fn, device="cpu"), spec
    net = rim_fast.Hourglass(1, dimensions=dims, **MODEL)
    return rim_fast.RIM(spec["size"], net, T=T, score_fn=score_fn, device="cpu"), spec


def count(provider: str, mode: str, workload: str = "S2", T: int = DEFAULT_T) -> Counter:
    """Kernel-launching ops of one call (``predict``) or of ``loss_fn`` and its backward (``train_step``)."""
    rim, spec = _rim("torch_rim" if provider == "torch_rim" else "rim_fast", workload, T)
    g = torch.Generator().manual_seed(1)
    y = torch.randn(spec["batch"], 1, *spec["size"], generator=g)
    x = torch.randn(spec["batch"], 1, *spec["size"], generator=g)
    counter = LaunchCounter()
    patch = _one_kernel_per_call(counter) if provider == "kernels" else contextlib.nullcontext()
    backend = use_backend("reference") if provider != "torch_rim" else contextlib.nullcontext()
    with backend, patch, counter:
        if mode == "predict":
            with torch.no_grad():
                rim.predict(y)
        else:
            rim.loss_fn(y, x).backward()
    return counter.counts


def per_step(provider: str, mode: str, workload: str = "S2", T: int = DEFAULT_T) -> float:
    return sum(count(provider, mode, workload, T).values()) / T


#: a kernel launch in the ``call`` function of Inductor's generated code: an extern kernel (convolutions, matmuls),
#: a generated kernel (C++ on the CPU, Triton on GPUs) or a custom op; allocations (empty_strided) launch nothing
_LAUNCH = re.compile(r"\b(extern_kernels\.\w+|cpp_fused_\w+|triton_\w+\.run|torch\.ops\.\w+\.\w+(?:\.\w+)?)\(")


@contextlib.contextmanager
def _compiled_as_on_gpus():
    """rim_fast's choices under torch.compile as on a GPU: no oneDNN conv + tanh (the tanh a kernel of Inductor's
    own) and a conv + tanh's next convolution carrying its bias (``ops.folds_bias``), as Inductor peels a GPU
    convolution's bias into a kernel of its own. Inductor's bias peeling itself is not reproduced on the CPU."""
    from rim_fast.ops import _cpu
    saved, folds_bias = dict(_cpu._WORKS), rim_fast.ops.folds_bias
    _cpu._WORKS["conv"] = _cpu._WORKS["conv_transpose"] = False
    rim_fast.ops.folds_bias = lambda x, weight, bias, *args: bias is not None and rim_fast.ops.rewrites()
    try:
        yield
    finally:
        _cpu._WORKS.update(saved)
        rim_fast.ops.folds_bias = folds_bias


def compiled_count(library: str, workload: str = "S2", T: int = DEFAULT_T, as_on_gpus: bool = False) -> Counter:
    """The kernels of a compiled predict in Inductor's generated code (the CPU's: C++ kernels where a GPU runs
    Triton ones; the convolutions are extern kernels on both): rim_fast's ``RIM.compile()`` or
    ``torch.compile(rim.predict)`` of torch_rim, with no_grad, default mode. Each launch in the code's ``call``
    function counts one; the loop is unrolled, so per step = total / T. ``as_on_gpus`` (rim_fast): with rim_fast's
    GPU choices (``_compiled_as_on_gpus``), where the CPU's code runs conv + tanh as one oneDNN primitive."""
    from torch._inductor.utils import run_and_get_code
    rim, spec = _rim(library, workload, T)
    y = torch.randn(spec["batch"], 1, *spec["size"], generator=torch.Generator().manual_seed(1))
    predict = rim.compile().predict if library == "rim_fast" else torch.compile(rim.predict)
    torch._dynamo.reset()
    with torch.no_grad(), (_compiled_as_on_gpus() if as_on_gpus else contextlib.nullcontext()):
        _, codes = run_and_get_code(predict, y)
    counts: Counter = Counter()
    for code in codes:
        body = code[code.index("def call("):] if "def call(" in code else ""
        for line in body.splitlines():
            for name in _LAUNCH.findall(line):
                counts[re.sub(r"_\d+$", "", name)] += 1
    return counts


PROVIDERS = ("torch_rim", "reference", "kernels")
MODES = ("predict", "train_step")
#: the compiled count compiles a T-step loop (a minute or two on a CPU): the 2D workload only, by default
COMPILED_WORKLOADS = ("S2",)


def table(workloads, modes=MODES, T: int = DEFAULT_T, compiled=COMPILED_WORKLOADS) -> list:
    """[{workload, mode, provider, per_step}] for the report of bench.run; providers ``torch_rim_compiled`` and
    ``compiled`` (predict, Inductor's generated code) for the workloads in ``compiled``."""
    rows = [{"workload": w, "mode": m, "provider": p, "per_step": per_step(p, m, w, T)}
            for w in workloads for m in modes for p in PROVIDERS]
    for w in workloads:
        if w in compiled:
            for provider, library, gpu in (("torch_rim_compiled", "torch_rim", False), ("compiled", "rim_fast", False),
                                           ("compiled_as_on_gpus", "rim_fast", True)):
                rows.append({"workload": w, "mode": "predict", "provider": provider,
                             "per_step": sum(compiled_count(library, w, T, as_on_gpus=gpu).values()) / T})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="S2")
    parser.add_argument("--T", type=int, default=DEFAULT_T)
    parser.add_argument("--detail", action="store_true", help="the ops of each count")
    parser.add_argument("--compiled", action="store_true", help="also the compiled predict's kernels (minutes)")
    args = parser.parse_args(argv)
    print(f"ops per RIM step that launch a GPU kernel ({args.workload}, T={args.T}):")
    for provider in PROVIDERS:
        for mode in MODES:
            counts = count(provider, mode, args.workload, args.T)
            print(f"  {provider:10s} {mode:10s} {sum(counts.values()) / args.T:7.1f}")
            if args.detail:
                for op, n in counts.most_common():
                    print(f"      {op:40s} {n / args.T:6.1f}")
    if args.compiled:
        for label, library, gpu in (("torch_rim compiled", "torch_rim", False),
                                    ("rim_fast compiled", "rim_fast", False),
                                    ("rim_fast compiled as on GPUs", "rim_fast", True)):
            counts = compiled_count(library, args.workload, args.T, as_on_gpus=gpu)
            print(f"  {label:28s} predict {sum(counts.values()) / args.T:7.1f}")
            if args.detail:
                for op, n in counts.most_common():
                    print(f"      {op:60s} {n / args.T:6.1f}")


if __name__ == "__main__":
    main()
