#!/usr/bin/env bash
# GPU checks for the LoRA-apply kernels, on a CUDA machine with torch, triton, transformers and
# peft already installed (e.g. a lent accelerator; no network needed):
#   bash scripts/gpu_checks.sh OUTDIR
# 1. the kernel tests natively on the GPU (test_triton.py: fp32/fp16 matrix + bf16 Qwen3-4B shapes;
#    test_kernels.py: every backend inside TransientLoRA vs the reference),
# 2. the kernel microbenchmark (SmolLM2-135M and Qwen3-4B projection shapes, decode and prefill),
# 3. end-to-end receiver decode with transient LoRA vs none (triton with fp32 and bf16 factor
#    storage), random-weight SmolLM2-135M and Qwen3-4B architectures (2 senders x rank 4, all 7
#    linears, batch 8).
# Writes logs, CSVs and JSON summaries into OUTDIR. Packages missing there (omegaconf) may be
# given as wheels in .whl/ (installed into /tmp/site, never into the system).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_checks.sh OUTDIR}
mkdir -p "$out" /tmp/tflow_pp
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
ln -sfn "$PWD/src/tflow" /tmp/tflow_pp/tflow          # the package layout of pyproject.toml,
ln -sfn "$PWD/kernels" /tmp/tflow_pp/tflow_kernels    # without an install
export PYTHONPATH=/tmp/tflow_pp${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export TFLOW_DATA_DIR=${TFLOW_DATA_DIR:-/nonexistent}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$out/gpu.txt"
status=0
python3 -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_kernels.py 2>&1 | tee "$out/gpu_tests.log" || status=1
python3 -m tflow_kernels.bench --repeats 5 --peak-gbps "${PEAK_GBPS:-3350}" --out "$out/bench_kernels_cuda.csv" \
  2>&1 | tee "$out/bench_kernels_cuda.log" || status=1
for arch in ${ARCHS:-smollm2-135m qwen3-4b}; do
  python3 -m tflow.bench_decode --arch "$arch" --backends torch,triton --bf16-factors triton --repeats "${REPEATS:-5}" \
    --new-tokens "${NEW_TOKENS:-64}" --out "$out/bench_decode_cuda_$arch.csv" model.receiver.device=cuda \
    2>&1 | tee "$out/bench_decode_cuda_$arch.log" || status=1
done
exit $status
