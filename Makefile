# memoryformer — every user-facing command. `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export PYTHONPATH :=

.PHONY: help setup test test-all lint pretrain sample flops data eval tables sweep buckets bench
help:  ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

# Idempotent: re-installs only when pyproject.toml or constraints.txt change. Plain pip with the lock as
# constraints, so torch stays the CPU build on disk (uv/poetry would fetch a CUDA build).
setup: $(STAMP)  ## create .venv and install the pinned stack
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $@

LAUNCHER ?= $(PY)
pretrain: setup  ## train MODEL (default mf-nano on the local sample, CPU, minutes); Hydra overrides in ARGS
	$(LAUNCHER) scripts/pretrain.py $(if $(MODEL),model=$(MODEL)) $(ARGS)

sample: setup  ## generate from a checkpoint: make sample [CKPT=runs/<run>] [PROMPT="Once upon a time"] [DTYPE=bf16]
	$(PY) scripts/sample.py $(if $(CKPT),checkpoint=$(CKPT)) $(if $(PROMPT),'prompt="$(PROMPT)"') $(if $(DTYPE),dtype=$(DTYPE))

test: setup  ## the default test suite (offline, < ~10 min on 2 cores)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: setup  ## every test, slow ones included
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup  ## ruff
	$(VENV)/bin/ruff check src tests scripts benchmarks

flops: setup  ## Table 1 FLOPs rows, model sizes and Figure 1 into results/flops
	$(PY) scripts/flops.py

data: setup  ## tokenize the configured corpus into data/prepared/ (Hydra overrides in ARGS)
	$(PY) scripts/prepare_data.py $(ARGS)

eval: setup  ## zero-shot lm-eval, six tasks: make eval [CKPT=dir|hub-id] [REVISION=step93000] [TASKS=piqa,wsc] [LIMIT=n] [NAME=pythia-70m]
	$(PY) scripts/evaluate.py $(if $(CKPT),checkpoint=$(CKPT)) $(if $(REVISION),revision=$(REVISION)) $(if $(TASKS),eval.tasks=[$(TASKS)]) $(if $(LIMIT),eval.limit=$(LIMIT)) $(if $(NAME),model_name=$(NAME))

tables: setup  ## merge eval results into one Table 1: make tables [RESULTS=results/eval/a,runs/x/eval]
	$(PY) scripts/make_tables.py $(if $(RESULTS),results=[$(RESULTS)])

SWEEP_ARGS = $(if $(MODEL),model=$(MODEL)) $(if $(STEPS),train.max_steps=$(STEPS)) $(ARGS)
# The aggregator runs even when a run failed (`;`): the table is always written, and its exit status is make's.
sweep: setup  ## ablation sweep (Tables 3-6): make sweep SWEEP=tau_k|lr|expand_bits|gelu [MODEL=mf-tiny] [STEPS=8000] [ARGS=...]
	@test -n "$(SWEEP)" || { echo "SWEEP=tau_k|lr|expand_bits|gelu is required"; exit 2; }
	$(PY) scripts/pretrain.py -m +sweep=$(SWEEP) $(SWEEP_ARGS); $(PY) scripts/aggregate_sweep.py +sweep=$(SWEEP) $(SWEEP_ARGS)

buckets: setup  ## bucket usage of one block (Figure 4): make buckets [CKPT=runs/<run>] [LAYER=0] [ARGS="--text f --max-tokens n"]
	$(PY) scripts/bucket_usage.py $(CKPT) $(if $(LAYER),--layer $(LAYER)) $(ARGS)

bench: setup  ## lookup vs matmul, block, model, training, data -> benchmarks/results/latest.{json,md} (ARGS="--quick")
	$(PY) -m benchmarks.run $(ARGS)
