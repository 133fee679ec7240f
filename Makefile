# Two commands do all the set-up on a fresh machine (Debian 12, Python 3.11, make, python3-venv, git; root for apt-get):
#   make reproduce   -> venv + packages + Fashion-MNIST, then `python -m harness.reproduce table2` (tiny profile)
#   make test        -> the same set-up + the Debian packages of a Slurm test cluster (slurmctld slurmd slurm-client
#                       munge slurmdbd mariadb-server), then the test suite, which starts that cluster under
#                       $(SLURM_PREFIX) with its own config (SLURM_CONF), daemons and database; /etc is not written
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The torch build that works on the CPU development machines (machine-facts.md); GPU sites may set their own.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# The Slurm test cluster's prefix (config, state, logs, its own munged and MariaDB): tools/slurm_local.sh
SLURM_PREFIX ?= /var/tmp/harness-slurm
SLURM_ENV := HARNESS_SLURM_PREFIX=$(SLURM_PREFIX) SLURM_CONF=$(SLURM_PREFIX)/etc/slurm.conf

.PHONY: reproduce test test-fast data venv slurm slurm-stop bench

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
	$(SUDO) bash tools/slurm_local.sh install

slurm-stop:
	$(SUDO) $(SLURM_ENV) bash tools/slurm_local.sh stop

reproduce: venv data
	$(PY) -m harness.reproduce table2

test: venv data slurm
	$(PY) -m ruff check .
	$(SLURM_ENV) HARNESS_REQUIRE_SLURM=1 $(PY) -m pytest

test-fast: venv data
	$(PY) -m ruff check .
	$(PY) -m pytest -m "not slow and not slurm"

bench: venv data
	$(PY) -m harness.bench
