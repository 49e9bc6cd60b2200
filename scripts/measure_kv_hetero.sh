#!/usr/bin/env bash
# kv_hetero on the offline Qwen2.5-Coder-0.5B -> 1.5B pair, sized for 2 CPU cores (~45 min): train the cache
# transformation (TFlow's data and loop), evaluate per-query cost on GSM8K (single, kv_hetero aware/unaware),
# then the held-out CE against the receiver alone; results/reference/kv_hetero/ gets the JSON and the run's
# config, log and summary.  STEPS=40 N=64 EVAL_N=4 MAX_NEW=64 OUT=results/kv_hetero bash scripts/measure_kv_hetero.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/kv_hetero} REF=${REF:-results/reference/kv_hetero}
STEPS=${STEPS:-40} N=${N:-64} EVAL_N=${EVAL_N:-4} MAX_NEW=${MAX_NEW:-64}
CFG=(--config config/run/cpu.yaml --config config/run/qwen_pair.yaml)
# one thread: on a shared 2-core machine two threads per process thrash (a 0.5B forward 7x slower here)
COMMON=(model.threads=1 data.max_solution_tokens=128 data.validation_size=2)
start=$(date +%s)
python -m tflow.methods.kv_hetero "${CFG[@]}" "${COMMON[@]}" train.steps="$STEPS" train.batch_size=2 \
  train.warmup_steps=4 train.log_every=1 train.ckpt_every=10 train.out_dir="$OUT/pair" --no-progress
wall=$(( $(date +%s) - start ))
for m in single kv_hetero-aware kv_hetero-unaware; do
  args=(eval.task=gsm8k eval.n="$EVAL_N" eval.max_new_tokens="$MAX_NEW" eval.batch_size="$EVAL_N" eval.out_dir="$OUT/eval/$m")
  case $m in
    kv_hetero-*) args+=(eval.method=kv_hetero eval.kv_context="${m#kv_hetero-}" eval.checkpoint="$OUT/pair") ;;
    *) args+=(eval.method="$m") ;;
  esac
  python -m tflow.evaluate "${CFG[@]}" "${COMMON[@]}" "${args[@]}"
done
mkdir -p "$REF"
python scripts/measure_kv_hetero.py "${CFG[@]}" --trained "$OUT/pair" --n "$N" --evals "$OUT/eval" \
  --train-wall-seconds "$wall" --out "$REF/measurement.json" "${COMMON[@]}"
cp "$OUT/pair/config.yaml" "$OUT/pair/train_log.jsonl" "$OUT/pair/train_summary.json" "$REF/"
