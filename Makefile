# make install: the Python virtualenv and the project's own Node.js 22 (Reflex needs >= 22.22).
# make run:     the gallery at http://localhost:3000 (PORT=... to change).
# make test:    the test suite.
# Needs python3 (with venv), npm and network access to PyPI and the npm registry the first time.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NODE_VERSION := 22.23.3
NODE_PREFIX := .tools/node22
NODE_PLATFORM := $(shell uname -s | tr A-Z a-z)-$(shell uname -m | sed -e 's/x86_64/x64/' -e 's/aarch64/arm64/')
NODE := $(NODE_PREFIX)/node_modules/node-$(NODE_PLATFORM)/bin/node
PORT ?= 3000

.PHONY: install node run test lint

install: $(STAMP) $(NODE)

node: $(NODE)

$(PY):
	@$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	  echo "Could not create $(VENV); on Debian/Ubuntu: apt-get install python3-venv" >&2; exit 1; }

$(STAMP): requirements.txt requirements-dev.txt requirements-bench.txt pyproject.toml | $(PY)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

# The npm registry's node-<os>-<arch> package is the official Node.js binary.
$(NODE):
	npm install --no-fund --no-audit --prefix $(NODE_PREFIX) node-$(NODE_PLATFORM)@$(NODE_VERSION)
	touch $@

run: install
	$(VENV)/bin/clipgallery serve --port $(PORT)

test: install
	$(VENV)/bin/pytest -q

lint: install
	$(VENV)/bin/ruff check .
