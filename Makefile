# Each target creates .venv on first use and installs what it needs, so a fresh
# clone needs nothing beyond python3 (>= 3.10) and network access to PyPI.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# pytest workers; the suite is sized for a 2-core machine.
TEST_WORKERS ?= 2
DEMO_DIR ?= demo_output
# The oldest supported pair (tfconvnorm/_compat.py), in a venv of its own.
OLDEST_VENV ?= .venv-oldest
OLDEST_PINS := tensorflow-cpu==2.16.2 keras==3.0.5

.PHONY: demo test test-slow test-all test-oldest bench clean venv

# Keras' JAX and PyTorch backends, for tests/test_backends.py: PyTorch pinned to
# a CPU build (a bare `torch` pulls a multi-GB CUDA one).
BACKEND_PINS := jax jaxlib torch==2.13.0

$(VENV)/.installed: setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[cpu,test,demo]" $(BACKEND_PINS)
	touch $@

venv: $(VENV)/.installed

# Trains ResNet-20 V2 on scikit-learn's bundled digits with operator-norm
# clipping, then analyses the result (offline, a few minutes on 2 cores).
demo: $(VENV)/.installed
	$(PY) demo.py --output_dir=$(DEMO_DIR)

# The suite without the tests marked slow (about 5 minutes on 2 cores): every
# numerical oracle, every public function, a training run and the analyser end to end.
# worksteal: idle workers take queued tests, so one long test does not hold up
# the end of the run.
test: $(VENV)/.installed
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal -m "not slow" tests

# The tests marked slow: the other Keras backends, multi-worker and mirrored
# training, pip install, the demo, more training runs (CI runs both tiers).
test-slow: $(VENV)/.installed
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal -m slow tests

# Both tiers in one run.
test-all: $(VENV)/.installed
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal tests

# The smoke set (tests/test_smoke.py) on the oldest supported TensorFlow + Keras.
$(OLDEST_VENV)/.installed: setup.py Makefile
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(OLDEST_VENV)/bin/python -m pip install --quiet -e ".[test]" $(OLDEST_PINS)
	touch $@

test-oldest: $(OLDEST_VENV)/.installed
	$(OLDEST_VENV)/bin/python -m pytest -n $(TEST_WORKERS) -p no:cacheprovider tests/test_smoke.py

bench: $(VENV)/.installed
	$(PY) -m benchmarks.run --json benchmarks/results.json

clean:
	rm -rf $(VENV) $(OLDEST_VENV) build *.egg-info .pytest_cache
