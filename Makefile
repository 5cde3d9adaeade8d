# Two entry points (see README): `make serve` and `make test`. Each builds its own virtualenv on
# first use: .venv-serve holds only the `serve` extra (no torch), .venv the full `dev` extra, both
# at the versions of constraints.txt (`make lock` rewrites it after a pin in pyproject.toml changes).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SERVE_VENV := .venv-serve
SERVE_STAMP := $(SERVE_VENV)/.installed

.PHONY: serve test lint venv lock clean

# A venv left half-built (python3.11-venv missing: no ensurepip, hence no pip) is rebuilt.
$(STAMP): pyproject.toml constraints.txt
	$(PY) -m pip --version >/dev/null 2>&1 || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]' -c constraints.txt
	touch $(STAMP)

$(SERVE_STAMP): pyproject.toml constraints.txt
	$(SERVE_VENV)/bin/python -m pip --version >/dev/null 2>&1 || { rm -rf $(SERVE_VENV) && $(PYTHON) -m venv $(SERVE_VENV); }
	$(SERVE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SERVE_VENV)/bin/python -m pip install --quiet -e '.[serve]' -c constraints.txt
	touch $(SERVE_STAMP)

venv: $(STAMP)

serve: $(SERVE_STAMP)
	$(SERVE_VENV)/bin/python -m service

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest

# Re-resolves every extra and rewrites constraints.txt (needs the package indexes).
lock:
	$(PY) -m pip --version >/dev/null 2>&1 || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	PYTHON=$(PY) bash .ci/lock

clean:
	rm -rf $(VENV) $(SERVE_VENV)
