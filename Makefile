# Each target creates .venv on first use and installs what it needs, so a fresh
# clone needs nothing beyond python3 (>= 3.10) and network access to PyPI.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# pytest workers; the suite is sized for a 2-core machine.
TEST_WORKERS ?= 2
DEMO_DIR ?= demo_output

.PHONY: demo test test-fast bench clean venv

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[cpu,test,demo]"
	touch $@

venv: $(VENV)/.installed

# Trains ResNet-20 V2 on scikit-learn's bundled digits with operator-norm
# clipping, then analyses the result (offline, a few minutes on 2 cores).
demo: $(VENV)/.installed
	$(PY) demo.py --output_dir=$(DEMO_DIR)

test: $(VENV)/.installed
	$(PY) -m pytest -n $(TEST_WORKERS) tests

# Skips the tests marked slow.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -n $(TEST_WORKERS) -m "not slow" tests

bench: $(VENV)/.installed
	$(PY) -m benchmarks.run --json benchmarks/results.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
