# `make demo` and `make test` work on a fresh machine: they create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# On CPU-only machines pin the CPU torch wheel (an unpinned torch pulls a multi-GB CUDA build).
TORCH := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: demo test env clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

env: $(VENV)/.installed

demo: env
	$(VENV)/bin/viditq demo --out out/demo

test: env
	$(PY) -m pytest -q tests

clean:
	rm -rf out .pytest_cache
