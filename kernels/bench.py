"""LoRA-apply microbenchmark: one receiver Linear with per-row 2-sender deltas, side by side.

    python -m tflow_kernels.bench [--out results/reference/bench_kernels_cpu.csv] [--repeats 7]

Shapes: every distinct projection of SmolLM2-135M and Qwen3-4B, at decode (B=8, T=1) and prefill
(B=8, T=128). Variants, all timed in one process, interleaved, minimum over repeats:
  no_lora     the base Linear alone (F.linear)
  loop        per-example loop: one (x A^T) B^T per row, concatenated
  bmm_hooks   TFlow-release style: batched bmm shrink/expand + add (the eager reference)
  peft_lora   peft's LoRA Linear with ONE adapter for the whole batch (a reference point: not per-row)
  cpu_fused   the fused C++ op (CPU only)
  triton      the Triton kernel (CUDA only)
  cpu_fused_bf16 / triton_bf16   the same with bf16 factor storage (lora.factor_dtype=bfloat16)
Reported: microseconds per token (per row at decode), overhead vs no_lora, and the ratio to the
memory-bandwidth floor of the LoRA update alone (bytes of x, factors (fp32, or bf16 for *_bf16)
and out read/written, at the device's measured copy bandwidth). A GPU peak bandwidth can be given
with --peak-gbps.
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

MODELS = {  # name: (hidden, mlp, q_out, kv_out)
    "smollm2-135m": (576, 1536, 576, 192),
    "qwen3-4b": (2560, 9728, 4096, 1024),
}


def projections(model: str) -> dict[str, tuple[int, int]]:
    h, m, q, kv = MODELS[model]
    return {"q_proj": (h, q), "k_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, m), "down_proj": (m, h)}


def _time(fn: Callable[[], object], sync: Callable[[], None], min_seconds: float = 0.05) -> float:
    fn()
    sync()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        if n >= 3 and time.perf_counter() - t0 >= min_seconds:
            break
    sync()
    return (time.perf_counter() - t0) / n


def copy_bandwidth(device: str, sync: Callable[[], None]) -> float:
    """Measured device-memory copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(64 * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = min(_time(lambda: dst.copy_(src), sync, 0.2) for _ in range(3))
    return 2 * src.numel() * 4 / t


def variants(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, device: str):
    """name -> zero-argument callable computing the Linear output with the LoRA update."""
    from peft import LoraConfig, get_peft_model

    from tflow_kernels.reference import TorchBackend

    at, bt = TorchBackend.prepare(a, b, "sum")
    out: dict[str, Callable[[], object]] = {
        "no_lora": lambda: F.linear(x, w),
        "loop": lambda: F.linear(x, w) + torch.cat(
            [(x[i:i + 1].float() @ a[i].T @ b[i].T).to(x.dtype) for i in range(x.shape[0])]),
        "bmm_hooks": lambda: TorchBackend.apply(F.linear(x, w), x, (at, bt), "sum"),
    }
    lin = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0], bias=False)).to(device, x.dtype)
    lin[0].weight.data.copy_(w)
    peft_model = get_peft_model(lin, LoraConfig(r=a.shape[1], lora_alpha=a.shape[1], target_modules=["0"]))
    out["peft_lora"] = lambda: peft_model(x)
    if device == "cpu":
        from tflow_kernels.cpu_fused import CpuFusedBackend

        fused, name = CpuFusedBackend, "cpu_fused"
    else:
        from tflow_kernels.triton_backend import TritonBackend

        fused, name = TritonBackend, "triton"
    for suffix, dtype in (("", torch.float32), ("_bf16", torch.bfloat16)):
        h = fused.prepare(a, b, "sum", dtype)
        out[name + suffix] = lambda h=h: fused.apply(F.linear(x, w), x, h, "sum")
    return out


@torch.no_grad()  # restores the caller's grad mode on return (the test suite calls main in-process)
def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,qwen3-4b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prefill-tokens", type=int, default=128)
    ap.add_argument("--rank", type=int, default=4, help="per sender; 2 senders -> R = 2 * rank")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--peak-gbps", type=float, default=0.0, help="vendor peak bandwidth for a second floor ratio")
    ap.add_argument("--out", help="CSV path")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    dtype = getattr(torch, args.dtype)
    bw = copy_bandwidth(device, sync)
    R = 2 * args.rank
    g = torch.Generator().manual_seed(0)
    rows = []
    for model in args.models.split(","):
        for proj, (d_in, d_out) in projections(model).items():
            for phase, T in (("decode", 1), ("prefill", args.prefill_tokens)):
                B = args.batch
                x = torch.randn(B, T, d_in, generator=g).to(device, dtype)
                w = (torch.randn(d_out, d_in, generator=g) * d_in ** -0.5).to(device, dtype)
                a = (torch.randn(B, R, d_in, generator=g) * 0.01).to(device)
                b = (torch.randn(B, d_out, R, generator=g) * 0.01).to(device)
                fns = variants(x, w, a, b, device)
                best = {k: float("inf") for k in fns}
                for _ in range(args.repeats):
                    for k, fn in fns.items():
                        best[k] = min(best[k], _time(fn, sync))
                # bytes the LoRA update itself must move: x read, factors read (2 bytes each for *_bf16, else 4),
                # out read + written
                io_bytes = x.numel() * x.element_size() + 2 * B * T * d_out * x.element_size()
                for k, t in best.items():
                    extra = t - best["no_lora"]
                    lora_bytes = io_bytes + (a.numel() + b.numel()) * (2 if k.endswith("_bf16") else 4)
                    rows.append({"device": device, "model": model, "proj": proj, "phase": phase, "batch": B, "tokens": T,
                                 "d_in": d_in, "d_out": d_out, "rank_total": R, "dtype": args.dtype, "variant": k,
                                 "us_per_call": t * 1e6, "us_per_token": t * 1e6 / (B * T),
                                 "overhead_vs_no_lora": t / best["no_lora"] - 1,
                                 "lora_us_over_floor": (extra / (lora_bytes / bw)) if k != "no_lora" else float("nan"),
                                 "lora_us_over_peak_floor": (extra / (lora_bytes / (args.peak_gbps * 1e9)))
                                 if args.peak_gbps and k != "no_lora" else float("nan"),
                                 "copy_gbps": bw / 1e9})
                line = "  ".join(f"{k} {v * 1e6:8.1f}us" for k, v in best.items())
                print(f"{model:>13} {proj:>9} {phase:>7}: {line}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(args.out) + ".tmp")
        with open(tmp, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0]))
            wr.writeheader()
            wr.writerows(rows)
        tmp.replace(args.out)
        print(f"wrote {args.out} (copy bandwidth {bw / 1e9:.1f} GB/s)")


if __name__ == "__main__":
    main()
