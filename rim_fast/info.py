"""``python -m rim_fast.info``: what this installation of rim_fast is and what it will run. Paste its output into a
bug report.

It prints the versions (rim_fast, torch, Triton, CUDA, Python), the extension ``rim_fast._C`` (where it was
loaded from, CPU and CUDA kernels, the GPU architectures and CUDA version it was built for), the GPUs and their
compute capabilities, ``RIM_FAST_BACKEND`` and ``RIM_FAST_CUDA_LAYOUT``, and, for each op and device, the
implementation ``auto`` picks for a standard workload (S2: B=16, 64x64, Hourglass nf=32, hidden_units=32; eager,
no autograd) and why each other implementation is not used there. ``--short``: one line. ``--json``: the same
facts as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Optional

import torch

from . import __version__, _ext, cpu_pool, ops
from .ops import _triton as triton_backend
from .ops._dispatch import OPS

#: S2 of the benchmark table, as the ops see it: the image, the network's first conv, the GRU state
_B, _S, _NF, _HIDDEN = 16, (64, 64), 32, 32
_STATE = (_B, _HIDDEN // 2, *(n // 4 for n in _S))  # one GRU of the GRUBlock, at 1/4 resolution


def _sample_calls(device: torch.device) -> list:
    """(op name, arguments) for every public op on ``device``: S2-sized, uninitialised tensors."""
    def t(*shape):
        return torch.empty(shape, device=device)
    x, score = t(_B, 1, *_S), t(_B, 1, *_S)
    feat, w3 = t(_B, _NF, *_S), t(_NF, _NF, 3, 3)
    bias = t(_NF)
    H, S = _STATE[1], _STATE[2:]
    bh = t(H)
    return [
        ("conv", (feat, w3, bias, 1, "same", 1, 1)),
        ("conv_same", (feat, w3, bias, 3, 2, 1, 1, True)),
        ("conv_transpose", (t(_B, _NF, 32, 32), t(_NF, _NF, 3, 3), bias, 2, 1, 1, 1, 1)),
        ("tanh", (feat,)),
        ("conv_tanh", (feat, w3, bias, "same", 1, 1)),
        ("conv_transpose_tanh", (t(_B, _NF, 32, 32), t(_NF, _NF, 3, 3), bias, 2, 1, 1, 1, 1, None)),
        ("bias_tanh", (feat, bias)),
        ("upfirdn", (feat, t(4, 4), 1, 2, 1, 1)),
        ("gru_gates_zr", (t(_B, 3 * H, *S), t(_B, 2 * H, *S), t(*_STATE), bh, bh)),
        ("gru_gates_h", (t(_B, 3 * H, *S), t(*_STATE), t(*_STATE), t(*_STATE), bh)),
        ("gru_gates_zero_state", (t(_B, 2 * H, *S), bh, bh)),
        ("preprocess_score", (score, t(*score.shape), t(*score.shape), 0, "adam", 0.9, 0.999, 1e-7)),
        ("update_state", (x, score, t(*x.shape), None)),
    ]


def _why_not(impl, args, picked: str) -> str:
    """Why ``auto`` runs ``picked``, not ``impl``, for these arguments."""
    if impl.missing() is not None or not impl.usable(*args):
        return impl.why_not(*args)
    if impl.auto(*args):
        return f"usable; {picked} comes first"
    rule = (impl.auto.__doc__ or "").strip().split("\n\n")[0]
    rule = " ".join(rule.split())
    return "usable; auto prefers the reference here" + (f" ({rule})" if rule else "")


def _devices() -> list:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return devices


def _op_choices(device: torch.device) -> list:
    rows = []
    with torch.no_grad():
        for name, args in _sample_calls(device):
            op = OPS[name]
            picked, _ = op._choose(args)
            others = {impl.name: _why_not(impl, args, picked) for impl in op.impls if impl.name != picked}
            if picked != "reference":
                others["reference"] = "the fallback, where no faster implementation applies"
            rows.append({"op": op.name, "device": str(device), "auto": picked, "others": others})
    return rows


def _triton() -> dict:
    try:
        import triton
        version = triton.__version__
    except ImportError:
        version = None
    return {"version": version, "gate_kernels": triton_backend.missing() or "available",
            "interpreter": os.environ.get("TRITON_INTERPRET") == "1"}


def collect(with_ops: bool = True) -> dict:
    """Everything ``python -m rim_fast.info`` prints, as a dict."""
    module = _ext.module()
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": props.name, "capability": f"{props.major}.{props.minor}",
                         "sms": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
                         "update_step_kernels": _ext.cuda_problem(i) or "run here"})
    info = {
        "rim_fast": {"version": __version__, "path": os.path.dirname(os.path.abspath(__file__))},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda,
                  "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None},
        "triton": _triton(),
        "extension": {
            "path": getattr(module, "__file__", None),
            "missing": _ext.missing(),
            "cpu_kernels": module is not None,
            "cuda_kernels": _ext.built_with_cuda(),
            "cuda_version": _ext.cuda_version(),
            "cuda_archs": list(_ext.cuda_archs()),
            "built_against_torch": getattr(module, "TORCH_VERSION", None),
        },
        "gpus": gpus,
        "backend": ops.backend(),
        "cuda_layout": ops.cuda_layout(),
        "cpu_pool": cpu_pool.available(),
        "winograd": _winograd(module),
    }
    if with_ops:
        info["ops"] = [row for device in _devices() for row in _op_choices(device)]
    return info


def _winograd(module) -> dict:
    """The CPU's 3D 3x3x3 convolutions by Winograd (ops._cpu): the kernels' instruction set, or why they are off."""
    from .ops import _cpu
    isa = module._cpu_isa() if module is not None else None
    if module is None:
        why = "no rim_fast._C"
    elif not _cpu.WINOGRAD:
        why = "RIM_FAST_WINOGRAD=0"
    elif _cpu.WINOGRAD_ISA is None:
        why = (f"torch's CPU capability is {torch.backends.cpu.get_cpu_capability()}: the kernels need AVX-512 or "
               f"AVX2 (oneDNN's direct convolutions run)")
    else:
        why = None
    return {"on": why is None, "isa": isa if why is None else None, "off_because": why}


def _winograd_line(w: dict) -> str:
    head = "CPU Winograd convolutions (3D 3x3x3, stride 1, float32): "
    if w["on"]:
        isa = {"avx512": "AVX-512", "avx2": "AVX2"}.get(w["isa"], w["isa"])
        return head + f"on, {isa} kernels (RIM_FAST_WINOGRAD=0 turns them off)"
    return head + f"off ({w['off_because']})"


def _extension_line(ext: dict) -> str:
    if ext["path"] is None:
        return f"rim_fast._C: not loaded ({ext['missing']})"
    if ext["cuda_kernels"]:
        cuda = f"CUDA {ext['cuda_version']} kernels for {_ext.describe_archs(ext['cuda_archs'])}"
    else:
        cuda = "no CUDA kernels (CPU-only build)"
    return f"rim_fast._C: {ext['path']} | CPU kernels | {cuda} | built against torch {ext['built_against_torch']}"


def format_short(info: dict) -> str:
    torch_info = info["torch"]
    return (f"rim_fast {info['rim_fast']['version']} ({info['rim_fast']['path']}) | torch {torch_info['version']}"
            f" | {_extension_line(info['extension'])}")


def format_text(info: dict) -> str:
    torch_info, triton_info = info["torch"], info["triton"]
    lines = [
        f"rim_fast {info['rim_fast']['version']} ({info['rim_fast']['path']})",
        f"python {info['python']} | {info['platform']}",
        f"torch {torch_info['version']} (CUDA {torch_info['cuda'] or 'none'}, cuDNN {torch_info['cudnn'] or 'none'})"
        f" | triton {triton_info['version'] or 'not installed'}"
        + (" (TRITON_INTERPRET=1)" if triton_info["interpreter"] else ""),
        _extension_line(info["extension"]),
        f"Triton gate kernels: {triton_info['gate_kernels']}",
    ]
    if info["gpus"]:
        for gpu in info["gpus"]:
            lines.append(f"GPU cuda:{gpu['index']}: {gpu['name']}, compute capability {gpu['capability']}, "
                         f"{gpu['sms']} SMs, {gpu['memory_gib']} GiB | update-step CUDA kernels: "
                         f"{gpu['update_step_kernels']}")
    else:
        lines.append("GPUs: none visible")
    lines.append(f"RIM_FAST_BACKEND={info['backend']} | RIM_FAST_CUDA_LAYOUT={info['cuda_layout']}")
    lines.append("CPU memory pool (eager CPU calls and their backward): " + (
        "on (RIM_FAST_CPU_POOL=0 turns it off)" if info["cpu_pool"]
        else "off (RIM_FAST_CPU_POOL=0, or no rim_fast._C)"))
    lines.append(_winograd_line(info["winograd"]))
    if "ops" in info:
        lines += ["", "What `auto` runs for S2-sized inputs (B=16, 64x64; eager, no autograd), per op and device:",
                  "", "| op | device | auto runs | the others, and why not |", "| --- | --- | --- | --- |"]
        for row in info["ops"]:
            others = "; ".join(f"{name}: {why}" for name, why in row["others"].items()) or "-"
            lines.append(f"| {row['op']} | {row['device']} | {row['auto']} | {others} |")
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rim_fast.info", description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="one line: versions and the extension")
    parser.add_argument("--json", action="store_true", help="the facts as JSON")
    args = parser.parse_args(argv)
    info = collect(with_ops=not args.short)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_short(info) if args.short else format_text(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
