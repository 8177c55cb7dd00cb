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

# The design's main job in miniature (blt/README.md): BLT's entropy model, then a BLT patched by it. A rerun resumes.
demo: $(STAMP)
	$(PY) -m blt.train_entropy --config=blt/configs/entropy_tiny.py --workdir=$(DEMO_DIR)/entropy_model
	$(PY) -m blt.train --config=blt/configs/tiny.py:patcher=entropy,entropy_model=$(DEMO_DIR)/entropy_model \
	  --workdir=$(DEMO_DIR)/blt

test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile tests

bench: $(STAMP)
	$(PY) -m bench.train_throughput
