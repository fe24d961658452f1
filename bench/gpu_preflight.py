"""Preflight of bench/gpu_check.sh: seconds of checks that stop the GPU run at once, with a one-line reason,
instead of minutes into it.

    python -m bench.gpu_preflight --mode full|dry --work DIR

Checks, in order (the first failure is the reason; the others still run, for the record):
  gpu        full: torch sees a CUDA GPU (torch is a CUDA build); dry: noted only
  nvcc       the CUDA toolkit, found by real path (symlinks and one-line wrapper scripts resolved to a folder with
             bin/nvcc and include/cuda_runtime.h: CUDA_HOME, else `which nvcc`, else /usr/local/cuda, cuda-*), its
             libcudart, and `nvcc --version`'s major equal to torch.version.cuda's; dry: noted only
  python.h   Python.h in sysconfig's include folder (building the extension needs it)
  wheels     full: the pure-Python wheels in ./.whl (make gpu-wheels) unpacked into a folder put on PYTHONPATH;
             then the test modules import: RIM_FAST_PREFLIGHT_MODULES (default rim, i.e. torch_rim, score_models,
             torch_ema, expecttest), and rim_fast itself (without its extension, which is not built yet)
  collect    `pytest tests -m cuda --collect-only` (run beside the checks above): every test module imports, and
             how many tests the test stage will run
Writes DIR/preflight.json (every check), DIR/preflight.env (CUDA_HOME and PYTHONPATH for the next stages, sourced by
bash) and DIR/machine.txt (bench.common.machine_line). Prints one line per check and, last, "preflight: ok" or
"preflight: FAILED: <reason>". Exit status 0 or 1.
"""
from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODULES = ("rim", "score_models", "torch_ema", "expecttest")
SITE = os.environ.get("RIM_FAST_WHEEL_SITE", "/tmp/rim_fast_site")


def _toolkit(home: str) -> bool:
    return (os.path.isfile(os.path.join(home, "bin", "nvcc"))
            and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")))


def _home_of(nvcc: str) -> str:
    """The toolkit folder of an nvcc: its real path's grandparent; for a wrapper script (`exec /opt/cuda/bin/nvcc
    "$@"`, as /usr/local/bin/nvcc on our CPU machine) the path it executes."""
    real = os.path.realpath(nvcc)
    home = os.path.dirname(os.path.dirname(real))
    if not _toolkit(home):
        try:
            with open(real, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                for target in re.findall(rb"(/[^\s\"']+/bin/nvcc)\b", head):
                    candidate = os.path.dirname(os.path.dirname(os.path.realpath(target.decode())))
                    if _toolkit(candidate):
                        return candidate
        except OSError:
            pass
    return home


def find_cuda(environ=None) -> dict:
    """{"home", "nvcc", "how"} of the CUDA toolkit to build with, or {"error"}. Order: CUDA_HOME (or CUDA_PATH) as
    given; the nvcc on PATH, by real path; /usr/local/cuda; the newest /usr/local/cuda-*."""
    environ = os.environ if environ is None else environ
    given = environ.get("CUDA_HOME") or environ.get("CUDA_PATH")
    if given:
        home = os.path.realpath(given)
        if not _toolkit(home):
            return {"error": f"CUDA_HOME={given} holds no bin/nvcc and include/cuda_runtime.h"}
        return {"home": home, "nvcc": os.path.join(home, "bin", "nvcc"), "how": f"CUDA_HOME={given}"}
    tried = []
    on_path = shutil.which("nvcc", path=environ.get("PATH", ""))
    if on_path:
        home = _home_of(on_path)
        if _toolkit(home):
            return {"home": home, "nvcc": os.path.join(home, "bin", "nvcc"), "how": f"PATH's {on_path}"}
        tried.append(f"PATH's {on_path} (not inside a toolkit)")
    for candidate in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        home = os.path.realpath(candidate)
        if _toolkit(home):
            return {"home": home, "nvcc": os.path.join(home, "bin", "nvcc"),
                    "how": candidate + (f" ({'; '.join(tried)})" if tried else "")}
    tried.append("/usr/local/cuda, /usr/local/cuda-*")
    return {"error": "no CUDA toolkit (nvcc) found: CUDA_HOME unset, tried " + ", ".join(tried)}


def nvcc_release(nvcc: str) -> str | None:
    """'13.0' from `nvcc --version`, None when it does not run."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def _cudart(home: str) -> str | None:
    for pattern in ("lib64/libcudart.so*", "lib/libcudart.so*", "targets/*/lib/libcudart.so*"):
        found = sorted(glob.glob(os.path.join(home, pattern)))
        if found:
            return found[0]
    return None


def check_nvcc(torch_cuda: str | None, environ=None) -> tuple[bool, str, dict]:
    """(ok, detail, exports) for the toolkit against torch's CUDA version (torch.version.cuda)."""
    found = find_cuda(environ)
    if "error" in found:
        return False, found["error"], {}
    release = nvcc_release(found["nvcc"])
    where = f"{found['nvcc']} (found by {found['how']})"
    if release is None:
        return False, f"{where} does not run `--version`", {}
    if not _cudart(found["home"]):
        return False, f"{where}: no libcudart under {found['home']} (lib64, lib, targets/*/lib)", {}
    exports = {"CUDA_HOME": found["home"]}
    if torch_cuda is None:
        return False, f"nvcc {release} at {where}, but torch is a CPU build (torch.version.cuda is None)", exports
    if release.split(".")[0] != torch_cuda.split(".")[0]:
        return False, (f"nvcc {release} at {where}, but torch was built with CUDA {torch_cuda}: the majors differ "
                       "(setup.py would build the CPU kernels only)"), exports
    return True, f"nvcc {release} at {where}, CUDA_HOME={found['home']}, torch's CUDA {torch_cuda}", exports


def unpack_wheels(folder: str, site: str) -> list:
    """Unpack pure-Python wheels into ``site`` (what pip --target does for them, without pip); returns their names."""
    shutil.rmtree(site, ignore_errors=True)
    os.makedirs(site)
    names = []
    for wheel in sorted(glob.glob(os.path.join(folder, "*.whl"))):
        with zipfile.ZipFile(wheel) as z:
            for member in z.namelist():
                target = member
                parts = member.split("/")
                if parts[0].endswith(".data"):
                    if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                        continue  # scripts, headers, data: not needed to import
                    target = "/".join(parts[2:])
                if target.endswith("/"):
                    continue
                path = os.path.join(site, target)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with z.open(member) as src, open(path, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        names.append(os.path.basename(wheel))
    return names


class Checks:
    def __init__(self):
        self.rows = []

    def add(self, name: str, ok: bool, detail: str, fatal: bool = True) -> None:
        self.rows.append({"name": name, "ok": ok, "fatal": fatal and not ok, "detail": detail})
        mark = "ok" if ok else ("FAILED" if fatal else "note")
        print(f"preflight {name}: {mark}: {detail}", flush=True)

    @property
    def reason(self) -> str | None:
        failed = [r for r in self.rows if r["fatal"]]
        return f"{failed[0]['name']}: {failed[0]['detail']}" if failed else None


def _collect(env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pytest", "tests", "-m", "cuda", "--collect-only", "-q", "-p", "no:cacheprovider"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _collect_result(proc: subprocess.Popen, timeout: float) -> tuple[bool, str]:
    try:
        out, _ = proc.communicate(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return False, f"`pytest -m cuda --collect-only` did not finish in {timeout:.0f} s"
    lines = out.splitlines()
    errors = [line[6:] for line in lines if line.startswith("ERROR ")]
    m = re.search(r"(\d+)(?:/(\d+))? tests? collected(?: \((\d+) deselected\))?", out)
    if proc.returncode not in (0, 5) or errors:
        # "ERROR tests/test_x.py" names the module; the first "E   ..." line says why
        why = next((line[1:].strip() for line in lines if line.startswith("E ")), "")
        first = errors[0] if errors else (lines or ["(no output)"])[-1]
        return False, f"test collection failed (pytest exit {proc.returncode}): {first}{': ' + why if why else ''}"[:400]
    if not m:
        return False, "test collection: no count in pytest's output: " + (out.strip().splitlines() or [""])[-1]
    selected, total = m.group(1), m.group(2) or m.group(1)
    return True, f"{selected} tests marked cuda of {total} (`pytest -m cuda`)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("full", "dry"), default="full")
    parser.add_argument("--work", required=True, help="folder for preflight.json, preflight.env, machine.txt")
    parser.add_argument("--budget", type=float, default=30.0, help="seconds the test collection may take at most")
    args = parser.parse_args(argv)
    full = args.mode == "full"
    t0 = time.monotonic()
    os.makedirs(args.work, exist_ok=True)
    checks = Checks()
    exports = {}

    # the wheels first: the test collection (a subprocess, beside the checks below) imports them
    wheel_folder = os.path.join(ROOT, ".whl")
    if full and glob.glob(os.path.join(wheel_folder, "*.whl")):
        names = unpack_wheels(wheel_folder, SITE)
        checks.add("wheels", True, f"unpacked {', '.join(names)} into {SITE}")
        sys.path.insert(0, SITE)
        exports["PYTHONPATH"] = SITE + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH")
                                        else "")
    elif full:
        checks.add("wheels", True, "no ./.whl (make gpu-wheels, carry .whl): the test modules must come with the "
                                   "machine's image", fatal=False)
    env = dict(os.environ, RIM_FAST_NO_EXT="1", **exports)
    collect = _collect(env)

    try:
        import torch
        checks.add("torch", True, f"torch {torch.__version__}, CUDA {torch.version.cuda}")
        torch_cuda = torch.version.cuda
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            names = [f"{torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
                     for i in range(torch.cuda.device_count())]
            checks.add("gpu", True, ", ".join(names))
        else:
            checks.add("gpu", False, f"no CUDA GPU visible to torch {torch.__version__} (torch.cuda.is_available() is "
                                     f"False; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})",
                       fatal=full)
    except Exception as err:  # noqa: BLE001
        checks.add("torch", False, f"torch does not import: {type(err).__name__}: {err}")
        torch_cuda = None

    ok, detail, cuda_exports = check_nvcc(torch_cuda)
    checks.add("nvcc", ok, detail, fatal=full)
    exports.update(cuda_exports)

    include = sysconfig.get_paths()["include"]
    header = os.path.join(include, "Python.h")
    checks.add("python.h", os.path.isfile(header), header if os.path.isfile(header) else
               f"no Python.h in {include} (sysconfig include folder): install the Python headers (python3-dev)")

    modules = [m.strip() for m in os.environ.get("RIM_FAST_PREFLIGHT_MODULES", ",".join(DEFAULT_MODULES)).split(",")
               if m.strip()]
    for name in modules:
        try:
            module = importlib.import_module(name)
            checks.add(f"import {name}", True, getattr(module, "__file__", "") or "")
        except Exception as err:  # noqa: BLE001
            hint = " (make gpu-wheels, and carry .whl)" if full else ""
            checks.add(f"import {name}", False, f"test module {name} does not import: {type(err).__name__}: "
                                                f"{str(err).splitlines()[0] if str(err) else ''}{hint}")
    os.environ["RIM_FAST_NO_EXT"] = "1"  # the extension is not built yet
    try:
        import rim_fast
        checks.add("import rim_fast", True, rim_fast.__file__)
    except Exception as err:  # noqa: BLE001
        checks.add("import rim_fast", False, f"rim_fast does not import: {type(err).__name__}: {err}")
    try:
        import pytest
        try:
            import xdist
            workers = f"pytest-xdist {xdist.__version__}"
        except ImportError:
            workers = "no pytest-xdist (the tests run in one process)"
        checks.add("pytest", True, f"pytest {pytest.__version__}, {workers}")
    except ImportError:
        checks.add("pytest", False, "pytest does not import")
    try:
        import setuptools
        major = int(setuptools.__version__.split(".")[0])
        checks.add("setuptools", major >= 77, f"setuptools {setuptools.__version__}" + (
            "" if major >= 77 else ": pyproject.toml's PEP 639 license needs >= 77, setup.py stops the build "
                                   "(pip install -U 'setuptools>=77')"),
            fatal=False)
    except Exception as err:  # noqa: BLE001
        checks.add("setuptools", False, f"setuptools does not import: {err}", fatal=False)
    try:
        from torch.utils.cpp_extension import is_ninja_available
        checks.add("ninja", is_ninja_available(), "ninja found" if is_ninja_available() else
                   "no ninja: the build compiles one file at a time, slower", fatal=False)
    except Exception as err:  # noqa: BLE001
        checks.add("ninja", False, f"cannot ask torch for ninja: {err}", fatal=False)

    if checks.reason:
        collect.kill()
        collect.communicate()
    else:
        ok, detail = _collect_result(collect, args.budget - (time.monotonic() - t0) - 2)
        # out of time on a cold disk is not a broken suite: the tests stage collects again and reports its errors
        checks.add("collect", ok, detail, fatal="did not finish" not in detail)

    machine = "machine: unknown (torch did not import)"
    try:
        sys.path.insert(0, ROOT)
        from bench.common import machine_line
        machine = machine_line()
    except Exception as err:  # noqa: BLE001
        machine = f"machine: unknown ({type(err).__name__}: {err})"
    with open(os.path.join(args.work, "machine.txt"), "w") as f:
        f.write(machine + "\n")
    with open(os.path.join(args.work, "preflight.env"), "w") as f:
        f.writelines(f"export {k}={shlex.quote(v)}\n" for k, v in exports.items())
    seconds = time.monotonic() - t0
    result = {"mode": args.mode, "ok": checks.reason is None, "reason": checks.reason, "seconds": seconds,
              "checks": checks.rows, "exports": exports}
    with open(os.path.join(args.work, "preflight.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"preflight: ok ({seconds:.1f} s)" if checks.reason is None else f"preflight: FAILED: {checks.reason}",
          flush=True)
    return 0 if checks.reason is None else 1


if __name__ == "__main__":
    sys.exit(main())
