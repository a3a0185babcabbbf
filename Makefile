# archflow: `make repro` runs the default study, `make test` runs the tests.
# Both create (or reuse) the project-local virtualenv .venv first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# scripts/install.sh picks torch 2.13.0 (a CPU build unless the machine has an NVIDIA GPU) and installs
# with uv, or pip where uv can't be had. To force a torch index:
#   make TORCH_INDEX=https://download.pytorch.org/whl/cpu
export TORCH_INDEX ?=

export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

# `make repro` installs archflow without extras: a study needs none unless it scores lm-eval tasks
# (EXTRAS=eval) or imports Hugging Face checkpoints (EXTRAS=hf); tasks.validate says which. `make test`
# installs the dev extras (tests and interop). Each set of extras has its own stamp file.
EXTRAS ?=
STAMP := $(VENV)/.installed$(if $(EXTRAS),-$(EXTRAS))

.PHONY: install repro test clean
install: $(STAMP)

$(VENV)/.installed: pyproject.toml
	scripts/install.sh $(VENV)
	touch $@
$(VENV)/.installed-%: pyproject.toml
	scripts/install.sh $(VENV) $*
	touch $@

repro: install          # validate first: it lists the models of replicate seeds that dvc.yaml reads
	$(PY) -m tasks.validate
	dvc repro

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=8 $(PYTEST_ARGS)   # a file's tests share one worker (and its fixtures), longest files first (tests/conftest.py)

clean:                  # models/dvc.yaml and models/replicas.yaml are tracked by git: they stay
	rm -rf data/prepared data/params.ok metrics reports checkpoints mlflow.db mlruns branches
	find models -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
