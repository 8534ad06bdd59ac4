# The two commands of the README. Each sets up its own virtual environment (once: safe to run again),
# with the CPU torch wheel unless the environment already has a torch, then runs its job.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

# the shipped tiny model draws one of its captions on the CPU; generate.py says where the PNG went
demo: setup
	mkdir -p out
	$(BIN)/python tools/generate.py --model tiny --prompt "a small red circle on a blue background" \
		--output out/demo.png --report out/demo.json

test: setup
	$(BIN)/python -m pytest -q tests
	$(BIN)/ruff check .
