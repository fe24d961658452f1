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

# the first Python $(1) (a version: 3.12) on PATH or among pyenv's, else $(PYTHON)
find_python = $(or $(shell for p in python$(1) $$(pyenv root 2>/dev/null)/versions/$(1).*/bin/python3; do \
	"$$p" -c "import sys; assert '%d.%d' % sys.version_info[:2] == '$(1)'" 2>/dev/null && echo "$$p" && break; \
	done),$(PYTHON))

# the oldest torch we support (setup.py: torch>=2.6), tested on a copy of the tracked files in build/floor, under
# the oldest Python we support (pyproject.toml: >=3.10) where this machine has one
FLOOR_TORCH ?= torch==2.6.0
FLOOR_PYTHON ?= $(call find_python,3.10)
FLOOR_VENV ?= .venv-floor
FLOOR_PY := $(abspath $(FLOOR_VENV))/bin/python
FLOOR_DIR ?= build/floor

# the torch and Triton of our GPU machines (bench/gpu_check.sh), tested on the CPU the same way in build/gpustack,
# under their Python (3.12) where this machine has one (on PATH, or pyenv's), else under $(PYTHON)
STACK_SPEC ?= torch==2.11.0 triton==3.6.0
STACK_PYTHON ?= $(call find_python,3.12)
STACK_VENV ?= .venv-gpustack
STACK_PY := $(abspath $(STACK_VENV))/bin/python
STACK_DIR ?= build/gpustack

.PHONY: setup build demo demo-train examples test test-floor test-gpu-stack fresh-install bench bench-short bench-smoke gpu-check gpu-wheels clean

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)" numpy tqdm ninja pybind11 torch-ema
	touch $@

$(VENV)/.installed: $(VENV)/.torch setup.py pyproject.toml $(wildcard csrc/*)
	$(PY) -m pip install -q "torch-rim==0.2.9" pytest pytest-benchmark hypothesis expecttest matplotlib scikit-image tensorboard
	$(PY) -m pip install -v --no-build-isolation --no-deps -e . > build.log 2>&1 || (tail -60 build.log; exit 1)
	@grep -m1 -E "^ *rim_fast: building" build.log | sed "s/^ *//" | grep . || echo "(no extension step in build.log)"
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

# a virtual environment for another torch: $(1) its folder, $(2) its python, $(3) the torch (and Triton) specs,
# $(4) the Python that makes it
define other_torch_venv
	$(4) -m venv $(1)
	$(2) -m pip install -q --upgrade pip setuptools wheel
	$(2) -m pip install -q $(3) numpy tqdm ninja pybind11 torch-ema "torch-rim==0.2.9" \
		pytest pytest-benchmark pytest-xdist hypothesis expecttest matplotlib
	touch $(1)/.torch
endef

# the whole suite on another torch, from a copy of the tracked files so that the extension built for it does not
# replace the one of .venv: $(1) the copy's folder, $(2) its python, $(3) a label; the CUDA build is skipped when
# nvcc's major version is not torch's (setup.py)
define suite_on_copy
	rm -rf $(1) && mkdir -p $(1)
	git ls-files -z | xargs -0 cp --parents -t $(1)
	cd $(1) && $(2) setup.py build_ext --inplace > build.log 2>&1 || (tail -40 build.log; exit 1)
	@grep -m2 "^rim_fast:" $(1)/build.log
	cd $(1) && $(2) -c "import sys, torch, triton; print('$(3): torch', torch.__version__, '| triton', \
		triton.__version__, '| python', sys.version.split()[0])"
	cd $(1) && $(2) -m pytest tests -q -rsfE -n 2 -p no:cacheprovider
endef

$(FLOOR_VENV)/.torch:
	$(call other_torch_venv,$(FLOOR_VENV),$(FLOOR_PY),"$(FLOOR_TORCH)",$(FLOOR_PYTHON))

# the whole suite on the floor torch (with its own Triton)
test-floor: $(FLOOR_VENV)/.torch
	$(call suite_on_copy,$(FLOOR_DIR),$(FLOOR_PY),floor)

$(STACK_VENV)/.torch:
	$(call other_torch_venv,$(STACK_VENV),$(STACK_PY),$(STACK_SPEC),$(STACK_PYTHON))

# the whole suite on the GPU machines' torch and Triton (on the CPU: the Triton interpreter, the extension's CPU
# kernels, Triton's compiler for the cubin test), a few days before a GPU run meets them
test-gpu-stack: $(STACK_VENV)/.torch
	$(call suite_on_copy,$(STACK_DIR),$(STACK_PY),gpu stack)

clean:
	rm -rf build *.egg-info rim_fast/_C*.so $(VENV) $(FLOOR_VENV) $(STACK_VENV)
