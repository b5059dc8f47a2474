# Two commands do all set-up on a fresh machine: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test lint bench load chromium

run: $(VENV)/.installed
	$(PY) examples/demo/run.py $(ARGS)

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '.[test]'
	touch $@

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check incoming twisted tests bench examples
	$(VENV)/bin/ruff format --check incoming twisted tests bench examples
	$(VENV)/bin/mypy incoming

# The browser tests drive Debian's chromium (never a downloaded browser build).
chromium:
	@command -v chromium >/dev/null || { apt-get update -q && apt-get install -y -q chromium; }

test: lint chromium
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) bench/upload_bench.py

load: $(VENV)/.installed
	cd bench && $(abspath $(PY)) load.py
