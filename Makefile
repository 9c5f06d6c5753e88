# memoryformer — every user-facing command. `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export PYTHONPATH :=

.PHONY: help setup test test-slow test-all lint pretrain sample flops data download eval eval-tasks tables sweep compare study buckets bench bench-gpu
help:  ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

# Idempotent: re-installs only when pyproject.toml or constraints.txt change. Plain pip with the lock as
# constraints, so torch stays the CPU build on disk (uv/poetry would fetch a CUDA build).
setup: $(STAMP)  ## create .venv and install the pinned stack
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "make setup: installing the pinned stack into $(VENV) with pip (first time ~3 min and ~2 GB: torch CPU, transformers, lm-eval, ...; later only when pyproject.toml or constraints.txt change)"
	$(PY) -m pip install --progress-bar on -c constraints.txt -e '.[dev]'
	@touch $@

LAUNCHER ?= $(PY)
pretrain: setup  ## train MODEL (default mf-nano on the text sample, CPU, minutes); Hydra overrides in ARGS
	$(LAUNCHER) scripts/pretrain.py $(if $(MODEL),model=$(MODEL)) $(ARGS)

# The prompt reaches the script through the environment (conf/sample.yaml reads it), so any quotes in it survive.
ifdef PROMPT
sample: export MEMORYFORMER_PROMPT = $(value PROMPT)
endif
sample: setup  ## generate from a checkpoint: make sample [CKPT=runs/<run>] [PROMPT="The old man's dog"] [DTYPE=bf16]
	$(PY) scripts/sample.py $(if $(CKPT),checkpoint=$(CKPT)) $(if $(DTYPE),dtype=$(DTYPE))

test: setup  ## the default test suite (offline, < ~10 min on 2 cores)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: setup  ## only the slow tests (distributed launches, real signals, whole-data checks)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

test-all: setup  ## every test, slow ones included
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup  ## ruff check and ruff format --check
	$(VENV)/bin/ruff check src tests scripts benchmarks
	$(VENV)/bin/ruff format --check src tests scripts benchmarks

flops: setup  ## Table 1 FLOPs rows, model sizes and Figure 1 into results/flops
	$(PY) scripts/flops.py

data: setup  ## tokenize the configured corpus into data/prepared/ (Hydra overrides in ARGS)
	$(PY) scripts/prepare_data.py $(ARGS)

download: setup  ## fetch inputs into data/cache/ for offline use: make download [WHAT=eval,tokenizer,sample,heldout,pile] [ROOT=dir]
	$(PY) scripts/download.py $(if $(WHAT),--what $(WHAT)) $(if $(ROOT),--root $(ROOT)) $(if $(REVISION),--revision $(REVISION))

eval: setup  ## zero-shot lm-eval, six tasks: make eval [CKPT=dir|hub-id] [REVISION=step93000] [TASKS=piqa,wsc] [LIMIT=n] [NAME=pythia-70m]
	$(PY) scripts/evaluate.py $(if $(CKPT),checkpoint=$(CKPT)) $(if $(REVISION),revision=$(REVISION)) $(if $(TASKS),eval.tasks=[$(TASKS)]) $(if $(LIMIT),eval.limit=$(LIMIT)) $(if $(NAME),model_name=$(NAME))

eval-tasks: setup  ## YAMLs of the six tasks on the local eval files, for lm_eval --include_path eval/tasks/generated
	$(PY) scripts/eval_tasks.py

tables: setup  ## merge eval results into one Table 1 (default: runs/*/eval, runs/eval/*): make tables [RESULTS=a,b]
	$(PY) scripts/make_tables.py $(if $(RESULTS),results=[$(RESULTS)])

# SEEDS=n trains every swept value with seeds 1234 … 1233+n (1234 is the config's seed, so SEEDS=1 is the default).
SWEEP_ARGS = $(if $(SEEDS),seed=$(shell seq -s, 1234 $$((1233 + $(SEEDS))))) $(if $(MODEL),model=$(MODEL)) $(if $(STEPS),train.max_steps=$(STEPS)) $(ARGS)
# The aggregator runs even when a run failed (`;`): the table is always written, and its exit status is make's.
sweep: setup  ## ablation sweep (Tables 3-6): make sweep SWEEP=tau_k|lr|expand_bits|gelu [SEEDS=3] [MODEL=mf-tiny] [STEPS=8000] [ARGS=...]
	@test -n "$(SWEEP)" || { echo "SWEEP=tau_k|lr|expand_bits|gelu is required"; exit 2; }
	$(PY) scripts/pretrain.py -m +sweep=$(SWEEP) $(SWEEP_ARGS); $(PY) scripts/aggregate_sweep.py +sweep=$(SWEEP) $(SWEEP_ARGS)

comma := ,
compare: setup  ## compare runs, seeds grouped: make compare RUNS='runs/a,runs/b-seed*' [OUT=runs/compare] [TITLE=...]
	@test -n "$(RUNS)" || { echo "RUNS=<run dir or glob>,<run dir or glob>,... is required"; exit 2; }
	$(PY) scripts/compare.py $(foreach run,$(subst $(comma), ,$(RUNS)),'$(run)') $(if $(OUT),--output-dir $(OUT)) $(if $(TITLE),--title '$(TITLE)')

study: setup  ## the reproduction study, resumable: make study [PRESET=cpu|gpu] [ARGS="--max-runs 2"]
	$(PY) scripts/study.py --preset $(or $(PRESET),cpu) $(ARGS)

buckets: setup  ## bucket usage of one block (Figure 4): make buckets [CKPT=runs/<run>] [LAYER=0] [ARGS="--text f --max-tokens n"]
	$(PY) scripts/bucket_usage.py $(CKPT) $(if $(LAYER),--layer $(LAYER)) $(ARGS)

bench: setup  ## lookup vs matmul, block, model, training, data -> benchmarks/results/latest.{json,md} (ARGS="--quick")
	$(PY) -m benchmarks.run $(ARGS)

bench-gpu: setup  ## GPU lookup kernels vs nn.Linear/embedding_bag/legacy: fwd, bwd, train step, HBM GB/s (skips without CUDA)
	$(PY) -m benchmarks.bench_gpu $(ARGS)
