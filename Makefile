# Two commands do all set-up on a fresh machine: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test lint docs bench bench-tus bench-s3 bench-wan bench-cluster load system-packages

run: $(VENV)/.installed
	$(PY) examples/demo/run.py $(ARGS)

$(VENV)/.installed: pyproject.toml
	python3 -c 'import ensurepip' 2>/dev/null || \
	    INSTALL_TEST_DEPS_PACKAGES=python3-venv contrib/install-test-deps
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '.[test]'
	touch $@

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check incoming twisted tests bench examples docs
	$(VENV)/bin/ruff format --check incoming twisted tests bench examples docs
	$(VENV)/bin/mypy incoming

# Debian packages the tests need (the list: contrib/install-test-deps, which CI runs
# too): nothing happens once they are there; otherwise it installs them as root
# (waiting for the dpkg lock, leaving no service started or enabled) or says what
# root must install.
system-packages:
	contrib/install-test-deps

# Test and benchmark tools from npm, at the exact versions of package-lock.json:
# tus-js-client, Uppy (bundled for the browser by esbuild during the tests),
# @tus/server (bench-tus's reference) and @tus/s3-store (bench-s3's). No install scripts run.
node_modules/.installed: package.json package-lock.json | system-packages
	npm ci --no-audit --no-fund --ignore-scripts
	touch $@

# The documentation (docs/, Sphinx) as HTML in build/docs: warnings are errors, and every
# reference must resolve (-n). The examples and incoming.backend's docstrings are included.
docs: $(VENV)/.installed
	$(VENV)/bin/sphinx-build -q -W --keep-going -n -b html docs build/docs

test: system-packages lint docs node_modules/.installed
	node --test tests/js/
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) bench/upload_bench.py

# tus-js-client against @tus/server and against ours (bench/tus_bench.py).
bench-tus: $(VENV)/.installed node_modules/.installed
	$(PY) bench/tus_bench.py $(ARGS)

# Ours against @tus/server + @tus/s3-store (package-lock.json), both into one throwaway
# Ceph RGW (tests/ceph.py), 256 MiB by tus-js-client in 8 MiB PATCHes, on loopback and
# across an emulated link; ours to local disk beside (bench/s3_bench.py).
bench-s3: $(VENV)/.installed node_modules/.installed
	$(PY) bench/s3_bench.py $(ARGS)

# Every client, ours and @tus/server, across an emulated long fat link (bench/linkem.py):
# 40 and 150 ms round trip at 400 Mbit/s, 256 MiB each (bench/wan_bench.py). The 2014
# library is not in this repository: LIB2014=PATH names a copy of its incoming.js.
bench-wan: $(VENV)/.installed node_modules/.installed
	$(PY) bench/wan_bench.py $(if $(LIB2014),--lib2014 $(LIB2014)) $(ARGS)

# One process against cluster mode (--redis, with a redis-server of its own): tickets
# per second and one 256 MiB WebSocket upload (bench/cluster_bench.py).
bench-cluster: $(VENV)/.installed
	$(PY) bench/cluster_bench.py $(ARGS)

load: $(VENV)/.installed
	cd bench && $(abspath $(PY)) load.py
