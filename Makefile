# Two entry points (see README): `make reproduce` and `make test`. Both set everything up first.
VENV ?= .venv
CORES ?= 2
ifeq ($(TFLOW_USE_CURRENT_ENV),1)
BIN :=
else
BIN := $(abspath $(VENV))/bin/
export PATH := $(abspath $(VENV))/bin:$(PATH)
endif
PY := $(BIN)python
RUN := $(shell sed -n 's/^run_name: *\([^ #]*\).*/\1/p' config/config.yaml)

.PHONY: setup reproduce test lint dry-run bench-decode clean

setup:
	@VENV=$(VENV) scripts/setup.sh

reproduce: setup  ## the whole default DAG (config/config.yaml): data, training, every evaluation, stats, paper/
	$(PY) -m snakemake --cores $(CORES)
	@echo; echo "== main family (results/$(RUN)/stats/cells.csv; tables in paper/tables/, figures in paper/figures/) =="
	@$(PY) -c "import pandas as pd; d=pd.read_csv('results/$(RUN)/stats/cells.csv'); d=d[d.family=='main']; \
	  print(d[['task','method','n_problems','n_seeds','score_mean','score_ci_low','score_ci_high','delta','p_holm','tokens_mean']].to_string(index=False, float_format=lambda x: f'{x:.3g}'))"

test: setup  ## the default test suite (CPU, a few minutes)
	$(PY) -m pytest -q

lint: setup
	$(PY) -m snakemake --lint

dry-run: setup
	$(PY) -m snakemake -n

bench-decode: setup  ## receiver decode throughput with transient LoRA vs none (writes results/reference/)
	$(PY) -m tflow.bench_decode --out results/reference/bench_decode_cpu.csv
	$(PY) -m tflow.bench_decode --batch 1 --out results/reference/bench_decode_cpu_batch1.csv

clean:  ## remove the default run's outputs (results/<run>, logs, benchmarks, generated paper files)
	rm -rf results/$(RUN) logs/$(RUN) benchmarks/$(RUN) paper/tables paper/figures/*.p?? paper/generated paper/main.pdf .snakemake
