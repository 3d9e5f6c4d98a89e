# Two commands on a fresh machine: `make demo` (offline tiny run) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU wheel by default; on a CUDA machine: make setup TORCH="torch==2.13.0 --index-url <your CUDA wheel index>"
TORCH  ?= torch==2.13.0

.PHONY: setup demo train test bench dashboard clean-notebooks check-notebooks clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (qwen-cls)" >/dev/null
	touch $@

demo: setup
	$(VENV)/bin/qwen-cls run --profile tiny --out runs/demo

train: setup
	$(VENV)/bin/qwen-cls run --profile qwen2-0.5b --out runs/qwen2-0.5b

test: setup
	$(PY) -m pytest tests

clean:
	rm -rf runs .pytest_cache
