# Everything installs into .venv at the repo root. `make test` and `make demo` install first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Every package of the test environment at the version the suite passed with (torch's pin included).
CONSTRAINTS := constraints.txt
# The CPU build of torch on a CPU machine; on a GPU machine the same pin takes PyPI's CUDA build.
TORCH_VERSION ?= $(shell sed -n 's/^torch==//p' $(CONSTRAINTS))
PYTEST_ARGS ?=
LATEST := .venv-latest

.PHONY: install test test-latest lint bench demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch goes in first, pinned, so that nothing pulls a multi-GB CUDA build onto a CPU machine; then the rest at
# the pinned versions. A CUDA torch brings its own triton, so its pin is left out there.
$(VENV)/.installed: setup.py $(CONSTRAINTS) | $(BIN)/python
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/python -c "import torch; cuda = torch.version.cuda is not None; \
	    print(*[l for l in open('$(CONSTRAINTS)').read().splitlines() \
	            if not l.startswith(('torch==', 'triton==' if cuda else '#'))], sep='\n')" > $(VENV)/constraints.txt
	$(BIN)/python -m pip install --quiet -e ".[dev]" -c $(VENV)/constraints.txt
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Not in CI: the newest releases of everything but torch (kept at the pinned CPU build) in .venv-latest, the
# versions that moved from constraints.txt, then the suite on them.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	echo "torch==$(TORCH_VERSION)" > $(LATEST)/torch.txt
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[dev]" -c $(LATEST)/torch.txt
	$(LATEST)/bin/python tests/pins.py $(CONSTRAINTS)
	$(LATEST)/bin/python -m pytest -q $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/llama-adapter bench attention

demo: install
	$(BIN)/llama-adapter demo

clean:
	rm -rf $(VENV) $(LATEST) build dist *.egg-info .pytest_cache .ruff_cache .benchmarks
