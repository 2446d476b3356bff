# Two commands do all set-up on a fresh machine (Python 3.10+ with pip):
#   make demo   - install into .venv, start the built-in emulator and a local Prefect server (in the background,
#                 reused; `prefect server stop` stops it), run the main job on the example file as a flow run
#                 there and print its address in the Prefect UI
#   make test   - install into .venv (with test extras; the newest Prefect 3 the registry serves), run ruff,
#                 mypy and the whole test suite but the 10^5-request load run (under 12 minutes on 2 cores)
# `make test-load` runs the load run (about 2.5 minutes); `make test-prefect-floor` runs the fast tests again on
# the oldest Prefect we support (3.8.8). .ci/run runs all three.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
FLOOR_VENV ?= .venv-prefect-floor
FLOOR_BIN = $(FLOOR_VENV)/bin

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[test]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/prefect-anthropic demo

test: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -m "not load" -n 3 --dist loadfile

test-load: install
	$(BIN)/python -m pytest -m load

# Prefect 3.8.8's local server breaks with fastapi>=0.151: a pin only this old line needs.
$(FLOOR_BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_BIN)/python -m pip install --quiet --upgrade pip
	$(FLOOR_BIN)/python -m pip install --quiet -e ".[test]" "prefect==3.8.8" "fastapi<0.151"
	touch $@

test-prefect-floor: $(FLOOR_BIN)/.installed
	$(FLOOR_BIN)/python -m pytest -m "not slow" -n 3 --dist loadfile

.PHONY: install demo test test-load test-prefect-floor
