# Two commands do all the set-up on a fresh machine (Debian 12, Python 3.11, root for apt-get):
#   make reproduce   -> venv + packages + Fashion-MNIST, then `python -m harness.reproduce table2` (tiny profile)
#   make test        -> the same set-up + a local Slurm cluster, then the test suite
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The torch build that works on the CPU development machines (machine-facts.md); GPU sites may set their own.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: reproduce test test-fast data venv slurm bench

venv: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

data: $(FASHION)
$(FASHION):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq dataset-fashion-mnist

slurm:
	$(SUDO) bash harness/slurm_local.sh install

reproduce: venv data
	$(PY) -m harness.reproduce table2

test: venv data slurm
	HARNESS_REQUIRE_SLURM=1 $(PY) -m pytest

test-fast: venv data
	$(PY) -m pytest -m "not slow and not slurm"

bench: venv data
	$(PY) -m harness.bench
