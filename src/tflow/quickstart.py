"""A small end-to-end check of a trained generator: answer GSM8K test problems with TFlow and with
the delta-W = 0 control (same receiver prompt, same senders, same hooks), score, and account.

    python -m tflow.quickstart --checkpoint results/runs/quickstart/generator.pt --n 16 --out results/quickstart

Writes records.jsonl (one line per problem and variant) and summary.json (accuracy, tokens per
agent, seconds per phase, provenance). The full benchmark harness supersedes this for tables.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path
from typing import Sequence

from omegaconf import OmegaConf
from tqdm.auto import tqdm

from tflow.data import load_gsm8k
from tflow.errors import cli
from tflow.infer import TFlowAgents, config_from_checkpoint
from tflow.tasks.gsm8k import extract_answer, is_correct
from tflow.utils import provenance, write_json_atomic, write_text_atomic

VARIANTS = {"tflow": False, "tflow_zero_delta": True}  # name -> zero_delta


@cli
def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--n", type=int, default=16, help="GSM8K test problems (a seeded sample)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = config_from_checkpoint(args.checkpoint, args.overrides)
    agents = TFlowAgents(cfg, args.checkpoint)
    test, source = load_gsm8k(cfg.data.data_dir, "test")
    problems = random.Random(args.seed).sample(test, args.n)
    records = []
    bar = tqdm(total=len(problems) * len(VARIANTS), desc="GSM8K quickstart")
    for k in range(0, len(problems), args.batch_size):
        chunk = problems[k:k + args.batch_size]
        for variant, zero in VARIANTS.items():
            answers = agents.answer([p.question for p in chunk], args.max_new_tokens, zero_delta=zero)
            for p, a in zip(chunk, answers):
                pred = extract_answer(a.text)
                records.append({"task_id": p.id, "method": variant, "prediction": a.text, "extracted": pred,
                                "gold": p.answer, "correct": is_correct(pred, p.answer), "truncated": a.truncated,
                                **a.accounting.to_dict()})
            bar.update(len(chunk))
    bar.close()
    summary = {}
    for variant in VARIANTS:
        rows = [r for r in records if r["method"] == variant]
        agents_tokens: dict[str, dict[str, float]] = {}
        for r in rows:
            for agent, t in r["tokens"].items():
                d = agents_tokens.setdefault(agent, {"prompt": 0, "generated": 0})
                d["prompt"] += t["prompt"] / len(rows)
                d["generated"] += t["generated"] / len(rows)
        phases = {ph: sum(r["seconds"].get(ph, 0.0) for r in rows) / len(rows) for ph in rows[0]["seconds"]}
        summary[variant] = {"n": len(rows), "accuracy": sum(r["correct"] for r in rows) / len(rows),
                            "truncated": sum(r["truncated"] for r in rows) / len(rows),
                            "mean_processed_tokens": sum(r["processed_tokens"] for r in rows) / len(rows),
                            "mean_tokens_per_agent": agents_tokens, "mean_seconds_per_phase": phases}
    out = Path(args.out)
    write_text_atomic(out / "records.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    write_json_atomic(out / "summary.json", {"variants": summary, "checkpoint": args.checkpoint, "seed": args.seed,
                                             "max_new_tokens": args.max_new_tokens, "data": source,
                                             "config": OmegaConf.to_container(cfg, resolve=True),
                                             "provenance": provenance()})
    print(f"\nGSM8K test, {args.n} problems (seed {args.seed}), greedy, max {args.max_new_tokens} new tokens")
    for variant, s in summary.items():
        print(f"  {variant:>17}: accuracy {s['accuracy']:.3f}  truncated {s['truncated']:.2f}  "
              f"processed tokens/problem {s['mean_processed_tokens']:.0f}  seconds/problem "
              + ", ".join(f"{ph} {sec:.2f}" for ph, sec in s["mean_seconds_per_phase"].items()))
        print("  " + " " * 19 + "tokens/problem by agent: "
              + ", ".join(f"{a} {t['prompt']:.0f}+{t['generated']:.0f}" for a, t in s["mean_tokens_per_agent"].items()))


if __name__ == "__main__":
    main()
