#!/usr/bin/env bash
# CPU-scale harness measurement on SmolLM2-135M x 3: every method and control on a seeded subset of
# each benchmark, then the table (python -m tflow.collect). Needs a generator checkpoint (tflow.train)
# and a static adapter trained on the same config (tflow.static_lora).
#   GEN=results/runs/quickstart/generator.pt STATIC=results/runs/quickstart-static/adapter \
#   N=16 MAX_NEW=256 OUT=results/harness_cpu bash scripts/measure_harness.sh
# Resumable: rerun the same command and finished runs are skipped, interrupted ones continue.
set -euo pipefail
cd "$(dirname "$0")/.."
GEN=${GEN:?generator checkpoint} STATIC=${STATIC:?static adapter folder}
N=${N:-16} MAX_NEW=${MAX_NEW:-256} OUT=${OUT:-results/harness_cpu}
TASKS=${TASKS:-gsm8k math500 mmlu_redux humanevalplus mbppplus}
METHODS=${METHODS:-single textmas-short48 textmas-long tflow tflow_zero_delta tflow_shuffled static_lora ac kv}
CONFIG=${CONFIG:-config/run/cpu.yaml}
for task in $TASKS; do
  for m in $METHODS; do
    args=(eval.task=$task eval.n=$N eval.max_new_tokens=$MAX_NEW eval.out_dir=$OUT/$task/$m)
    case $m in
      textmas-*) args+=(eval.method=textmas eval.textmas_preset=${m#textmas-}) ;;
      tflow*) args+=(eval.method=$m eval.checkpoint=$GEN) ;;
      static_lora) args+=(eval.method=static_lora eval.checkpoint=$STATIC) ;;
      *) args+=(eval.method=$m) ;;
    esac
    echo "== $task / $m"
    python -m tflow.evaluate --config "$CONFIG" "${args[@]}" ${EXTRA:-}
  done
done
python -m tflow.collect "$OUT" --csv "$OUT/summary.csv" --markdown "$OUT/summary.md"
