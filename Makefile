# rim_fast: `make demo` (set up, train the demo, run the short CPU benchmark) and `make test`.
# Works from nothing on Python 3.11: creates .venv, installs torch and the package (building the C++/CUDA
# extension when nvcc is found), then runs. Override TORCH_SPEC to bring another torch (>= 2.6).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
export CUDA_HOME ?= /usr/local/cuda
export TORCH_CUDA_ARCH_LIST ?= 9.0
export MAX_JOBS ?= 2

.PHONY: setup build demo test bench bench-smoke gpu-check clean

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)" numpy tqdm ninja pybind11 torch-ema
	touch $@

$(VENV)/.installed: $(VENV)/.torch setup.py $(wildcard csrc/*)
	$(PY) -m pip install -q "torch-rim==0.2.9" pytest pytest-benchmark hypothesis expecttest matplotlib
	$(PY) -m pip install -v --no-build-isolation --no-deps -e . > build.log 2>&1 || (tail -60 build.log; exit 1)
	@grep -m3 -E "nvcc .*sm_90" build.log || echo "(no nvcc step in build.log: C++-only or no extension)"
	$(PY) -c "import rim_fast; from rim_fast import _ext; m = _ext.module(); print('rim_fast:', rim_fast.__file__, '| rim_fast._C:', m.__file__ if m else _ext.missing(), '| CUDA kernels built:', _ext.built_with_cuda())"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m rim_fast.demo --seconds 60
	$(PY) -m bench.run --device cpu --preset short --out bench/results/cpu-short

bench: setup
	$(PY) -m bench.run --device cpu --out bench/results/cpu-full

bench-smoke: setup
	RIM_FAST_BENCH_SMOKE=1 $(PY) -m pytest tests/test_bench_smoke.py -q

gpu-check: setup
	bash bench/gpu_check.sh bench/results/gpu-check

test: setup
	$(PY) -m pytest tests -q -rs

clean:
	rm -rf build *.egg-info rim_fast/_C*.so $(VENV)
