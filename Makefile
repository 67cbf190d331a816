# Two commands on a fresh machine: `make demo` and `make test` (both create .venv when missing);
# `make test-fast` is the unit loop (no process launches, under a minute); `make lint` is what CI runs
# before the tests (ruff, ruff format, the import layering of tests/layering.py).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned to the build this machine serves from local disk; elsewhere `pip install -e .`
# takes any torch >= 2.4 (see pyproject.toml).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install lint demo test test-fast bench gpu-check clean

$(VENV)/.installed: pyproject.toml setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e ".[recipes,dev,ft]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m tests.layering

test: install
	$(PY) -m pytest -q --durations=15

test-fast: install
	$(PY) -m pytest -q -m "not launches"

demo: install
	$(PY) -m recipes.demo

# Where a CUDA GPU exists: every algorithm x wire x overlap x front end on the GPU against the CPU, peak
# memory, quantization throughput; writes docs/results/gpu.md. Elsewhere it says so and exits 2.
gpu-check: install
	$(PY) -m benchmarks.gpu_check

bench: install
	$(PY) -m benchmarks.step_time

clean:
	rm -rf $(VENV) .pytest_cache lightning_logs
