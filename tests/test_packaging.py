"""Packaging: the metadata in pyproject.toml (one version, in rim_fast/__init__.py), a failed extension build that
installs the package without the extension and says why, and the optional dependencies' clear errors. The fresh
virtual-environment installs (pip install ., --no-build-isolation, pip wheel) run in CI: .ci/fresh_install.sh."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import rim_fast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_metadata_in_pyproject_and_one_version():
    meta = _pyproject()
    project = meta["project"]
    assert project["name"] == "rim-fast" and project["requires-python"] == ">=3.10"
    assert "torch>=2.6" in project["dependencies"]
    assert project["dynamic"] == ["version"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "rim_fast.__version__"}
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    extras = project["optional-dependencies"]
    assert {"train", "tensorboard", "test", "bench"} <= set(extras)
    assert {"tqdm", "torch-ema", "matplotlib"} <= set(extras["train"])
    assert {"torch-rim==0.2.9", "pytest", "pytest-benchmark", "hypothesis", "expecttest", "matplotlib",
            "scikit-image", "tensorboard"} <= set(extras["test"])
    # the version is written once: rim_fast/__init__.py (setup.py and pyproject.toml read it)
    with open(os.path.join(ROOT, "setup.py")) as f:
        assert not re.search(r"version\s*=", f.read())
    assert re.fullmatch(r"\d+\.\d+\.\d+", rim_fast.__version__)
    assert meta["tool"]["setuptools"]["package-dir"]["rim_fast.kernels"] == "kernels"


def test_license_carries_the_upstream_notices():
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert text.startswith("MIT License")
    assert "torch_rim" in text and "score_models" in text
    assert text.count("Copyright (c) 2023 Alexandre Adam") == 2


def _copy_sources(dest):
    for name in ("setup.py", "pyproject.toml", "LICENSE", "README.md"):
        shutil.copy(os.path.join(ROOT, name), dest)
    for folder in ("rim_fast", "kernels", "csrc"):
        shutil.copytree(os.path.join(ROOT, folder), os.path.join(dest, folder),
                        ignore=shutil.ignore_patterns("*.so", "__pycache__", "_C_BUILD_ERROR.txt", "pretrained"))


def test_a_failed_extension_build_installs_the_package_and_says_why(tmp_path):
    """A compiler error (an unknown flag, RIM_FAST_BREAK_BUILD=1) does not fail the build; the package imports,
    runs the references, and rim_fast.info gives the reason. RIM_FAST_REQUIRE_EXT=1 (make) fails it instead."""
    _copy_sources(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RIM_FAST_")}
    env.update(RIM_FAST_NO_CUDA="1", RIM_FAST_BREAK_BUILD="1", MAX_JOBS="2")
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--inplace"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rim_fast: WARNING: the C++/CUDA extension failed to build" in proc.stdout
    assert not list((tmp_path / "rim_fast").glob("_C*.so"))
    note = (tmp_path / "rim_fast" / "_C_BUILD_ERROR.txt").read_text()
    assert "failed to build" in note
    # without the checkout's editable-install finder, which would map rim_fast._C to the checkout's build
    probe = ("import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
             "import warnings; warnings.simplefilter('ignore'); import torch, rim_fast; from rim_fast import _ext, "
             "info; print(_ext.missing()); print(info.format_short(info.collect(with_ops=False)))")
    run_env = {k: v for k, v in env.items() if k not in ("RIM_FAST_BREAK_BUILD",)}
    run_env["PYTHONPATH"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=run_env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "rim_fast._C was not installed: the C++/CUDA extension failed to build" in out.stdout
    assert str(tmp_path) in out.stdout  # the copy, not the checkout, was imported

    env["RIM_FAST_REQUIRE_EXT"] = "1"
    strict = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert strict.returncode != 0


@pytest.mark.parametrize("version", ["65.5.0", "76.1.0"])
def test_an_old_setuptools_gets_one_line_naming_the_version(tmp_path, version):
    """``--no-build-isolation`` builds with the environment's setuptools: Python 3.11's venv brings 65.5, whose
    pyproject validation fails on the PEP 639 license with a page-long schema dump. setup.py stops first with
    one line. (The setuptools here is new; its version string is what the check reads.)"""
    _copy_sources(tmp_path)
    probe = (f"import runpy, sys, setuptools; setuptools.__version__ = {version!r}; "
             f"sys.argv = ['setup.py', '--version']; runpy.run_path('setup.py', run_name='__main__')")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RIM_FAST_")}
    env["RIM_FAST_NO_EXT"] = "1"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "needs setuptools >= 77" in proc.stderr and f"has {version}" in proc.stderr, proc.stderr[-2000:]
    assert "OFFENDING RULE" not in proc.stderr and "Traceback" not in proc.stderr
    # the same call with the real version prints the package's version
    real = probe.replace(f"setuptools.__version__ = {version!r}; ", "")
    ok = subprocess.run([sys.executable, "-c", real], cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0 and ok.stdout.strip().splitlines()[-1] == rim_fast.__version__, ok.stderr[-2000:]


def test_ema_without_torch_ema_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_ema", None)  # import torch_ema raises ImportError
    net = rim_fast.Hourglass(1, dimensions=1, nf=4, ch_mult=(1,), hidden_units=4)
    rim = rim_fast.RIM((8,), net, score_fn=lambda x, y: y - x, T=2, device="cpu")
    data = torch.utils.data.TensorDataset(torch.randn(2, 1, 8), torch.randn(2, 1, 8))
    with pytest.raises(ImportError, match=r"ema_decay=0.5 needs the torch-ema package: pip install torch-ema"):
        rim.fit(data, epochs=1, ema_decay=0.5)
