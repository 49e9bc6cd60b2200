"""Receiver decode throughput with a transient LoRA versus no LoRA, measured side by side.

    python -m tflow.bench_decode [--batch 8 --new-tokens 64 --repeats 5 --rank 4 --senders 2]

Variants run interleaved in one process (this machine's timings drift by +-10% between runs),
each `--repeats` times; the minimum per variant is reported, for the whole generate call and
for the decode phase alone (after the first generated token). Writes a CSV with --out.
"""
from __future__ import annotations

import argparse
import csv
import logging
import time
from typing import Sequence

import torch
from omegaconf import OmegaConf

from tflow.accounting import PrefillTimer
from tflow.agents import receiver_batch
from tflow.config import load_config
from tflow.data import load_gsm8k
from tflow.errors import cli
from tflow.fusion import LoraDelta, ModuleDelta
from tflow.lora import TransientLoRA
from tflow.models import target_linears
from tflow.pipeline import load_backbones
from tflow.utils import provenance, write_json_atomic


def random_delta(linears: dict[str, torch.nn.Linear], batch: int, senders: int, rank: int, mode: str,
                 seed: int = 0) -> LoraDelta:
    """Non-zero per-row factors with the generator's shapes (values do not affect the timing)."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for name, lin in linears.items():
        if mode == "sum":  # [B, S*r, d_in], [B, d_out, S*r]
            a = torch.randn(batch, senders * rank, lin.in_features, generator=g) * 0.01
            b = torch.randn(batch, lin.out_features, senders * rank, generator=g) * 0.01
        else:  # [B, S, r, d_in], [B, S, d_out, r]
            a = torch.randn(batch, senders, rank, lin.in_features, generator=g) * 0.01
            b = torch.randn(batch, senders, lin.out_features, rank, generator=g) * 0.01
        mods[name] = ModuleDelta(a, b)
    return LoraDelta(mode, mods, batch)


@cli
def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--senders", type=int, default=2)
    ap.add_argument("--backends", default="torch,cpu_fused", help="comma-separated LoRA-apply backends to compare")
    ap.add_argument("--out", help="CSV of every timing; a .json summary is written beside it")
    ap.add_argument("overrides", nargs="*", help="run-config key=value (model.receiver.*, backend, lora.targets)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = load_config(overrides=args.overrides)
    receiver, _ = load_backbones(cfg)
    linears = target_linears(receiver.model, list(cfg.lora.targets))
    questions = [p.question for p in load_gsm8k(cfg.data.data_dir, "test")[0][: args.batch]]
    batch = receiver_batch(receiver.tokenizer, cfg.agents.receiver, questions)
    batch = {k: v.to(receiver.device) for k, v in batch.items()}
    mean = random_delta(linears, args.batch, args.senders, args.rank, "sum")
    variants: dict[str, tuple[LoraDelta | None, str]] = {"no_lora": (None, "")}
    for backend in args.backends.split(","):
        variants[f"mean/{backend}"] = (mean, backend)
    variants["max/torch"] = (random_delta(linears, args.batch, args.senders, args.rank, "max"), "torch")

    def run(delta: LoraDelta | None, backend: str) -> tuple[float, float]:
        timer = PrefillTimer()
        kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                  pad_token_id=receiver.tokenizer.pad_token_id, streamer=timer)
        t0 = time.perf_counter()
        with torch.no_grad():
            if delta is None:
                receiver.model.generate(**batch, **kw)
            else:
                with TransientLoRA(linears, delta, backend=backend):
                    receiver.model.generate(**batch, **kw)
        total = time.perf_counter() - t0
        return total, timer.split()[1]

    for delta, backend in variants.values():  # warm-up (and the cpu_fused build)
        run(delta, backend)
    rows = []
    for rep in range(args.repeats):
        for name, (delta, backend) in variants.items():
            total, decode = run(delta, backend)
            rows.append({"variant": name, "repeat": rep, "total_s": total, "decode_s": decode})
            print(f"repeat {rep} {name:>15}: total {total:.3f} s, decode {decode:.3f} s")
    best = {v: {k: min(r[k] for r in rows if r["variant"] == v) for k in ("total_s", "decode_s")} for v in variants}
    base = best["no_lora"]
    decode_tokens = args.batch * (args.new_tokens - 1)
    summary = {"batch": args.batch, "new_tokens": args.new_tokens, "rank": args.rank, "senders": args.senders,
               "targets": list(cfg.lora.targets), "modules": len(linears),
               "receiver": receiver.ident, "dtype": cfg.model.receiver.dtype, "threads": torch.get_num_threads(),
               "variants": {v: {**b, "decode_tokens_per_s": decode_tokens / b["decode_s"],
                                "decode_overhead": b["decode_s"] / base["decode_s"] - 1,
                                "total_overhead": b["total_s"] / base["total_s"] - 1} for v, b in best.items()},
               "config": OmegaConf.to_container(cfg, resolve=True), "provenance": provenance()}
    print(f"\nminimum over {args.repeats} interleaved repeats; batch {args.batch}, {args.new_tokens} new tokens, "
          f"{args.senders} senders x rank {args.rank}, {len(linears)} modules, {cfg.model.receiver.dtype}, "
          f"{torch.get_num_threads()} threads")
    for v, s in summary["variants"].items():
        print(f"  {v:>15}: decode {s['decode_tokens_per_s']:7.1f} tok/s  decode overhead {100 * s['decode_overhead']:+6.2f}%"
              f"  whole-generate overhead {100 * s['total_overhead']:+6.2f}%")
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        write_json_atomic(str(args.out).rsplit(".", 1)[0] + ".json", summary)


if __name__ == "__main__":
    main()
