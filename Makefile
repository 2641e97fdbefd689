# The two commands a user needs: `make demo` and `make test`.
# Both create or reuse .venv, install the pinned CPU torch FIRST (an unpinned torch
# pulls gigabytes of CUDA wheels), then the package with its test extras.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mmfeed-installed
TORCH_PIN ?= torch==2.13.0

.PHONY: venv test demo bench clean install-units

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py protocol/_seqlock.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -ra

demo: $(STAMP)
	$(PY) -m cli.demo

bench: $(STAMP)
	for b in ring decode cache preprocess loader stall producer; do \
	  test -f bench/$$b.py && $(PY) -m bench.$$b || true; done

clean:
	rm -rf $(VENV) build *.egg-info protocol/*.so

# Installs the systemd units (needs root): see README "Running under systemd".
install-units: $(STAMP)
	$(PY) -m cli.units $(UNITS_ARGS)
