# Set-up and entry points. Every target installs what it needs from the project's own
# files (a virtual environment in .venv, CPU torch pinned by constraints-cpu.txt), so a
# fresh clone needs nothing installed by hand.
#   make launch   run the main job on the embedded default (local emulated 2-node cluster)
#   make test     lint (ruff, mypy, shellcheck), then the whole test suite (starts and stops
#                 a real SLURM dev cluster)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install launch test lint slurm-packages clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-cpu.txt -e '.[test,hf,lint]'
	touch $(STAMP)

launch: $(STAMP)
	$(VENV)/bin/ringctl launch +topology=2node

slurm-packages:
	bash slurm/dev-cluster install

# the checks that keep the house: linter, type checker, shell scripts (versions pinned in
# pyproject's `lint` extra)
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/shellcheck slurm/dev-cluster slurm/sbatch-example.sh tests/run.sh .ci/run

test: $(STAMP) slurm-packages lint
	bash tests/run.sh

clean:
	rm -rf $(VENV) outputs multirun runs .pytest_cache
