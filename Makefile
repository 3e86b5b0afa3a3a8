# Two commands for a fresh machine:  `make demo` (the main job)  and  `make test` (the test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTHON ?= python3

.PHONY: venv demo test test-all lint docs clean

$(VENV)/.installed: pyproject.toml constraints-ci.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints-ci.txt -e ".[dev,demo]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	HF_HUB_OFFLINE=1 $(VENV)/bin/invert-ad demo --out runs/demo $(ARGS)

LINT_PATHS := $(wildcard invert_ad tests examples benchmarks)

lint: venv
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

test: venv lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -rs --durations=10 -m "not long" $(ARGS)

test-all: venv lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -rs --durations=10 $(ARGS)

docs: venv
	$(VENV)/bin/mkdocs build --strict -d site

clean:
	rm -rf $(VENV) runs .pytest_cache
