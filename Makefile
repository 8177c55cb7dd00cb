# One virtual environment for everything; created and filled on first use, refreshed when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
# Test files run this many at a time (pytest-xdist; one file's tests stay in one worker, sharing its fixtures).
TEST_WORKERS ?= 2

.PHONY: demo test bench install clean-demo

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,hf]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m common.train --config=common/configs/dense_tiny.py --workdir=$(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile tests

bench: $(STAMP)
	$(PY) -m bench.train_throughput
