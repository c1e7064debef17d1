# t2vu developer tasks. `make test` sets everything up from scratch and runs the tests.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# On a machine without a GPU install the CPU build of torch first (an unpinned
# torch pulls a multi-GB CUDA build). Elsewhere: make setup TORCH=
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export OMP_NUM_THREADS := 1

.PHONY: setup test demo bench check-wheel clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml toy/pyproject.toml tests/plugins/t2vu-example/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if [ -n "$(TORCH)" ]; then $(PY) -m pip install -q "$(TORCH)"; fi
	$(PY) -m pip install -q -e '.[dev]'
	# the toy world is a plugin distribution of its own, installed like any third-party one
	$(PY) -m pip install -q --no-deps -e ./toy
	$(PY) -m pip install -q --no-deps ./tests/plugins/t2vu-example
	touch $@

test: setup
	$(PY) -m pytest -q

# The Quick start's main job: erase "red" from the shipped toy model, then print the before/after table.
demo: setup
	$(VENV)/bin/t2vu run examples/toy-erase-red.yaml --set output.overwrite=true
	$(VENV)/bin/t2vu eval examples/toy-erase-red.yaml --overwrite

bench: setup
	$(PY) benchmarks/cli_startup.py
	$(PY) benchmarks/toy_erase.py

# Build the wheels (t2vu, t2vu-toy), install them into a fresh virtual environment, run the CLI from it.
check-wheel: setup
	rm -rf dist build/wheel-venv
	$(PY) -m build --wheel -q --outdir dist .
	$(PY) -m build --wheel -q --outdir dist ./toy
	$(PYTHON) -m venv build/wheel-venv
	@if [ -n "$(TORCH)" ]; then build/wheel-venv/bin/pip install -q "$(TORCH)"; fi
	build/wheel-venv/bin/pip install -q dist/t2vu-0*.whl
	build/wheel-venv/bin/pip install -q --no-deps dist/t2vu_toy-*.whl
	cd /tmp && $(CURDIR)/build/wheel-venv/bin/t2vu plugins list
	cd /tmp && $(CURDIR)/build/wheel-venv/bin/t2vu plugins list --json | $(CURDIR)/build/wheel-venv/bin/python -c "import json, sys; rows = json.load(sys.stdin); assert any(r['name'] == 'toy' and r['distribution'] == 't2vu-toy' for r in rows), 'toy plugin missing'"
	cd /tmp && $(CURDIR)/build/wheel-venv/bin/python -c "import t2vu.core, importlib.util as u; assert u.find_spec('core') is None and u.find_spec('plugins') is None; print('wheel ok')"

clean:
	rm -rf $(VENV) build dist *.egg-info
