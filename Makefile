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
PLOTLY_SPEC := plotly.js-dist-min@4.1.2
PLOTLY_DIR := .build-deps/static/plotly
REVEAL_SPEC := reveal.js@5.2.1
REVEAL_DIR := .build-deps/slides/reveal
STAMP := $(VENV)/.installed
JB_FLAGS := -W -n --keep-going

.PHONY: setup book test lint clean browser-deps execute student prepare check-laptop slides nbgrader

setup: $(STAMP) $(MATHJAX_DIR)/tex-chtml.js $(PLOTLY_DIR)/plotly.min.js $(REVEAL_DIR)/reveal.js browser-deps

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

# Plotly's JavaScript, served from the book's own static files like MathJax: the figures
# with sliders (pearl_edu.teaching.interactive) load it from there, with no network.
$(PLOTLY_DIR)/plotly.min.js:
	command -v npm >/dev/null || { echo "npm is needed to fetch Plotly (apt-get install npm)"; exit 1; }
	rm -rf .build-deps/plotly && mkdir -p .build-deps/plotly
	npm install --silent --no-audit --no-fund --prefix .build-deps/plotly $(PLOTLY_SPEC)
	rm -rf $(PLOTLY_DIR) && mkdir -p $(PLOTLY_DIR)
	cp .build-deps/plotly/node_modules/plotly.js-dist-min/plotly.min.js $(PLOTLY_DIR)/

# reveal.js for the slides (`make slides`), kept out of the book's static files: the decks
# load it, and MathJax, from copies beside them, so they open from disk with no network.
$(REVEAL_DIR)/reveal.js:
	command -v npm >/dev/null || { echo "npm is needed to fetch reveal.js (apt-get install npm)"; exit 1; }
	rm -rf .build-deps/reveal && mkdir -p .build-deps/reveal
	npm install --silent --no-audit --no-fund --prefix .build-deps/reveal $(REVEAL_SPEC)
	rm -rf $(REVEAL_DIR) && mkdir -p $(REVEAL_DIR)/theme/fonts
	cd .build-deps/reveal/node_modules/reveal.js/dist && cp reveal.js reveal.css reset.css $(CURDIR)/$(REVEAL_DIR)/ \
	  && cp theme/white.css $(CURDIR)/$(REVEAL_DIR)/theme/ \
	  && cp -r theme/fonts/source-sans-pro $(CURDIR)/$(REVEAL_DIR)/theme/fonts/

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

# The student edition: every chapter without its solutions, with answers to fill in and
# check (_build/student/notebooks, to hand out), and its HTML book (_build/student/html).
student: setup
	$(BIN)/python -m pearl_edu.teaching.student --html
	@echo
	@echo "Hand out $(CURDIR)/_build/student/notebooks; the book is $(CURDIR)/_build/student/html/index.html."

# Before a class: run every chapter once, which trains and caches the mini-Pearl models the
# chapters use (book/course.md, "Before the course"); then check the laptop.
prepare: setup
	$(BIN)/python -m pearl_edu.teaching.classroom prepare

check-laptop: setup
	$(BIN)/python -m pearl_edu.teaching.classroom check

# Slides for each class of the course (pearl_edu/data/course_plan.yml), made from the
# chapters as saved: one reveal.js deck per class in _build/slides, listed by its index.html.
slides: setup
	$(BIN)/python -m pearl_edu.teaching.slides
	@echo "Open $(CURDIR)/_build/slides/index.html in a browser (it works offline)."

# The chapters as an nbgrader course (_build/nbgrader): one assignment for each chapter with
# checked exercises, the teacher's answers in solution regions and autograded checks, each
# released by `nbgrader generate_assignment` into _build/nbgrader/release. nbgrader is in
# the course extra, which the test extra (installed by setup) includes.
nbgrader: setup
	$(BIN)/python -m pearl_edu.teaching.nbgrader_course --generate
	@echo
	@echo "The course is $(CURDIR)/_build/nbgrader: run nbgrader there (release_assignment, autograde)."

lint: setup
	$(BIN)/ruff check pearl_edu tests notebooks bench
	$(BIN)/ruff format --check pearl_edu tests notebooks bench

# The builds run first so that the browser tests have pages to load (the book's, and the
# student edition's); pytest then runs the unit, property and reference tests and every
# notebook cell (nbval) in one session. nbval runs every chapter and checks its committed
# outputs, so the test build renders the chapters from those outputs instead of running
# them a second time (minutes of work, no extra check); the book's Markdown pages with
# code, which nbval does not see, still run. `make book` runs everything.
TEST_CONFIG := _build/config-test.yml

test: setup lint
	mkdir -p _build
	$(BIN)/python -c "import yaml; c = yaml.safe_load(open('_config.yml')); \
	  c['execute']['exclude_patterns'] = ['notebooks/*.ipynb']; \
	  yaml.safe_dump(c, open('$(TEST_CONFIG)', 'w'), sort_keys=False)"
	$(BIN)/jupyter-book build . $(JB_FLAGS) --config $(TEST_CONFIG)
	$(BIN)/python -m pearl_edu.teaching.student --html
	$(BIN)/python -m pytest tests notebooks --nbval --nbval-current-env \
	  --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout=600 --durations=25

clean:
	rm -rf _build .build-deps $(MATHJAX_DIR)

# For authors: re-execute every chapter in place after editing, then commit the outputs.
execute: setup
	$(BIN)/python tests/execute_notebooks.py notebooks/*.ipynb
