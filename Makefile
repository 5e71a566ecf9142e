# make demo: a small trained decoder in minutes; make train: the main job; make test: the fast tests.
# Each target sets up .venv first, with the versions in constraints.txt (make lock re-resolves them).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
LOCK   := constraints.txt

.PHONY: setup train demo test test-slow lock tensorboard

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(LOCK) -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

# make train [resume=RUN_DIR] [ARGS="key=value ..."]
train: setup
	$(BIN)/python -m cnnrnn.train task=multilabel $(if $(resume),resume=$(resume)) $(ARGS)

demo: setup
	$(BIN)/python -m cnnrnn.demo

test: setup
	$(BIN)/python -m pytest -m "not slow"

test-slow: setup
	$(BIN)/python -m pytest -m slow

# Re-resolve every dependency in a throw-away venv and record what was installed.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q -e '.[dev]'
	{ echo "# Versions that the tests pass with, used by make (pip install -c $(LOCK)). Resolved afresh by"; \
	  echo "# 'make lock' on $$(date +%Y-%m-%d), Python $$(.lock-venv/bin/python -c 'import platform; print(platform.python_version(), platform.machine())')."; \
	  .lock-venv/bin/python -m pip freeze --exclude-editable | grep -v '^-e '; } > $(LOCK)
	rm -rf .lock-venv

tensorboard: setup
	$(BIN)/tensorboard --logdir runs
