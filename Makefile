# lorag: `make serve` runs the daemon, `make test` runs the suite; both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup serve test lint clean

setup: $(STAMP)

# torch goes in first and pinned: it takes the CPU wheel; a loose torch requirement
# would pull a multi-GB CUDA build. The stamp makes a re-run quick and a no-op.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

serve: setup
	$(BIN)/lorag models pull
	$(BIN)/lorag serve

test: setup
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check lorag server trainer retrieval tests

clean:
	rm -rf $(VENV) .pytest_cache
