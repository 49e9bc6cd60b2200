"""Receiver decode throughput with a transient LoRA versus no LoRA, measured side by side.

    python -m tflow.bench_decode [--batch 8 --new-tokens 32 --repeats 21 --rank 4 --senders 2]

Variants run interleaved in one process (this machine's timings drift by 10-30% between runs),
each `--repeats` times; the minimum per variant is reported, for the whole generate call and
for the decode phase alone (after the first generated token), and the median over repeats of the
decode time paired with that repeat's no-LoRA run. Writes a CSV with --out.

By default the receiver is the run config's backbone (the offline SmolLM2 asset) prompted with
GSM8K questions. `--arch smollm2-135m|qwen3-4b` instead builds that architecture from its config
with RANDOM weights and random prompt ids (no download, no tokenizer): decode timing does not
depend on weight values, and every generation is forced to exactly --new-tokens tokens. The
summary records which receiver was used.
"""
from __future__ import annotations

import argparse
import csv
import logging
import statistics
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
from tflow.utils import DTYPES, provenance, write_json_atomic


# Architectures for --arch (random weights; the published configs' shapes).
ARCHS: dict[str, dict] = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_theta=100000.0),
    "qwen3-4b": dict(model_type="qwen3", hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     tie_word_embeddings=True, max_position_embeddings=40960, rope_theta=1000000.0),
}


def random_receiver(arch: str, dtype: torch.dtype, device: str, batch: int, prompt_tokens: int,
                    seed: int = 0) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A receiver of architecture `arch` with random weights, and a batch of random prompt ids."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(ARCHS[arch])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the target device (4B parameters on a CPU take minutes)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, config.vocab_size - 100, (batch, prompt_tokens), generator=g)
    return model, {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


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
        mods[name] = ModuleDelta(a.to(lin.weight.device), b.to(lin.weight.device))
    return LoraDelta(mode, mods, batch)


@cli
def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--senders", type=int, default=2)
    ap.add_argument("--backends", default="torch,cpu_fused", help="comma-separated LoRA-apply backends to compare")
    ap.add_argument("--arch", choices=sorted(ARCHS), help="random-weight receiver of this architecture instead of "
                    "the config's backbone (see above)")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="prompt length with --arch")
    ap.add_argument("--device", help="with --arch: cuda or cpu (default: cuda when available)")
    ap.add_argument("--out", help="CSV of every timing; a .json summary is written beside it")
    ap.add_argument("overrides", nargs="*", help="run-config key=value (model.receiver.*, backend, lora.targets)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = load_config(overrides=args.overrides)
    if args.arch:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, batch = random_receiver(args.arch, DTYPES[cfg.model.receiver.dtype], device, args.batch,
                                       args.prompt_tokens)
        ident, pad_id = f"random:{args.arch}", 0
    else:
        receiver, _ = load_backbones(cfg)
        model, ident, pad_id = receiver.model, receiver.ident, receiver.tokenizer.pad_token_id
        questions = [p.question for p in load_gsm8k(cfg.data.data_dir, "test")[0][: args.batch]]
        batch = receiver_batch(receiver.tokenizer, cfg.agents.receiver, questions)
        batch = {k: v.to(receiver.device) for k, v in batch.items()}
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    linears = target_linears(model, list(cfg.lora.targets))
    mean = random_delta(linears, args.batch, args.senders, args.rank, "sum")
    variants: dict[str, tuple[LoraDelta | None, str]] = {"no_lora": (None, "")}
    for backend in args.backends.split(","):
        variants[f"mean/{backend}"] = (mean, backend)
    maxd = random_delta(linears, args.batch, args.senders, args.rank, "max")
    for backend in args.backends.split(","):  # cpu_fused has no max path (it calls the torch reference)
        if backend != "cpu_fused":
            variants[f"max/{backend}"] = (maxd, backend)

    def run(delta: LoraDelta | None, backend: str) -> tuple[float, float]:
        timer = PrefillTimer()
        kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                  pad_token_id=pad_id, streamer=timer)
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            if delta is None:
                model.generate(**batch, **kw)
            else:
                with TransientLoRA(linears, delta, backend=backend):
                    model.generate(**batch, **kw)
        sync()
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
    # Paired estimate, robust to this machine's drift: each repeat's decode time over the no-LoRA run of
    # the same repeat (they ran back to back), then the median over repeats.
    paired = {v: statistics.median(r["decode_s"] / b["decode_s"] - 1 for r, b in zip(
        [r for r in rows if r["variant"] == v], [r for r in rows if r["variant"] == "no_lora"])) for v in variants}
    decode_tokens = args.batch * (args.new_tokens - 1)
    # Bytes one decode step must read: every weight once, plus every row's fp32 factors. Their ratio is
    # the overhead a purely bandwidth-bound decode would show (a floor no LoRA-apply path can beat).
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    factor_bytes = sum(args.batch * args.senders * args.rank * (m.in_features + m.out_features) * 4
                       for m in linears.values())
    summary = {"batch": args.batch, "new_tokens": args.new_tokens, "rank": args.rank, "senders": args.senders,
               "targets": list(cfg.lora.targets), "modules": len(linears),
               "receiver": ident, "weights": "random" if args.arch else "trained", "device": str(device),
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               "prompt_tokens": int(batch["input_ids"].shape[1]),
               "dtype": cfg.model.receiver.dtype, "threads": torch.get_num_threads(),
               "weight_bytes": weight_bytes, "factor_bytes_per_step": factor_bytes,
               "bandwidth_floor_overhead": factor_bytes / weight_bytes,
               "variants": {v: {**b, "decode_tokens_per_s": decode_tokens / b["decode_s"],
                                "decode_overhead": b["decode_s"] / base["decode_s"] - 1,
                                "decode_overhead_paired_median": paired[v],
                                "total_overhead": b["total_s"] / base["total_s"] - 1} for v, b in best.items()},
               "config": OmegaConf.to_container(cfg, resolve=True), "provenance": provenance()}
    print(f"\nminimum over {args.repeats} interleaved repeats; batch {args.batch}, {args.new_tokens} new tokens, "
          f"{args.senders} senders x rank {args.rank}, {len(linears)} modules, {cfg.model.receiver.dtype}, "
          f"{torch.get_num_threads()} threads; fp32 factor bytes / weight bytes per decode step "
          f"{100 * factor_bytes / weight_bytes:.1f}% (the overhead of a purely bandwidth-bound decode)")
    for v, s in summary["variants"].items():
        print(f"  {v:>15}: decode {s['decode_tokens_per_s']:7.1f} tok/s  decode overhead {100 * s['decode_overhead']:+6.2f}%"
              f" (paired median {100 * s['decode_overhead_paired_median']:+6.2f}%)"
              f"  whole-generate overhead {100 * s['total_overhead']:+6.2f}%")
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        write_json_atomic(str(args.out).rsplit(".", 1)[0] + ".json", summary)


if __name__ == "__main__":
    main()
