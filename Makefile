# Two commands set up everything on a fresh clone (each creates/updates the local virtualenv .venv):
#   make demo   - the main job on the built-in data (python -m experiments.reproduce --scale=demo)
#   make test   - the test suite (CPU only, 8 fake devices for the sharding tests)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo

.PHONY: setup demo test lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m experiments.reproduce --scale=demo --workdir=$(WORKDIR)

test: setup
	$(PY) -m pytest -q -n 2 --durations=15
	$(VENV)/bin/ruff check .

lint: setup
	$(VENV)/bin/ruff check .
