# MoE Atlas: two commands do all set-up on a fresh machine.
#   make serve   build the site from the committed catalog and serve it on http://127.0.0.1:8000
#                (`mkdocs serve`: live reload when a page source, a curated YAML file or a router
#                module changes); installs only what serving needs
#   make test    run the whole test suite (what CI runs); installs the test tools too
# Both create .venv on first use. torch 2.13.0 is installed before the package so that pip
# takes the local CPU wheel instead of resolving a multi-GB CUDA build.

PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
HOST    ?= 127.0.0.1
PORT    ?= 8000
export NO_MKDOCS_2_WARNING := 1
export DISABLE_MKDOCS_2_WARNING := true

.PHONY: install browser serve build test lint bench clean

$(BIN)/.installed-site: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e .
	touch $@

$(BIN)/.installed: $(BIN)/.installed-site pyproject.toml
	$(BIN)/pip install --quiet -e ".[dev,hf]"
	touch $@

install: $(BIN)/.installed

# Debian's Chromium for the browser tests (never `playwright install`).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

serve: $(BIN)/.installed-site
	$(BIN)/mkdocs serve --dev-addr $(HOST):$(PORT)

build: $(BIN)/.installed-site
	$(BIN)/mkdocs build

test: install browser
	$(BIN)/python -m pytest -n 2

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: install
	$(BIN)/python scripts/bench_moe.py

clean:
	rm -rf public site/generated .pytest_cache artifacts
