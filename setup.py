"""rim_fast build: the C++/CUDA extension rim_fast._C (built by torch's BuildExtension, with ninja when installed;
see csrc/). The package's metadata, its Python packages and the Triton kernels (installed as rim_fast.kernels) are
declared in pyproject.toml.

    pip install --no-build-isolation .      # in an environment with torch: the package and the extension
    pip install .                           # pip's isolated build has no torch: the pure-Python package

The extension is built against the torch of the build environment, which must be the one it runs with. A build
that fails (no compiler, a compiler error) does not abort the install: the package installs without the extension,
runs the PyTorch references, and ``python -m rim_fast.info`` says why (the note ``rim_fast/_C_BUILD_ERROR.txt``).
``RIM_FAST_REQUIRE_EXT=1`` makes such a failure fail the install instead (``make`` sets it).

The extension is a CUDAExtension when torch is a CUDA build and nvcc is found, else a CppExtension:
- ``RIM_FAST_NO_EXT=1``   build no extension (rim_fast then runs its pure-PyTorch references);
- ``RIM_FAST_NO_CUDA=1``  build the CPU kernels only;
- ``CUDA_HOME``           the CUDA toolkit (e.g. /usr/local/cuda); when unset, torch's guess is used if it holds
                          the CUDA headers, else /usr/local/cuda;
- ``TORCH_CUDA_ARCH_LIST`` the GPU architectures (e.g. "8.0;9.0+PTX"); when unset: the visible GPUs'
                          capabilities (torch's rule), or, with no GPU visible (a cluster's login node, CI),
                          ``DEFAULT_CUDA_ARCH_LIST``: A100, A10/RTX 30, L4/L40/RTX 40, H100/H200, with PTX for
                          newer GPUs (those the nvcc at hand cannot target are left out).

The arch list built is recorded in the extension (``rim_fast._C.CUDA_ARCHS``, with ``CUDA_VERSION``), so that
at run time a GPU with no matching image or PTX takes the references with one warning instead of failing with
"no kernel image is available" (``rim_fast._ext``; ``python -m rim_fast.info`` shows it).

- ``RIM_FAST_BREAK_BUILD=1``  (tests) pass the compiler an unknown flag, so that the build fails.

In-place build (the .so lands in rim_fast/, importable from the source tree):
    CUDA_HOME=/usr/local/cuda python setup.py build_ext --inplace
or, for an editable install, pip install --no-build-isolation -e .
"""
import glob
import os
import shutil
import sys

import setuptools
from setuptools import setup
from setuptools.command.build_py import build_py

#: pyproject.toml's ``license = "MIT"`` (PEP 639) needs it; an older setuptools fails with a page-long
#: schema error that never names the version (``--no-build-isolation`` builds with the environment's own)
MIN_SETUPTOOLS = 77


def _check_setuptools(version: str) -> None:
    try:
        major = int(version.split(".")[0])
    except ValueError:
        return  # an unusual version string: let setuptools itself decide
    if major < MIN_SETUPTOOLS:
        sys.exit(f"rim_fast: building needs setuptools >= {MIN_SETUPTOOLS} (pyproject.toml's PEP 639 license), "
                 f"this environment has {version}: pip install -U 'setuptools>={MIN_SETUPTOOLS}'")


_check_setuptools(setuptools.__version__)

#: written beside rim_fast/__init__.py when the package installs without its extension; rim_fast._ext reads it
BUILD_NOTE = "_C_BUILD_ERROR.txt"

ext_modules = []
cmdclass = {}

#: GPUs targeted when none is visible: sm_80 (A100, A30), sm_86 (A10, A40, RTX 30xx), sm_89 (L4, L40, RTX 40xx),
#: sm_90 (H100, H200, GH200), and compute_90 PTX that the driver compiles for newer GPUs (Blackwell, ...)
DEFAULT_CUDA_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"


def _has_cuda_headers(home):
    return bool(home) and os.path.exists(os.path.join(home, "include", "cuda_runtime.h"))


def _choose_cuda_home():
    """Set CUDA_HOME before torch.utils.cpp_extension reads it: torch guesses the parent of `which nvcc`
    (/usr/local for /usr/local/bin/nvcc), which may have no CUDA headers or libraries."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None
    if not _has_cuda_headers(guess):
        candidates = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
        for home in candidates:
            if _has_cuda_headers(home) and os.path.exists(os.path.join(home, "bin", "nvcc")):
                os.environ["CUDA_HOME"] = home
                return


def _nvcc_release(cuda_home):
    """'13.0' from `nvcc --version` ("Cuda compilation tools, release 13.0, V13.0.88"), None when unreadable."""
    import re
    import subprocess
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def _nvcc_archs(cuda_home):
    """The compute capabilities nvcc can target ({"80", "90", ...}), None when unreadable."""
    import re
    import subprocess
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--list-gpu-arch"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    archs = set(re.findall(r"compute_(\d+)", out))
    return archs or None


def _default_arch_list(cuda_home):
    """DEFAULT_CUDA_ARCH_LIST less the architectures this nvcc cannot target (an older CUDA 11)."""
    known = _nvcc_archs(cuda_home)
    if known is None:
        return DEFAULT_CUDA_ARCH_LIST
    kept = [a for a in DEFAULT_CUDA_ARCH_LIST.split(";") if a.split("+")[0].replace(".", "") in known]
    if kept and not kept[-1].endswith("+PTX"):
        kept[-1] += "+PTX"
    return ";".join(kept) or DEFAULT_CUDA_ARCH_LIST


def _cuda_arch_flags(torch, cpp_extension, cuda_home):
    """(nvcc -gencode flags, the archs they build: "sm_80", ..., "compute_90" for PTX). torch's own rule picks
    them (TORCH_CUDA_ARCH_LIST, else the visible GPUs); with neither, DEFAULT_CUDA_ARCH_LIST."""
    import re
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = _default_arch_list(cuda_home)
    flags = cpp_extension._get_cuda_arch_flags()
    codes = {code for flag in flags for code in re.findall(r",code=(\w+)", flag)}
    # sm_* first, then PTX, each by capability
    archs = sorted(codes, key=lambda c: (c.startswith("compute"), int(re.sub(r"\D", "", c)), c))
    return flags, archs


def _note_build_py(note: str):
    """A build_py that writes ``note`` (why there is no extension) into the built package."""
    class BuildPyWithNote(build_py):
        def run(self):
            super().run()
            if not self.editable_mode:
                path = os.path.join(self.build_lib, "rim_fast", BUILD_NOTE)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    f.write(note + "\n")
    return BuildPyWithNote


def _tolerant_build_ext(base):
    """torch's BuildExtension that, when compiling or linking fails, prints a warning and writes BUILD_NOTE where
    rim_fast._C would have gone (and into the source tree for an in-place build), instead of failing the install
    (unless RIM_FAST_REQUIRE_EXT=1); a successful build removes an earlier note."""
    class TolerantBuildExtension(base):
        def run(self):
            self._failure = None
            inplace = self.inplace
            super().run()
            notes = [os.path.join(self.build_lib, "rim_fast", BUILD_NOTE)]
            if inplace:
                notes.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "rim_fast", BUILD_NOTE))
            for path in notes:
                if self._failure is None:
                    if os.path.exists(path):
                        os.remove(path)
                    continue
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    f.write(self._failure + "\n")

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as exc:  # noqa: BLE001 - CompileError, LinkError, ninja's RuntimeError, ...
                if os.environ.get("RIM_FAST_REQUIRE_EXT") == "1":
                    raise
                why = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
                self._failure = (f"the C++/CUDA extension failed to build ({why}); reinstall with `pip install -v "
                                 f"--no-build-isolation .` to see the compiler's output")
                print(f"rim_fast: WARNING: {self._failure}. Installing without it: rim_fast runs the PyTorch "
                      f"references.")
                # nothing to copy in place or to install
                self.extensions = []
    return TolerantBuildExtension


def _extension():
    if os.environ.get("RIM_FAST_NO_EXT") == "1":
        return [], {"build_py": _note_build_py("built without the C++/CUDA extension (RIM_FAST_NO_EXT=1)")}
    try:
        import torch
    except ImportError:
        # no torch in the build environment (e.g. pip's build isolation): build the pure-Python package
        print("rim_fast: torch is not importable, building without the C++/CUDA extension "
              "(use pip install --no-build-isolation)")
        return [], {"build_py": _note_build_py(
            "built without the C++/CUDA extension: torch was not importable in the build environment (pip's "
            "build isolation); reinstall with `pip install --no-build-isolation .` where torch is installed")}
    _choose_cuda_home()
    from torch.utils import cpp_extension

    sources = ["csrc/update_step.cpp", "csrc/tanh.cpp", "csrc/shift.cpp", "csrc/winograd.cpp", "csrc/cpu_pool.cpp",
               "csrc/register.cpp"]
    if os.name == "nt":
        # MSVC: /fp:precise (the default) does not contract a*b+c into an FMA
        cxx_flags = ["/O2"]
    else:
        # -fno-math-errno lets the compiler vectorise sqrt (errno is never read), -fno-trapping-math compares into
        # selects (tanh.h; no FP exception is ever read); -ffp-contract=off keeps a*b+c two roundings (aarch64
        # would fuse it), as the reference and the CUDA kernel (-fmad=false) compute it
        cxx_flags = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
    if os.environ.get("RIM_FAST_BREAK_BUILD") == "1":
        cxx_flags.append("-frim-fast-no-such-flag")
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for splits the CPU kernels over threads only when compiled with OpenMP (ATen's
        # ParallelOpenMP.h); libgomp.so.1 resolves to the one torch has loaded already
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    cuda_home = cpp_extension.CUDA_HOME
    with_cuda = (os.environ.get("RIM_FAST_NO_CUDA") != "1" and torch.version.cuda is not None
                 and cuda_home is not None and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")))
    if with_cuda:
        nvcc = _nvcc_release(cuda_home)
        if nvcc is not None and nvcc.split(".")[0] != torch.version.cuda.split(".")[0]:
            # torch refuses to build against a toolkit of another major version; CUDA tensors then run the
            # pure-PyTorch references (rim_fast._ext.built_with_cuda() is False)
            print(f"rim_fast: WARNING: nvcc in {cuda_home} is CUDA {nvcc} but torch {torch.__version__} was built "
                  f"with CUDA {torch.version.cuda}; building rim_fast._C for the CPU only. Point CUDA_HOME at a "
                  f"CUDA {torch.version.cuda.split('.')[0]}.x toolkit for the CUDA kernels.")
            with_cuda = False
    if with_cuda:
        arch_flags, archs = _cuda_arch_flags(torch, cpp_extension, cuda_home)
        print(f"rim_fast: building rim_fast._C with CUDA (CUDA_HOME={cuda_home}, "
              f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '<visible GPUs>')}): {' '.join(archs)}")
        # -fmad=false: no a*b+c contracted into an FMA, so the CUDA kernels round as the CPU kernel and the
        # reference do (these kernels are memory-bound: the FMAs saved no time)
        # the arch list goes to the C++ compiler only (register.cpp records it): nvcc would split -D at commas
        ext = cpp_extension.CUDAExtension(
            "rim_fast._C", sources + ["csrc/cuda/update_step.cu"],
            define_macros=[("RIM_FAST_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags + [f"-DRIM_FAST_CUDA_ARCHS={','.join(archs)}"],
                                "nvcc": ["-O3", "-lineinfo", "-fmad=false", *arch_flags]},
            extra_link_args=link_flags)
    else:
        print("rim_fast: building rim_fast._C for the CPU only")
        ext = cpp_extension.CppExtension("rim_fast._C", sources, extra_compile_args={"cxx": cxx_flags},
                                         extra_link_args=link_flags)
    return [ext], {"build_ext": _tolerant_build_ext(cpp_extension.BuildExtension)}


ext_modules, cmdclass = _extension()

# name, version, dependencies, packages: pyproject.toml
setup(ext_modules=ext_modules, cmdclass=cmdclass)
