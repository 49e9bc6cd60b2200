"""Receiver decode throughput with a transient LoRA versus no LoRA, measured side by side.

    python -m tflow.bench_decode [--batch 8 --new-tokens 32 --repeats 21 --rank 4 --senders 2 --steps 200
                               --bf16-factors cpu_fused --out results/reference/bench_decode_cpu.csv]

Two estimates, both with every variant interleaved in one process (this machine's speed drifts: in
the committed batch-8 run the no-LoRA step alone spans 45-63 ms between its 5th and 95th
percentiles, and whole runs differ by 10-30%):
- single decode steps (the primary one, `--steps` rounds): each round times one decode step of
  every variant from the same prompt KV cache, after a cache flush; the overhead is the median of
  the per-round ratios to the no-LoRA step, with a 95% bootstrap CI;
- whole `generate` calls (`--repeats`): the minimum per variant, for the whole call and for the
  decode phase alone (after the first generated token), and the median over repeats of the decode
  time paired with that repeat's no-LoRA run.
With --out: a CSV of the generate timings, `<out>_steps.csv` of the step timings and a .json
summary of both.

By default the receiver is the run config's backbone (the offline SmolLM2 asset) prompted with
GSM8K questions. `--arch smollm2-135m|qwen3-4b` instead builds that architecture from its config
with RANDOM weights and random prompt ids (no download, no tokenizer): decode timing does not
depend on weight values, and every generation is forced to exactly --new-tokens tokens. The
summary records which receiver was used.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import statistics
import time
from typing import Callable, Sequence

import torch
from omegaconf import OmegaConf

from tflow.accounting import PrefillTimer
from tflow.agents import receiver_batch
from tflow.config import load_config
from tflow.data import load_gsm8k
from tflow.errors import cli
from tflow.fusion import LoraDelta, ModuleDelta
from tflow.lora import TransientLoRA
from tflow.models import DTYPES, load_backbones, target_linears
from tflow.stats import median_ci
from tflow.utils import atomic_path, provenance, write_json_atomic


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


def lora_context(linears: dict[str, torch.nn.Linear], delta: LoraDelta | None, backend: str,
                 factor_dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """The transient LoRA of one benchmark variant; no_lora (delta None) runs under a null context."""
    if delta is None:
        return contextlib.nullcontext()
    return TransientLoRA(linears, delta, backend=backend, factor_dtype=factor_dtype)


def step_overheads(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                   contexts: dict[str, Callable[[], contextlib.AbstractContextManager]], steps: int,
                   sync: Callable[[], None]) -> dict[str, list[float]]:
    """Seconds of single decode steps (one new token per row over the prompt's KV cache), per variant,
    interleaved step by step: round i runs every variant once, in a rotated order, each after a cache
    flush and from the same cache (cropped back to the prompt after every step). Pairing per round
    cancels this machine's drift (the no-LoRA step alone spans tens of percent over a run). contexts:
    name -> a zero-argument factory of the context manager to time under (see `lora_context`)."""
    device = batch["input_ids"].device
    flush = torch.empty(64 * 2**20 // 4, device=device)  # 64 MiB > the L3 cache: no variant starts hot
    with torch.no_grad():
        out = model(**batch, use_cache=True)
    cache, prompt_len = out.past_key_values, batch["input_ids"].shape[1]
    step = {"input_ids": out.logits[:, -1:].argmax(-1),
            "attention_mask": torch.cat([batch["attention_mask"], batch["attention_mask"].new_ones(
                batch["input_ids"].shape[0], 1)], 1)}
    names = list(contexts)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(steps + 1):  # round 0 warms up every variant
        for name in names[i % len(names):] + names[:i % len(names)]:
            with torch.no_grad(), contexts[name]():
                flush.fill_(float(i))
                sync()
                t0 = time.perf_counter()
                model(**step, past_key_values=cache, use_cache=True)
                sync()
                if i:
                    times[name].append(time.perf_counter() - t0)
            cache.crop(-1)  # back to the prompt (negative: tokens to remove, in every transformers version)
            if cache.get_seq_length() != prompt_len:
                raise RuntimeError(f"KV cache holds {cache.get_seq_length()} tokens after crop, not {prompt_len}")
    return times


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
    ap.add_argument("--steps", type=int, default=200, help="rounds of the step-interleaved decode-step timing "
                    "(the primary overhead estimate; 0 skips it)")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--senders", type=int, default=2)
    ap.add_argument("--backends", default="torch,cpu_fused", help="comma-separated LoRA-apply backends to compare")
    ap.add_argument("--bf16-factors", default="cpu_fused", help="comma-separated backends also timed with bf16 factor "
                    "storage (lora.factor_dtype=bfloat16; variant 'mean/BACKEND+bf16'); '' for none")
    ap.add_argument("--arch", choices=sorted(ARCHS), help="random-weight receiver of this architecture instead of "
                    "the config's backbone (see above)")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="prompt length with --arch")
    ap.add_argument("--device", help="with --arch: cuda or cpu (default: cuda when available)")
    ap.add_argument("--out", help="CSV of every timing; a .json summary is written beside it")
    ap.add_argument("overrides", nargs="*", help="run-config key=value (model.receiver.*, backend, lora.targets)")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.steps < 0 or args.new_tokens < 2:
        ap.error("need --repeats >= 1, --steps >= 0 and --new-tokens >= 2 (decode starts after the first token)")
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
    f32, bf16 = torch.float32, torch.bfloat16
    variants: dict[str, tuple[LoraDelta | None, str, torch.dtype]] = {"no_lora": (None, "", f32)}
    for backend in args.backends.split(","):
        variants[f"mean/{backend}"] = (mean, backend, f32)
    for backend in filter(None, args.bf16_factors.split(",")):
        variants[f"mean/{backend}+bf16"] = (mean, backend, bf16)
    maxd = random_delta(linears, args.batch, args.senders, args.rank, "max")
    for backend in args.backends.split(","):  # cpu_fused has no max path (it calls the torch reference)
        if backend != "cpu_fused":
            variants[f"max/{backend}"] = (maxd, backend, f32)

    def run(delta: LoraDelta | None, backend: str, factor_dtype: torch.dtype) -> tuple[float, float]:
        timer = PrefillTimer()
        kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                  pad_token_id=pad_id, streamer=timer)
        sync()
        t0 = time.perf_counter()
        with torch.no_grad(), lora_context(linears, delta, backend, factor_dtype):
            model.generate(**batch, **kw)
        sync()
        total = time.perf_counter() - t0
        return total, timer.split()[1]

    for variant in variants.values():  # warm-up (and the cpu_fused build)
        run(*variant)
    rows = []
    for rep in range(args.repeats):
        for name, variant in variants.items():
            total, decode = run(*variant)
            rows.append({"variant": name, "repeat": rep, "total_s": total, "decode_s": decode})
            print(f"repeat {rep} {name:>15}: total {total:.3f} s, decode {decode:.3f} s")
    steps: dict[str, list[float]] = {}
    if args.steps:
        contexts = {name: (lambda v=v: lora_context(linears, *v)) for name, v in variants.items()}
        steps = step_overheads(model, batch, contexts, args.steps, sync)
    step_summary = {}
    for v, ts in steps.items():
        ratios = [t / b - 1 for t, b in zip(ts, steps["no_lora"])]
        med, lo, hi = median_ci(ratios) if v != "no_lora" else (0.0, 0.0, 0.0)
        step_summary[v] = {"step_ms_median": 1e3 * statistics.median(ts), "step_overhead_median": med,
                           "step_overhead_ci95": [lo, hi], "rounds": len(ts)}
    best = {v: {k: min(r[k] for r in rows if r["variant"] == v) for k in ("total_s", "decode_s")} for v in variants}
    base = best["no_lora"]
    # Paired estimate, robust to this machine's drift: each repeat's decode time over the no-LoRA run of
    # the same repeat (they ran back to back), then the median over repeats.
    paired = {v: statistics.median(r["decode_s"] / b["decode_s"] - 1 for r, b in zip(
        [r for r in rows if r["variant"] == v], [r for r in rows if r["variant"] == "no_lora"])) for v in variants}
    decode_tokens = args.batch * (args.new_tokens - 1)
    # Bytes one decode step must read: every weight once, plus every row's factors (fp32; half with bf16
    # storage). Their ratio is the overhead a purely bandwidth-bound decode would show (a floor no LoRA-apply
    # path can beat).
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
               "bandwidth_floor_overhead_bf16_factors": factor_bytes / 2 / weight_bytes,
               "variants": {v: {**b, "decode_tokens_per_s": decode_tokens / b["decode_s"],
                                "decode_overhead": b["decode_s"] / base["decode_s"] - 1,
                                "decode_overhead_paired_median": paired[v],
                                "total_overhead": b["total_s"] / base["total_s"] - 1,
                                **step_summary.get(v, {})} for v, b in best.items()},
               "config": OmegaConf.to_container(cfg, resolve=True), "provenance": provenance()}
    print(f"\nminimum over {args.repeats} interleaved repeats; batch {args.batch}, {args.new_tokens} new tokens, "
          f"{args.senders} senders x rank {args.rank}, {len(linears)} modules, {cfg.model.receiver.dtype}, "
          f"{torch.get_num_threads()} threads; fp32 factor bytes / weight bytes per decode step "
          f"{100 * factor_bytes / weight_bytes:.1f}%, bf16 factors {50 * factor_bytes / weight_bytes:.1f}% "
          "(the overhead of a purely bandwidth-bound decode)")
    for v, s in summary["variants"].items():
        print(f"  {v:>19}: decode {s['decode_tokens_per_s']:7.1f} tok/s  decode overhead {100 * s['decode_overhead']:+6.2f}%"
              f" (paired median {100 * s['decode_overhead_paired_median']:+6.2f}%)"
              f"  whole-generate overhead {100 * s['total_overhead']:+6.2f}%")
    if steps:
        print(f"single decode steps over the prompt's cache, {args.steps} interleaved rounds; overhead = median of "
              "per-round paired ratios [95% bootstrap CI]")
        for v, s in step_summary.items():
            print(f"  {v:>19}: step {s['step_ms_median']:6.1f} ms  overhead {100 * s['step_overhead_median']:+6.2f}% "
                  f"[{100 * s['step_overhead_ci95'][0]:+.2f}, {100 * s['step_overhead_ci95'][1]:+.2f}]")
    if args.out:
        stem = str(args.out).rsplit(".", 1)[0]
        with atomic_path(args.out) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        if steps:
            with atomic_path(stem + "_steps.csv") as tmp, open(tmp, "w", newline="") as f:
                csv.writer(f).writerows([["variant", "round", "step_s"],
                                         *([v, i, t] for v, ts in steps.items() for i, t in enumerate(ts))])
        write_json_atomic(stem + ".json", summary)


if __name__ == "__main__":
    main()
