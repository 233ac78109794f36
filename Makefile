# Two entry points, both idempotent: `make demo` and `make test`.
# The first run creates .venv and installs fedser with every extra, every package pinned by
# constraints.txt; later runs reuse it (the install is redone when pyproject.toml or
# constraints.txt changes). `make lock` refreshes constraints.txt from pyproject.toml.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedser-installed

.PHONY: setup demo test test-slow bench testbed lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(BIN)/python -c "import torch, torchaudio, opacus, flwr; torchaudio.transforms.MelSpectrogram()(torch.zeros(400))"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedser demo $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

# The opt-in tests (marker `heavy`): long end-to-end drills that CI runs as a second step.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m heavy $(ARGS)

bench: $(STAMP)
	$(BIN)/python bench/run_all.py $(ARGS)

# The docker-compose test bed (deploy/README.md): prepared once, then run; ARGS go to `testbed up`.
testbed: $(STAMP)
	test -f deploy/testbed/testbed.json || $(BIN)/fedser testbed prepare --out deploy/testbed
	$(BIN)/fedser testbed up --testbed deploy/testbed $(ARGS)

# Pin the whole dependency set (every platform, Python 3.11+) after changing pyproject.toml.
lock: $(STAMP)
	$(BIN)/uv pip compile pyproject.toml --all-extras --universal --python-version 3.11 --no-annotate \
	    --custom-compile-command "make lock" -o constraints.txt

clean:
	rm -rf runs .cache .pytest_cache
