# The README's two commands: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup demo test test-fast lint format bench gpu-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch and torchvision come from this machine's local wheels (pip's constraints file)
	$(BIN)/pip install -q -e '.[ray,models,test,lint]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/dmlray demo

# two lanes at once (tests/conftest.py --lane): the tests that start Ray one after another, and
# all the others in a second process, whose report follows; the exit status is the worse of the two
test: setup
	@$(BIN)/python -m pytest -q -ra -p no:cacheprovider --durations=10 --lane=rest > .test-rest.log 2>&1 & rest=$$!; \
	$(BIN)/python -m pytest -q -ra --durations=25 --lane=ray; ray=$$?; \
	wait $$rest; other=$$?; echo "== the tests that do not start Ray"; cat .test-rest.log; \
	echo "== Ray lane exit $$ray, other lane exit $$other"; [ $$ray -eq 0 ] && [ $$other -eq 0 ]

# ruff (lint and format check) and mypy, configured in pyproject.toml; `make format` rewrites
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# skips the slow real-part tests (SeaweedFS, Ray clusters, Prometheus); CI runs them all
test-fast: setup
	$(BIN)/python -m pytest -q -ra -m "not slow"

bench: setup
	@for f in bench/bench_*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

# the GPU path measured once (numerics, loss speed, stream vs synthetic, SOP-size eval; < 8 min on one
# H200). Needs only torch/torchvision/numpy/pillow, so it runs with a machine's stock python3 where
# there is no .venv (no package registry there): `make gpu-check` or `PYTHONPATH=. python3 bench/gpu_check.py
# --out gpu-check-out`. `--smoke` runs every path at tiny sizes on a CPU (tests/test_gpu_check.py).
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	PYTHONPATH=. $(GPU_PYTHON) bench/gpu_check.py --out gpu-check-out

clean:
	rm -rf $(VENV) demo-out runs .pytest_cache gpu-check-out .test-rest.log
