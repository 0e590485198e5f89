# Two commands from a fresh clone, no activation needed:
#   make demo    set up .venv if needed, then run `minidiff demo` (the main job)
#   make test    set up .venv if needed, then run the test suite (PYTEST_ARGS="tests/test_x.py" for a part)
# Setup runs again only when pyproject.toml or this file is newer than the stamp it leaves.
# Where pip would fetch a CUDA build of torch, add TORCH_INDEX=https://download.pytorch.org/whl/cpu.

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.minidiff-setup
TORCH_INDEX ?=
PYTEST_ARGS ?=

.PHONY: demo test setup

demo: $(STAMP)
	$(VENV)/bin/minidiff demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(VENV)/bin/pip install -q -e '.[test]'
	$(VENV)/bin/pip install -q --no-deps stable-diffusion-sdkit==2.1.5
	touch $(STAMP)
