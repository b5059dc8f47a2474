# Two commands do all set-up on a fresh machine: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test lint bench load system-packages

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

# Debian packages the tests need: chromium for the browser tests (never a
# downloaded browser build), node for the library's unit tests.
system-packages:
	@command -v chromium >/dev/null || { apt-get update -q && apt-get install -y -q chromium; }
	@command -v node >/dev/null || { apt-get update -q && apt-get install -y -q nodejs; }

test: lint system-packages
	node --test tests/js/
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) bench/upload_bench.py

load: $(VENV)/.installed
	cd bench && $(abspath $(PY)) load.py
