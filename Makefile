# Two commands do all the set-up on a fresh machine:
#   make demo   creates .venv, installs mtpsl, renders the synthetic dataset, trains and compares
#   make test   creates .venv, installs mtpsl with test tools, runs ruff, mypy and the test suite
# TORCH_SPEC picks the PyTorch build; override it for another CUDA/CPU wheel.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
DEMO_DATA ?= data/synthetic-demo
DEMO_OUT ?= runs/demo

.PHONY: install demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || \
		$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

$(DEMO_DATA)/synthetic.json: | $(VENV)/.installed
	$(BIN)/mtpsl data synth --out $(DEMO_DATA) --n-train 160 --n-val 50 --height 64 --width 96

demo: $(VENV)/.installed $(DEMO_DATA)/synthetic.json
	$(BIN)/mtpsl compare --config synthetic_demo --out $(DEMO_OUT) \
		dataset.root=$(DEMO_DATA)

lint: $(VENV)/.installed
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) $(DEMO_DATA) $(DEMO_OUT)
