# The README's two commands: `make run` and `make test`. Everything installs into .venv/.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test install lint typecheck proto man wheels packages bench clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "opmas needs Python >= 3.11 ($(PYTHON) is older); set PYTHON=python3.11" >&2; exit 1; }
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  rm -rf $(VENV); \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "python3-venv is missing: installing it with apt-get" >&2; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; \
	    $(PYTHON) -m venv $(VENV); \
	  else echo "$(PYTHON) -m venv failed: install python3-venv (apt-get install python3-venv)" >&2; exit 1; fi; }
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/opmasd

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

proto: install
	$(BIN)/python scripts/gen_proto.py

# The man pages opmasctl(1) and opmasd(8), from the parsers (packaging installs them; not committed).
man: install
	$(BIN)/python scripts/gen_man.py build/man

# The wheels that ship, into dist/: opmas-api (the stubs), opmas-agent (the SDK) and opmas (the
# daemon and opmasctl, depending on both). Offline: this venv's setuptools, no build isolation.
# VERSION=0.1.1 builds them at another version than pyproject.toml's (upgrade tests).
wheels: install
	$(BIN)/python scripts/build_wheels.py dist $(if $(VERSION),--version $(VERSION))

# dist/opmas_<version>_amd64.deb and dist/opmas-<version>.x86_64.rpm (packaging/build.py, nfpm).
# VERSION=0.1.1 builds them (and the wheels inside) as another version than pyproject.toml's.
VERSION ?=

packages: install
	$(BIN)/python packaging/build.py $(if $(VERSION),--version $(VERSION))

# The benchmark (not part of `make test`): supervisor, circus and py-spy go into their own venv,
# built by the same Python as .venv (the circus client is loaded from it).
BENCH_VENV := bench/.venv
BENCH_ARGS ?=

$(BENCH_VENV)/.installed: $(BIN)/python
	$(BIN)/python -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install -q supervisor circus py-spy
	@touch $@

bench: install $(BENCH_VENV)/.installed
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info
