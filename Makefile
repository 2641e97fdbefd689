# The two commands a user needs: `make demo` and `make test`.
# Both create or reuse .venv, install the pinned CPU torch FIRST (an unpinned torch
# pulls gigabytes of CUDA wheels), then the package with its test, bench and ray extras
# (ray: `preprocess --ray` and its tests; Ray core pulls no torch).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mmfeed-installed
TORCH_PIN ?= torch==2.13.0

.PHONY: venv test test-fast demo bench clean install-units

venv: $(STAMP)

# Two small C helpers are built at install (the ring's memory ordering, LZF for PCD files):
# say what is missing before pip fails with a compiler trace.
$(STAMP): pyproject.toml setup.py protocol/_seqlock.c producer/_lzf.c
	@command -v $${CC:-cc} >/dev/null 2>&1 || { echo "make: mmfeed builds two small C helpers and needs a C compiler: install gcc (Debian/Ubuntu: apt-get install gcc)" >&2; exit 1; }
	@$(PYTHON) -c 'import os, sys, sysconfig; h = os.path.join(sysconfig.get_paths()["include"], "Python.h"); sys.exit(0 if os.path.exists(h) else "make: mmfeed builds two small C helpers and needs the Python headers, " + h + " is missing (Debian/Ubuntu: apt-get install python3-dev)")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test,bench,tensorboard,ray]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -ra

# The unit tests only (no daemons; tests/conftest.py UNIT_FILES): the edit-run loop.
test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m unit

demo: $(STAMP)
	$(PY) -m cli.demo

# The peers (iceoryx2, torchcodec 0.13.0) are installed here, not by `make venv`: only the
# benches measure them; a bench without its peer prints "not installed" in that row.
bench: $(STAMP)
	$(PY) -m pip install -q -e ".[peers]"
	for b in ring decode cache preprocess ray_preprocess loader stall producer stages pixel_format video_store; do \
	  test -f bench/$$b.py && $(PY) -m bench.$$b || true; done

clean:
	rm -rf $(VENV) build *.egg-info protocol/*.so

# Installs the systemd units (needs root): see README "Running under systemd".
install-units: $(STAMP)
	$(PY) -m cli.units $(UNITS_ARGS)
