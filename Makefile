# Two commands do all set-up on a fresh machine (Python 3.10+ with pip):
#   make demo   - install into .venv, start the built-in emulator, run the main job on the example file
#   make test   - install into .venv (with test extras) and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/prefect-anthropic demo

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

.PHONY: install demo test
