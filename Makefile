# Two commands do all the set-up on a fresh machine:
#   make demo   creates .venv, installs mtpsl, renders the synthetic dataset, trains and compares
#   make test   creates .venv, installs mtpsl with test tools, runs ruff, mypy and the fast tier
#               of the tests (all but those marked slow) on every core
#   make test-all  the same, then the slow tier (what CI runs; make test-slow runs that alone)
# TORCH_SPEC picks the PyTorch build; override it for another CUDA/CPU wheel. TEST_WORKERS is
# pytest-xdist's -n (auto: one worker per core).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
DEMO_DATA ?= data/synthetic-demo-48x64
DEMO_OUT ?= runs/demo
TEST_WORKERS ?= auto

.PHONY: install demo test test-slow test-all lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || \
		$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

$(DEMO_DATA)/synthetic.json: | $(VENV)/.installed
	$(BIN)/mtpsl data synth --out $(DEMO_DATA) --n-train 160 --n-val 50 --height 48 --width 64

demo: $(VENV)/.installed $(DEMO_DATA)/synthetic.json
	$(BIN)/mtpsl compare --config synthetic_demo --out $(DEMO_OUT) \
		dataset.root=$(DEMO_DATA)

lint: $(VENV)/.installed
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

# The fast tier spreads single tests over the workers; the slow tier whole files (loadfile),
# so that a file's module fixtures (chains of subprocess runs in test_faults) are built once.
PYTEST := $(BIN)/python -m pytest -n $(TEST_WORKERS)

test: lint
	$(PYTEST) -m "not slow"

test-slow: lint
	$(PYTEST) -m slow --dist loadfile

test-all: lint
	$(PYTEST) -m "not slow"; fast=$$?; $(PYTEST) -m slow --dist loadfile && exit $$fast

clean:
	rm -rf $(VENV) $(DEMO_DATA) $(DEMO_OUT)
