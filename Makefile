# epcomm: make demo | test | lint | bench | smoke | clean
# The venv (.venv) is created only when missing; the project is installed into it once (stamp file),
# again only when pyproject.toml changes.

PYTHON3 ?= python3
VENV    := .venv
# SYSTEM_PYTHON=1: use $(PYTHON3) as it is, no venv and no install (machines without a package index whose Python
# already has the dependencies, e.g. the GPU image: `make demo SYSTEM_PYTHON=1`).
ifeq ($(SYSTEM_PYTHON),1)
PY      := $(PYTHON3)
STAMP   :=
else
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.epcomm-installed
endif
EXTRAS  ?= test

# >= 2 GPUs: the local GPU config; exactly 1 GPU: 2 ranks sharing it (configs/one-gpu-2.yaml, share_gpus);
# no GPU: the 2-node host-backend config.
NGPUS   := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
CONFIG  ?= $(if $(filter-out 0 1,$(or $(NGPUS),0)),configs/local-2gpu.yaml,$(if $(filter 1,$(NGPUS)),configs/one-gpu-2.yaml,configs/cpu-2x4.yaml))
TIMEOUT ?= 600
ARGS    ?=

.PHONY: demo test lint bench smoke clean venv

venv: $(STAMP)

$(PY):
	$(PYTHON3) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m launch run -t $(CONFIG) --timeout $(TIMEOUT) -- python -m epcomm.demo $(ARGS)

# lint runs first, so `make test` (and CI) fails on a ruff finding before the slower tests start.
test: lint
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) -m launch bench -t $(CONFIG) --timeout $(TIMEOUT) -- $(ARGS)

smoke: $(STAMP)
	$(PY) -m launch smoke -t $(CONFIG) --timeout $(TIMEOUT) -- $(ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis out $(STAMP)
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
