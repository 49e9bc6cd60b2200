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

reproduce: setup  ## train a generator briefly on SmolLM2 x 3, then measure it (held-out loss, GSM8K)
	$(PY) -m snakemake --cores $(CORES) --printshellcmds
	@echo; echo "== held-out loss (results/$(RUN)/heldout.json) =="; \
	  $(PY) -c "import json;d=json.load(open('results/$(RUN)/heldout.json'));print({k:d[k] for k in ['problems','scored_tokens','ce_trained','ce_zero_delta','relative_change']})"
	@echo "== GSM8K (results/$(RUN)/gsm8k/summary.json) =="; tail -n 4 logs/$(RUN)/gsm8k_quickstart.log

test: setup  ## the default test suite (CPU, a few minutes)
	$(PY) -m pytest -q

lint: setup
	$(PY) -m snakemake --lint

dry-run: setup
	$(PY) -m snakemake -n

bench-decode: setup  ## receiver decode throughput with transient LoRA vs none (writes results/reference/)
	$(PY) -m tflow.bench_decode --repeats 7 --out results/reference/bench_decode_cpu.csv

clean:
	rm -rf results/runs results/$(RUN) logs benchmarks .snakemake
