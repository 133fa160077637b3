# `make quickstart` trains a small model on the built-in corpus; `make test` runs the tests.
# Each target builds the virtual environment it needs in .venv (Python >= 3.11).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# XLA:CPU allocates each step's temporaries anew, and glibc maps such large blocks fresh every
# time: with 4 KiB pages the kernel faults them in one by one (138,000 faults per step of the
# 16 x 128 benchmark in `experiments.peers`). Transparent huge pages for glibc's large blocks
# make that step 15% faster on the 2-core CPU (README, "Running experiments").
export GLIBC_TUNABLES := glibc.malloc.hugetlb=1

$(VENV)/.main: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.main
	$(PY) -m pip install -q -e ".[test]"
	touch $@

.PHONY: quickstart test
quickstart: $(VENV)/.main
	$(PY) -m data.prepare --config=experiments/quickstart.py
	$(PY) -m train.pretrain --config=experiments/quickstart.py --workdir=runs/quickstart

# Two worker processes, each taking whole files (so a module's fixtures are built once): the
# tests spend most of their time compiling, which is single-threaded.
test: $(VENV)/.test
	$(PY) -m pytest tests -n 2 --dist loadfile
