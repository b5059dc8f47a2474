# Two commands do all set-up on a fresh machine: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1

.PHONY: run test lint bench

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '.[test]'
	touch $@

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check incoming twisted tests bench
	$(VENV)/bin/ruff format --check incoming twisted tests bench
	$(VENV)/bin/mypy incoming

test: lint
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) bench/upload_bench.py
