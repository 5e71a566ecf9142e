# make train: set up .venv and run the main job; make test: set up .venv and run the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup train test tensorboard clean-runs

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

train: setup
	$(BIN)/python -m cnnrnn.train task=multilabel

test: setup
	$(BIN)/python -m pytest

tensorboard: setup
	$(BIN)/tensorboard --logdir runs
