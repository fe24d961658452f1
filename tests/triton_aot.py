"""Ahead-of-time compilation of the Triton kernels (``kernels/gru_gates.py``, ``kernels/bias_tanh.py``) into real
cubins for a GPU architecture, on a machine without a GPU; used by ``tests/test_triton_cubins.py``.

Run as a script in a process where Triton is *not* interpreted (no ``TRITON_INTERPRET``)::

    python tests/triton_aot.py --arch 90 --sm-count 132 --out /tmp/aot90    # prints one JSON object

The launches are the launchers' own: every launcher of the kernel module is called on meta tensors shaped as
the GRU cells of the real RIM problems (``PROBLEMS``), with ``_sm_count`` patched to the target GPU's and the
kernel launch replaced by a recorder. Each recorded launch is specialised by Triton's own binder (the JIT's
pointer-alignment, ``== 1`` and divisibility-by-16 specialisations) and compiled with ``triton.compile`` for
``GPUTarget("cuda", arch, 32)``; identical specialisations are compiled once. Each cubin is then read with the
cuobjdump shipped inside Triton's package (``--list-elf``, ``--dump-resource-usage``), and ptxas's own ``-v``
log (``knobs.nvidia.dump_ptxas_log``) gives the spill stores and loads.

A canary compiles the largest kernel under a register cap (``maxnreg``) that forces spills: the spill
detector must see them. Exit status 0 with ``{"results": [...], "canary": {...}}``, or 3 with
``{"skip": reason}`` when the installed Triton lacks the API this needs."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
import traceback

#: GRU cells of the real problems as the gate ops see them: (name, B, H, spatial). Hourglass / Unet(nf=32,
#: ch_mult=(2, 2), hidden_units=32) put a GRUBlock of two GRUs with H = hidden_units / 2 = 16 at 1/4 of the
#: input resolution (bench/common.py WORKLOADS, bench/bench_gru_gates.py); the rest are awkward cases.
PROBLEMS = (
    ("S1", 32, 16, (64,)),            # 1D 256, B=32
    ("S2", 16, 16, (16, 16)),         # 2D 64x64, B=16 (also U2, the Unet on S2)
    ("S3", 4, 16, (4, 4, 4)),         # 3D 16^3, B=4
    ("L2", 32, 16, (64, 64)),         # 2D 256x256, B=32
    ("smoke2", 2, 16, (2, 2)),        # bench smoke sizes: 2D 8x8, B=2
    ("lin-B1", 1, 16, ()),            # GRU on linear layers (dimensions=0): N = 1, batch 1
    ("lin-B32", 32, 16, ()),          # N = 1, the batch along the tile's N axis
    ("H5-odd", 3, 5, (7, 9)),         # odd H and N: the second GRU's state slice is not 16-byte aligned
    ("H3-1D", 2, 3, (33,)),
    ("H32", 16, 32, (16, 16)),        # hidden_units=64
    ("H64", 8, 64, (32, 32)),         # hidden_units=128
    ("i64", 1, 16, (416, 416, 416)),  # batch strides of wx and wzh (3 H N, 2 H N) > 2**31: int64 arguments
)
#: dtype variants, (activation dtype, bias dtype): fp32 for every problem; half precision (a model cast with
#: .half() / .bfloat16()) and bf16 activations with fp32 biases (the ops accept 1D tensors of another dtype; the
#: outputs are then fp32) for the problems in LOW_PRECISION_PROBLEMS: the largest tile and the N = 1 layout
DTYPES = {"fp32": ("float32", "float32"), "fp16": ("float16", "float16"), "bf16": ("bfloat16", "bfloat16"),
          "bf16-fp32bias": ("bfloat16", "float32")}
LOW_PRECISION_PROBLEMS = ("L2", "lin-B32")

KERNELS = ("_gru_zr_fwd_kernel", "_gru_h_fwd_kernel", "_gru_zero_state_fwd_kernel",
           "_gru_zr_bwd_kernel", "_gru_h_bwd_kernel", "_gru_zero_state_bwd_kernel",
           "_bias_tanh_fwd_kernel", "_bias_tanh_bwd_kernel")
#: the canary: this kernel, its largest tile, one warp and a register cap make ptxas spill
CANARY = dict(kernel="_gru_zr_bwd_kernel", problem="L2", num_warps=1, maxnreg=24)

SKIP = 3


def cuobjdump_path() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


# ---- parsing (pure functions, also used by the test's self-checks) -------------------------------------

def parse_resource_usage(text: str) -> dict:
    """``cuobjdump --dump-resource-usage`` output -> {function: {"REG": int, "STACK": int, "LOCAL": int, ...}}."""
    usage = {}
    for name, line in re.findall(r"Function ([^\s:]+):\s*\n\s*([^\n]*)", text):
        usage[name] = {key: int(value) for key, value in re.findall(r"([A-Z_]+(?:\[\d+\])?):(\d+)", line)}
    return usage


def parse_ptxas_log(text: str) -> dict:
    """ptxas ``-v`` log -> {"registers", "stack_frame", "spill_stores", "spill_loads"} (None when absent)."""
    out = {"registers": None, "stack_frame": None, "spill_stores": None, "spill_loads": None}
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if m:
        out["stack_frame"], out["spill_stores"], out["spill_loads"] = map(int, m.groups())
    m = re.search(r"Used (\d+) registers", text)
    if m:
        out["registers"] = int(m.group(1))
    return out


def spill_problems(usage: dict, ptxas: dict) -> list:
    """Why a cubin spills, [] when it does not: a stack frame or local memory in the cubin's resource usage,
    spill stores or loads in ptxas's log. Missing figures count as problems (a detector that reads nothing
    must not pass)."""
    problems = []
    for key in ("STACK", "LOCAL"):
        if key not in usage:
            problems.append(f"no {key} in cuobjdump's resource usage")
        elif usage[key] != 0:
            problems.append(f"{key}:{usage[key]}")
    for key in ("spill_stores", "spill_loads"):
        if ptxas.get(key) is None:
            problems.append(f"no {key} in ptxas's log")
        elif ptxas[key] != 0:
            problems.append(f"{ptxas[key]} bytes {key.replace('_', ' ')}")
    return problems


# ---- recording the launchers' launches -----------------------------------------------------------------

def kernel_module(name: str = "gru_gates"):
    from rim_fast.ops._triton import _import_kernels
    return _import_kernels(name)


def activation_shape(B: int, H: int, spatial: tuple) -> tuple:
    """The convolution output a problem's bias_tanh sees: the Hourglass's first level, [B, nf = 2H, *4 spatial]
    (S2: [16, 32, 64x64], L2: [32, 32, 256x256]; the 'i64' problem: 32 x 1664^3 elements, planes > 2**31)."""
    return (B, 2 * H, *[4 * s for s in spatial])


@contextlib.contextmanager
def _recording(module, sm_count: int, empty, launch):
    """Within: ``module``'s launchers run unchanged but for four module globals: a recorder in place of the launch,
    ``empty`` allocating (meta tensors), the device's SM count, and ``launch`` for the launch geometry on a CUDA
    device. Yields (calls, problem): each launch appends (problem["name"], kernel, grid, args, kwargs) to calls."""
    calls, problem = [], {"name": None}

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def record(*args, **kwargs):
                calls.append((problem["name"], self.kernel, grid, args, kwargs))
            return record

    saved = {key: getattr(module, key) for key in ("_traceable", "_empty", "_sm_count", "_launch")}
    module._traceable, module._empty, module._launch = Recorder, empty, launch
    module._sm_count = lambda index: sm_count
    try:
        yield calls, problem
    finally:
        for key, value in saved.items():
            setattr(module, key, value)


def record_bias_tanh_launches(KB, sm_count: int, problems, dtypes=DTYPES["fp32"]) -> list:
    """``record_launches`` for ``kernels/bias_tanh.py``: forward and backward on each problem's activation,
    contiguous and (with spatial dims) channels-last, the two layouts the kernel tiles differently."""
    import torch
    act, bias_dtype = getattr(torch, dtypes[0]), getattr(torch, dtypes[1])

    def empty(shape, stride, dtype, device):
        return torch.empty_strided(shape, stride, dtype=dtype, device="meta")

    def launch(M, K, device):
        return KB._geometry.__wrapped__(M, K, torch.device("cuda", 0))
    with _recording(KB, sm_count, empty, launch) as (calls, problem):
        for name, B, H, spatial in problems:
            problem["name"] = name
            shape = activation_shape(B, H, spatial)
            x = torch.empty(shape, dtype=act, device="meta")
            layouts = [x]
            if spatial:
                order = (0, *range(2, x.dim()), 1)
                layouts.append(x.permute(order).contiguous().permute(*[order.index(i) for i in range(x.dim())]))
            for x in layouts:
                y = KB.bias_tanh_fwd(x, torch.empty(shape[1], dtype=bias_dtype, device="meta"))
                KB.bias_tanh_bwd(torch.empty_like(y), y)
    return calls


def record_launches(K, sm_count: int, problems, dtypes=DTYPES["fp32"]) -> list:
    """Call every launcher of K on meta tensors for each problem; return the launches they make, as
    (problem name, kernel, grid, args, kwargs) (see ``_recording``)."""
    import torch
    act, bias_dtype = getattr(torch, dtypes[0]), getattr(torch, dtypes[1])

    def empty(shape, dtype, device):
        return torch.empty(shape, dtype=dtype, device="meta")

    def launch(B, H, N, device, channels_inner=False):
        return K._Launch(B, H, N, torch.device("cuda", 0), channels_inner)
    with _recording(K, sm_count, empty, launch) as (calls, problem):
        for name, B, H, spatial in problems:
            problem["name"] = name

            def m(*shape, dtype=act):
                return torch.empty(shape, dtype=dtype, device="meta")
            # GRUBlock: the state [B, 2H, *S] is split on channels, each GRU sees a slice (the second one at an
            # offset of H N elements); conv outputs and grads are contiguous
            h = torch.tensor_split(m(B, 2 * H, *spatial), 2, dim=1)[1]
            wx, uzr, uh, wzh = m(B, 3 * H, *spatial), m(B, 2 * H, *spatial), m(B, H, *spatial), m(B, 2 * H, *spatial)
            bz, br, bh = m(H, dtype=bias_dtype), m(H, dtype=bias_dtype), m(H, dtype=bias_dtype)
            z, rh = K.gru_gates_zr_fwd(wx, uzr, h, bz, br)
            out = K.gru_gates_h_fwd(wx, uh, z, h, bh)
            out0 = K.gru_gates_zero_state_fwd(wzh, bz, bh)
            K.gru_gates_zr_bwd(torch.empty_like(z), torch.empty_like(rh), wx, uzr, h, z, br)
            K.gru_gates_h_bwd(torch.empty_like(out), wx, uh, z, h, bh)
            K.gru_gates_zero_state_bwd(torch.empty_like(out0), wzh, bz, bh)
            if spatial:
                # channels-last, as the CUDA convolutions leave them under RIM_FAST_CUDA_LAYOUT=channels_last:
                # channel stride 1 (a specialisation of its own), and the outputs laid out alike
                def cl(*shape, dtype=act):
                    return m(shape[0], *shape[2:], shape[1], dtype=dtype).movedim(-1, 1)
                wx, uzr, uh, wzh, h = cl(B, 3 * H, *spatial), cl(B, 2 * H, *spatial), cl(B, H, *spatial), \
                    cl(B, 2 * H, *spatial), cl(B, H, *spatial)
                z, rh = K.gru_gates_zr_fwd(wx, uzr, h, bz, br)
                assert K.channels_last(z), z.stride()
                out = K.gru_gates_h_fwd(wx, uh, z, h, bh)
                out0 = K.gru_gates_zero_state_fwd(wzh, bz, bh)
                K.gru_gates_zr_bwd(cl(B, H, *spatial), cl(B, H, *spatial), wx, uzr, h, z, br)
                K.gru_gates_h_bwd(cl(B, H, *spatial), wx, uh, z, h, bh)
                K.gru_gates_zero_state_bwd(cl(B, H, *spatial), wzh, bz, bh)
    return calls


# ---- compiling -----------------------------------------------------------------------------------------

def api_missing():
    """None when the installed Triton has what this needs, else why not."""
    try:
        import inspect

        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource, make_backend  # noqa: F401
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
    except Exception as err:  # noqa: BLE001
        return f"Triton {getattr(sys.modules.get('triton'), '__version__', '?')} lacks the AOT API ({err})"
    if "constexprs" not in inspect.signature(ASTSource).parameters:
        return f"Triton {triton.__version__}: ASTSource has no constexprs argument (older API)"
    if not hasattr(JITFunction, "_pack_args"):
        return f"Triton {triton.__version__}: JITFunction has no _pack_args (the binder's API changed)"
    try:
        from triton import knobs
        knobs.nvidia.dump_ptxas_log  # noqa: B018
    except Exception as err:  # noqa: BLE001
        return f"Triton {triton.__version__}: no knobs.nvidia.dump_ptxas_log ({err})"
    if not os.access(cuobjdump_path(), os.X_OK):
        return f"no cuobjdump in Triton's package ({cuobjdump_path()})"
    return None


class Compiler:
    """Compiles recorded launches for one target as the JIT would specialise them."""

    def __init__(self, arch: int, out_dir: str):
        import triton
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        self.triton, self.knobs = triton, knobs
        self.arch, self.out_dir = arch, out_dir
        self.target = GPUTarget("cuda", arch, 32)
        self.backend = make_backend(self.target)
        self.binders = {}

    def specialize(self, kernel, args, kwargs):
        """(key, signature, constexprs, attrs, options) exactly as JITFunction.run derives them."""
        from triton.runtime.jit import create_function_from_signature
        kwargs = dict(kwargs)
        kwargs["debug"] = kwargs.get("debug", kernel.debug) or self.knobs.runtime.debug
        kwargs["instrumentation_mode"] = self.knobs.compilation.instrumentation_mode
        if kernel not in self.binders:
            self.binders[kernel] = create_function_from_signature(kernel.signature, kernel.params, self.backend)
        bound, specialization, options = self.binders[kernel](*args, **kwargs)
        key = (kernel.__name__, tuple(specialization), tuple(sorted(options.items())))
        options, signature, constexprs, attrs = kernel._pack_args(self.backend, kwargs, bound, specialization,
                                                                  options)
        return key, signature, constexprs, attrs, options

    def compile(self, kernel, signature, constexprs, attrs, options, stem: str) -> dict:
        """Compile to a cubin under out_dir; its ELF list, resource usage and ptxas log; or the error."""
        from triton.compiler import ASTSource
        entry = {"error": None}
        log = io.StringIO()
        self.knobs.nvidia.dump_ptxas_log = True
        try:
            with contextlib.redirect_stdout(log):
                compiled = self.triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=self.target,
                                               options=options.__dict__)
        except Exception as err:  # noqa: BLE001 - reported per kernel, the test fails on it
            entry["error"] = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=3)}"[-4000:]
            return entry
        cubin = compiled.asm["cubin"]
        path = os.path.join(self.out_dir, stem + ".cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        tool = cuobjdump_path()
        elf = subprocess.run([tool, "--list-elf", path], capture_output=True, text=True)
        res = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True)
        usage = parse_resource_usage(res.stdout).get(kernel.__name__, {})
        ptxas = parse_ptxas_log(log.getvalue())
        entry.update(cubin=path, cubin_bytes=len(cubin), elf_magic=cubin[:4] == b"\x7fELF",
                     list_elf=(elf.stdout + elf.stderr).strip(), resource_usage=res.stdout.strip(), usage=usage,
                     ptxas=ptxas, ptxas_log=log.getvalue()[-2000:],
                     spills=spill_problems(usage, ptxas), shared=compiled.metadata.shared)
        return entry


def run(arch: int, sm_count: int, out_dir: str) -> dict:
    start = time.perf_counter()
    K, KB = kernel_module(), kernel_module("bias_tanh")
    compiler = Compiler(arch, out_dir)
    launches = []
    for variant, dtypes in DTYPES.items():
        problems = [p for p in PROBLEMS if variant == "fp32" or p[0] in LOW_PRECISION_PROBLEMS]
        launches += [(variant,) + call for call in record_launches(K, sm_count, problems, dtypes)]
        launches += [(variant,) + call for call in record_bias_tanh_launches(KB, sm_count, problems, dtypes)]
    results, by_key = [], {}
    for variant, problem, kernel, grid, args, kwargs in launches:
        key, signature, constexprs, attrs, options = compiler.specialize(kernel, args, kwargs)
        launch = {"problem": problem, "grid": list(grid), "dtype": variant}
        if key in by_key:
            by_key[key]["launches"].append(launch)
            continue
        meta = {k: v for k, v in kwargs.items() if k.startswith("BLOCK") or k in ("num_warps", "BIAS_ON_ROWS")}
        # (kernel, variant, problem) makes one launch: the first problem that needs a specialisation names it
        tile = "-".join(f"{k.removeprefix('BLOCK_')}{int(v)}" for k, v in meta.items() if k != "num_warps")
        test_id = f"sm{arch}-{kernel.__name__}-{tile}-w{meta['num_warps']}-{variant}-{problem}"
        entry = {"id": test_id, "kernel": kernel.__name__, "arch": arch, "sm_count": sm_count, **meta,
                 "dtype": variant, "signature": {k: str(v) for k, v in signature.items()},
                 "constexprs": {kernel.arg_names[path[0]]: value for path, value in constexprs.items()},
                 "launches": [launch]}
        entry.update(compiler.compile(kernel, signature, constexprs, attrs, options, test_id))
        by_key[key] = entry
        results.append(entry)
    canary = _canary(K, compiler, sm_count)
    import triton
    from triton.runtime.jit import JITFunction
    # every kernel of the module (device helpers such as _tile are inlined, not launched)
    module_kernels = sorted(name for module in (K, KB) for name, obj in vars(module).items()
                            if isinstance(obj, JITFunction) and name.endswith("_kernel"))
    return {"arch": arch, "sm_count": sm_count, "triton": triton.__version__, "module_kernels": module_kernels,
            "results": results, "canary": canary, "seconds": round(time.perf_counter() - start, 1)}


def summary(report: dict) -> str:
    """One line per compiled specialisation: id, registers, stack, spills, the problems that launch it."""
    lines = [f"sm_{report['arch']} ({report['sm_count']} SMs), Triton {report['triton']}: "
             f"{len(report['results'])} specialisations in {report['seconds']} s"]
    for r in report["results"] + [report["canary"]]:
        if r.get("error"):
            lines.append(f"  {r['id']}: ERROR {r['error'].splitlines()[0]}")
            continue
        usage, ptxas = r["usage"], r["ptxas"]
        problems = ",".join(launch["problem"] for launch in r.get("launches", []))
        lines.append(f"  {r['id']}: REG {usage.get('REG')} STACK {usage.get('STACK')} LOCAL {usage.get('LOCAL')} "
                     f"spill st/ld {ptxas['spill_stores']}/{ptxas['spill_loads']} [{problems}]")
    return "\n".join(lines)


def _canary(K, compiler, sm_count) -> dict:
    """The largest kernel at its largest tile with one warp and few registers: it must spill."""
    problem = next(p for p in PROBLEMS if p[0] == CANARY["problem"])
    for _, kernel, grid, args, kwargs in record_launches(K, sm_count, [problem]):
        if kernel.__name__ == CANARY["kernel"]:
            kwargs = dict(kwargs, num_warps=CANARY["num_warps"], maxnreg=CANARY["maxnreg"])
            _, signature, constexprs, attrs, options = compiler.specialize(kernel, args, kwargs)
            entry = {"id": f"sm{compiler.arch}-canary-{kernel.__name__}-C{kwargs['BLOCK_C']}-N{kwargs['BLOCK_N']}"
                           f"-w1-maxnreg{CANARY['maxnreg']}", **{k: kwargs[k] for k in ("BLOCK_C", "BLOCK_N")}}
            entry.update(compiler.compile(kernel, signature, constexprs, attrs, options, entry["id"]))
            return entry
    raise RuntimeError(f"the launchers made no {CANARY['kernel']} launch")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, required=True, help="compute capability, e.g. 80 or 90")
    parser.add_argument("--sm-count", type=int, required=True, help="SMs of the target GPU (A100 108, H100 132)")
    parser.add_argument("--out", required=True, help="folder for the cubins and Triton's cache")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print(json.dumps({"error": "TRITON_INTERPRET=1: the kernels would be interpreted, not compiled"}))
        return 2
    os.makedirs(args.out, exist_ok=True)
    # every kernel goes through the compiler (and ptxas prints its log) on every run, in a cache of its own
    os.environ["TRITON_CACHE_DIR"] = os.path.join(args.out, "triton-cache")
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    missing = api_missing()
    if missing:
        print(json.dumps({"skip": missing}))
        return SKIP
    print(json.dumps(run(args.arch, args.sm_count, args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
