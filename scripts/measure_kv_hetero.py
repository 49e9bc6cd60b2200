"""kv_hetero's held-out evidence: the receiver's cross-entropy on GSM8K *test* reference solutions after the
transformed cache (context-aware and context-unaware) against the receiver alone (same prompt and targets),
with a paired bootstrap CI over problems of the per-problem mean-token CE difference, and a control: the
context-aware receiver given another problem's sender caches (a seeded derangement), which separates what the
senders communicate from what the trained transformation adds to any query; folded with the trained folder's
summary (parameters, training time) and evaluation runs' per-query tokens and seconds into one JSON.
--reuse takes the per-problem NLLs of an earlier output of the same command (same trained folder and problems)
and computes only the conditions it lacks.

    python scripts/measure_kv_hetero.py --config config/run/cpu.yaml --config config/run/qwen_pair.yaml \
        --trained results/kv_hetero/pair --n 64 --evals results/kv_hetero/eval --out results/reference/kv_hetero/measurement.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tflow.agents import receiver_batch
from tflow.config import load_config
from tflow.data import HELDOUT_SEED, heldout_gsm8k
from tflow.methods.base import derangement, row_nll
from tflow.methods.kv_hetero import KVHetero
from tflow.mix import receiver_prompt, sender_view
from tflow.stats import paired_bootstrap_ci
from tflow.utils import provenance, write_json_atomic


@torch.no_grad()
def receiver_alone_nll(method: KVHetero, problems: list, batch_size: int) -> list[tuple[float, int]]:
    """The receiver alone: its role prompt and the task prompt, then the same (truncated) solution tokens."""
    rec, cfg, out = method.link.receiver, method.cfg, []
    for k in range(0, len(problems), batch_size):
        chunk = problems[k:k + batch_size]
        batch = receiver_batch(rec.tokenizer, cfg.agents.receiver, [receiver_prompt(p) for p in chunk],
                               [p.solution for p in chunk], cfg.data.max_solution_tokens, padding_side="right")
        logits = rec.model(**{k: v.to(rec.device) for k, v in batch.items() if k != "labels"}).logits
        out += list(zip(*row_nll(logits, batch["labels"].to(logits.device))))
    return out


@torch.no_grad()
def shuffled_nll(method: KVHetero, problems: list, batch_size: int) -> list[tuple[float, int]]:
    """Context-aware, each problem's senders reading another problem (derangement, seed 0)."""
    views = [sender_view(problems[j]) for j in derangement(len(problems), 0)]
    out = []
    for k in range(0, len(problems), batch_size):
        res, labels = method.link.scored(problems[k:k + batch_size], "aware", views[k:k + batch_size])
        out += list(zip(*row_nll(res.logits, labels.to(res.logits.device))))
    return out


def summary(nll: list[tuple[float, int]], base: list[tuple[float, int]], baseline: str, n_boot: int) -> dict:
    """CE of a condition and its per-problem difference to `baseline` (paired bootstrap CI over problems)."""
    per = np.array([s / n for s, n in nll])
    ref = np.array([s / n for s, n in base])
    lo, hi = paired_bootstrap_ci(per[None], ref[None], n_boot=n_boot)
    ce = sum(s for s, _ in nll) / sum(n for _, n in nll)
    ce_ref = sum(s for s, _ in base) / sum(n for _, n in base)
    return {"ce_token_weighted": ce, "per_problem_ce_mean": float(per.mean()), "baseline": baseline,
            "relative_change_token_weighted": ce / ce_ref - 1, "diff_per_problem_mean": float((per - ref).mean()),
            "diff_ci95": [lo, hi], "problems_lower_than_baseline": int((per < ref).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", default=[])
    ap.add_argument("--trained", required=True, help="a folder written by python -m tflow.methods.kv_hetero")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--evals", help="folder of tflow.evaluate runs (one subfolder per method) to read per-query cost from")
    ap.add_argument("--n-boot", type=int, default=10_000)
    ap.add_argument("--train-wall-seconds", type=float, help="the trainer's wall-clock, as measured by the caller")
    ap.add_argument("--out", required=True)
    ap.add_argument("--reuse", help="an earlier output of this command: its per-problem NLLs are kept")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    trained = Path(args.trained)
    cfg = load_config(args.config, list(args.overrides) + ["eval.method=kv_hetero", f"eval.checkpoint={trained}"])
    problems = heldout_gsm8k(cfg.data.data_dir, args.n)
    t0 = time.perf_counter()
    method, _ = KVHetero.build(cfg)
    bs = cfg.eval.batch_size
    nll: dict[str, list[tuple[float, int]]] = {}
    if args.reuse:
        old = json.loads(Path(args.reuse).read_text())
        if old["trained"] != str(trained) or old["problems"] != len(problems):
            raise SystemExit(f"--reuse {args.reuse}: another trained folder or number of problems")
        nll = {k: [(s, n) for s, n in v] for k, v in old["per_problem_nll"].items()}
    if "receiver_alone" not in nll:
        nll["receiver_alone"] = receiver_alone_nll(method, problems, bs)
    for ctx in ("aware", "unaware"):
        if ctx not in nll:
            method.cfg.eval.kv_context = ctx
            nll[ctx] = method.reference_nll(problems)
    if "aware_shuffled_senders" not in nll:
        nll["aware_shuffled_senders"] = shuffled_nll(method, problems, bs)
    train = json.loads((trained / "train_summary.json").read_text())
    log = [json.loads(line) for line in (trained / "train_log.jsonl").read_text().splitlines()]
    base = nll["receiver_alone"]
    res = {
        "what": "receiver CE on GSM8K test reference solutions (heldout_gsm8k), kv_hetero vs the receiver alone",
        "sender": method.link.sender.ident, "receiver": method.link.receiver.ident,
        "trained": str(trained), "problems": len(problems), "scored_tokens": sum(n for _, n in base), "heldout_seed": HELDOUT_SEED,
        "receiver_alone": {"ce_token_weighted": sum(s for s, _ in base) / sum(n for _, n in base),
                           "per_problem_ce_mean": float(np.mean([s / n for s, n in base]))},
        "kv_hetero_aware": summary(nll["aware"], base, "receiver_alone", args.n_boot),
        "kv_hetero_unaware": summary(nll["unaware"], base, "receiver_alone", args.n_boot),
        "kv_hetero_aware_shuffled_senders": summary(nll["aware_shuffled_senders"], base, "receiver_alone", args.n_boot),
        "kv_hetero_aware_vs_shuffled_senders": summary(nll["aware"], nll["aware_shuffled_senders"],
                                                       "kv_hetero_aware_shuffled_senders", args.n_boot),
        "ci": "95% percentile bootstrap over problems (tflow.stats.paired_bootstrap_ci) of the mean per-problem "
              "mean-token CE difference, condition - baseline; negative = lower CE than the baseline",
        "trainable_parameters": train["trainable_parameters"],
        "training": {"steps": train["steps"], "batch_size": train["batch_size"], "lr": train["chosen_lr"],
                     "reconstruction_steps": round(cfg.kv.reconstruction_fraction * train["steps"]),
                     "step_seconds_total": sum(r["seconds"] for r in log),
                     "first_reconstruction": next((r["reconstruction"] for r in log if r.get("phase") == 1), None),
                     "last_reconstruction": next((r["reconstruction"] for r in reversed(log) if r.get("phase") == 1), None),
                     "first_ce": next((r["ce"] for r in log if r.get("phase") == 2), None),
                     "last_ce": next((r["ce"] for r in reversed(log) if r.get("phase") == 2), None),
                     "wall_seconds": args.train_wall_seconds},
        "heldout_seconds_this_invocation": time.perf_counter() - t0,
        "per_problem_nll": {k: [[s, n] for s, n in v] for k, v in nll.items()},
    }
    if args.evals:
        res["per_query"] = {}
        for metrics in sorted(Path(args.evals).glob("*/metrics.json")):
            m = json.loads(metrics.read_text())
            res["per_query"][metrics.parent.name] = {
                "problems": m["data"]["subset_size"], "accuracy": m["accuracy"],
                "processed_tokens": m["processed_tokens"]["mean"], "tokens_per_agent": m["tokens_per_agent"]["mean"],
                "seconds": m["seconds"]["mean"], "seconds_per_phase": m["seconds_per_phase"]["mean"],
                "max_new_tokens": m["config"]["eval"]["max_new_tokens"]}
    res["command"] = " ".join(sys.argv)
    res["config"] = {"layers": args.config, "overrides": args.overrides}
    res["provenance"] = provenance()
    write_json_atomic(args.out, res)
    print(json.dumps({k: v for k, v in res.items() if k.startswith(("receiver_alone", "kv_hetero", "aware_own"))}, indent=1))


if __name__ == "__main__":
    main()
