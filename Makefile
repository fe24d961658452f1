# rim_fast, the developers' shortcut: `make demo` (set up, then the pretrained demo RIM in seconds) and `make test`.
# Works from nothing on Python 3.11: creates .venv, installs torch and the package (building the C++/CUDA
# extension when nvcc is found; a failed build stops here: RIM_FAST_REQUIRE_EXT=1), then runs. Override TORCH_SPEC
# to bring another torch (>= 2.6). Users install with pip instead (README, Install).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
export CUDA_HOME ?= /usr/local/cuda
export MAX_JOBS ?= 2
# a developer's build must not fall back to the references silently (pip install . does, with a note)
export RIM_FAST_REQUIRE_EXT ?= 1

# the oldest torch we support (setup.py: torch>=2.6), tested on a copy of the tracked files in build/floor
FLOOR_TORCH ?= torch==2.6.0
FLOOR_VENV ?= .venv-floor
FLOOR_PY := $(abspath $(FLOOR_VENV))/bin/python
FLOOR_DIR ?= build/floor

.PHONY: setup build demo demo-train examples test test-floor fresh-install bench bench-short bench-smoke gpu-check gpu-wheels clean

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)" numpy tqdm ninja pybind11 torch-ema
	touch $@

$(VENV)/.installed: $(VENV)/.torch setup.py pyproject.toml $(wildcard csrc/*)
	$(PY) -m pip install -q "torch-rim==0.2.9" pytest pytest-benchmark hypothesis expecttest matplotlib scikit-image tensorboard
	$(PY) -m pip install -v --no-build-isolation --no-deps -e . > build.log 2>&1 || (tail -60 build.log; exit 1)
	@grep -m1 "^rim_fast: building" build.log || echo "(no extension step in build.log)"
	$(PY) -m rim_fast.info --short
	touch $@

setup: $(VENV)/.installed

# the pretrained demo RIM: seconds on any machine; demo-train trains one from scratch for a minute instead
demo: setup
	$(PY) -m rim_fast.demo

demo-train: setup
	$(PY) -m rim_fast.demo --train 60

# the worked examples (MRI, astronomy, 1D spectra), a few minutes each on a CPU; figures into examples/figures
examples: setup
	$(PY) examples/spectra_1d.py
	$(PY) examples/mri.py
	$(PY) examples/astronomy.py

bench: setup
	$(PY) -m bench.run --device cpu --out bench/results/cpu-full

bench-short: setup
	$(PY) -m bench.run --device cpu --preset short --out bench/results/cpu-short

bench-smoke: setup
	RIM_FAST_BENCH_SMOKE=1 $(PY) -m pytest tests/test_bench_smoke.py -q

gpu-check: setup
	bash bench/gpu_check.sh bench/results/gpu-check

# the test dependencies a GPU machine without network lacks (its image has torch, triton, pytest, xdist, ...):
# pure-Python wheels into ./.whl, which bench/gpu_check.sh installs from; copy the folder along with the tree
GPU_WHEELS ?= torch-rim==0.2.9 score_models==0.5.11 torch_ema==0.3 expecttest==0.3.0
gpu-wheels:
	rm -rf .whl && $(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	ls .whl

# -rsfE: the reasons of skips, then failures and errors, last (CI shows the tail of the log)
test: setup
	$(PY) -m pytest tests -q -rsfE

# a user's pip install in a fresh virtual environment holding only a torch (see .ci/fresh_install.sh)
fresh-install:
	bash .ci/fresh_install.sh

$(FLOOR_VENV)/.torch:
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_PY) -m pip install -q --upgrade pip setuptools wheel
	$(FLOOR_PY) -m pip install -q "$(FLOOR_TORCH)" numpy tqdm ninja pybind11 torch-ema "torch-rim==0.2.9" \
		pytest pytest-benchmark pytest-xdist hypothesis expecttest matplotlib
	touch $@

# the whole suite on the floor torch (with its own Triton), from a copy so that the extension built for it does
# not replace the one of .venv; its CUDA build is skipped when nvcc's major version is not torch's (setup.py)
test-floor: $(FLOOR_VENV)/.torch
	rm -rf $(FLOOR_DIR) && mkdir -p $(FLOOR_DIR)
	git ls-files -z | xargs -0 cp --parents -t $(FLOOR_DIR)
	cd $(FLOOR_DIR) && $(FLOOR_PY) setup.py build_ext --inplace > build.log 2>&1 || (tail -40 build.log; exit 1)
	@grep -m2 "^rim_fast:" $(FLOOR_DIR)/build.log
	cd $(FLOOR_DIR) && $(FLOOR_PY) -c "import torch, triton; print('floor: torch', torch.__version__, '| triton', triton.__version__)"
	cd $(FLOOR_DIR) && $(FLOOR_PY) -m pytest tests -q -rsfE -n 2 -p no:cacheprovider

clean:
	rm -rf build *.egg-info rim_fast/_C*.so $(VENV) $(FLOOR_VENV)
