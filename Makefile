# The two README commands: `make demo` (main job, built-in default) and
# `make test` (everything CI checks). Both start from nothing: they create
# .venv, install the pinned requirements, and build fastvlm._C.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.fastvlm-built
CSRC := $(shell find csrc -type f 2>/dev/null) setup.py pyproject.toml
CMAKE_BUILD ?= build-cmake
JOBS ?= 2

.PHONY: venv build lint ctest pytest test demo bench gpu-check clean

venv: $(DEPS_STAMP)
$(DEPS_STAMP): requirements/test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements/test.txt
	touch $@

# Editable install: compiles fastvlm._C (CUDA kernels too when nvcc and a CUDA torch exist).
build: $(BUILD_STAMP)
$(BUILD_STAMP): $(DEPS_STAMP) $(CSRC)
	MAX_JOBS=$(JOBS) $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# The same csrc/ built standalone by CMake; ctest runs the C++ (and, with a GPU, CUDA) tests.
ctest: $(DEPS_STAMP)
	cmake -S . -B $(CMAKE_BUILD) -DCMAKE_BUILD_TYPE=Release
	cmake --build $(CMAKE_BUILD) -j $(JOBS)
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure

# ruff's rules and line length live in pyproject.toml.
lint: $(DEPS_STAMP)
	$(VENV)/bin/ruff check .

# One pytest worker per core, a test file to one worker (its module fixtures built once),
# the longest files first (tests/conftest.py orders them by tests/file_seconds.json).
PYTEST_WORKERS ?= auto
pytest: build
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

test: build lint ctest pytest

demo: build
	$(PY) -m fastvlm demo

bench: build
	$(PY) benchmarks/bench_layout.py

clean:
	rm -rf $(VENV) build $(CMAKE_BUILD) fastvlm/_C*.so *.egg-info

# On a GPU machine, in 8 minutes (480 s budget, step caps summing to 420 s, 440 s with carried
# wheels): the attention headline first (each row written to GPU_CHECK_OUT as measured), then
# info, the build for this GPU's arch (the editable install), `pytest -m gpu` (no -x, 60 s per
# test), the other benchmarks; at most 7 files under GPU_CHECK_OUT, summary.md rewritten after
# every step (see benchmarks/gpu_check.py; `--dry-run` rehearses it on CPU). It needs no
# install beforehand and no network. A copy without .git: pass FASTVLM_COMMIT=<sha>.
GPU_CHECK_OUT ?= benchmarks/results/_local/gpu_check
FASTVLM_COMMIT ?= $(shell git rev-parse --short HEAD 2>/dev/null)
gpu-check:
	FASTVLM_COMMIT=$(FASTVLM_COMMIT) python3 benchmarks/gpu_check.py --out $(GPU_CHECK_OUT)
