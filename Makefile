# Everything installs into .venv at the repo root. `make test` and `make demo` install first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch on a CPU machine; on a GPU machine the same pin takes PyPI's CUDA build.
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=

.PHONY: install test lint bench demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch goes in first, pinned, so that nothing pulls a multi-GB CUDA build onto a CPU machine.
# With a CPU torch, triton and numpy are pinned to versions whose interpreter runs the tests.
$(VENV)/.installed: setup.py constraints-cpu.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet -e ".[dev]" \
	    $$($(BIN)/python -c "import torch; print('-c constraints-cpu.txt' if torch.version.cuda is None else '')")
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python -m bench.bench_attention

demo: install
	$(BIN)/python -m train.demo

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .benchmarks
