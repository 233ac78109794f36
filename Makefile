# Two entry points, both idempotent: `make demo` and `make test`.
# The first run creates .venv and installs fedser with every extra; later runs reuse it
# (the install is redone only when pyproject.toml changes).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedser-installed

.PHONY: setup demo test bench testbed clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -c "import torch, torchaudio, opacus, flwr; torchaudio.transforms.MelSpectrogram()(torch.zeros(400))"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedser demo $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

bench: $(STAMP)
	$(BIN)/python bench/run_all.py $(ARGS)

# The docker-compose test bed (deploy/README.md): prepared once, then run; ARGS go to `testbed up`.
testbed: $(STAMP)
	test -f deploy/testbed/testbed.json || $(BIN)/fedser testbed prepare --out deploy/testbed
	$(BIN)/fedser testbed up --testbed deploy/testbed $(ARGS)

clean:
	rm -rf runs .cache .pytest_cache
