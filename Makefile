# pearl-edu: two commands for a reader, `make book` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch comes first and pinned: on a machine with a local CPU wheel this takes seconds,
# where an unpinned `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
MATHJAX_SPEC := mathjax@3.2.2
MATHJAX_DIR := .build-deps/static/mathjax
STAMP := $(VENV)/.installed
JB_FLAGS := -W -n --keep-going

.PHONY: setup book test lint clean browser-deps execute

setup: $(STAMP) $(MATHJAX_DIR)/tex-chtml.js browser-deps

$(STAMP): pyproject.toml pearl_edu/_kernels.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[book,test]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

# MathJax 3 served from the book's own static files, so math renders with no network.
$(MATHJAX_DIR)/tex-chtml.js:
	command -v npm >/dev/null || { echo "npm is needed to fetch MathJax (apt-get install npm)"; exit 1; }
	rm -rf .build-deps/mathjax && mkdir -p .build-deps/mathjax
	npm install --silent --no-audit --no-fund --prefix .build-deps/mathjax $(MATHJAX_SPEC)
	rm -rf $(MATHJAX_DIR) && mkdir -p $(MATHJAX_DIR)
	cd .build-deps/mathjax/node_modules/mathjax/es5 && cp -r tex-chtml.js input output ui a11y adaptors $(CURDIR)/$(MATHJAX_DIR)/

# The browser test drives Debian's Chromium. Install it when we can (root); otherwise the
# test itself says how.
browser-deps:
	@if ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Chromium from Debian's packages"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "note: chromium is missing; the browser test will fail until 'sudo apt-get install chromium'"; \
	  fi; \
	fi

book: setup
	$(BIN)/jupyter-book build . $(JB_FLAGS)
	@echo
	@echo "The book is built. Open $(CURDIR)/_build/html/index.html in a browser."

lint: setup
	$(BIN)/ruff check pearl_edu tests notebooks bench
	$(BIN)/ruff format --check pearl_edu tests notebooks bench

# The build runs first so that the browser test has pages to load; pytest then runs the
# unit, property and reference tests and every notebook cell (nbval) in one session.
test: setup lint
	$(BIN)/jupyter-book build . $(JB_FLAGS)
	$(BIN)/python -m pytest tests notebooks --nbval --nbval-current-env \
	  --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout=600

clean:
	rm -rf _build .build-deps $(MATHJAX_DIR)

# For authors: re-execute every chapter in place after editing, then commit the outputs.
execute: setup
	$(BIN)/python tests/execute_notebooks.py notebooks/*.ipynb
