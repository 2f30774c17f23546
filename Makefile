# Two entry points: `make demo` (trains the quickstart recipe) and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-gpu demo clean

# torch is installed first with its exact pin: that resolves to the CPU wheel on CPU-only machines and to the
# normal wheel on GPU machines; installing the rest first would drag in a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/lens-tune run recipes/quickstart.yaml output.dir=outputs/runs

clean:
	rm -rf $(VENV) outputs .pytest_cache

# GPU checks of the core (tests/gpu); needs a CUDA machine.
test-gpu: $(STAMP)
	$(PY) -m pytest -q -s -o addopts="" tests/gpu
