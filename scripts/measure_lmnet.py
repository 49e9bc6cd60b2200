"""Measure the `lmnet` comparator and its MLP-edge variant on a sender -> receiver pair (default: the offline
Qwen2.5-Coder 0.5B -> 1.5B pair, config/run/qwen_pair.yaml on config/run/cpu.yaml), in one process:

  1. train each edge kind with the shared trainer (TFlow's data, batches, schedule; wall time recorded);
  2. held-out receiver cross-entropy on GSM8K test reference solutions (tflow.data.heldout_gsm8k) with the
     edges vs the receiver alone (same prompt, tflow.mix.receiver_prompt), per problem, with a paired bootstrap
     CI of the per-problem CE difference (tflow.stats.paired_bootstrap_ci);
  3. tokens and seconds per query of each method (and the receiver alone) answering GSM8K test problems.

    python scripts/measure_lmnet.py --out results/reference/lmnet --work results/runs/lmnet_measure \
        --steps 40 --heldout 64 [key=value ...]

The JSON (written after every stage, so an interrupted run keeps what it measured) records the command, the
resolved config and provenance.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from tflow.accounting import Accounting
from tflow.config import load_config
from tflow.data import HELDOUT_SEED, heldout_gsm8k
from tflow.methods.lmnet import LMNet, train_lmnet
from tflow.methods.single import Single
from tflow.mix import receiver_prompt
from tflow.models import shared_backbones
from tflow.stats import paired_bootstrap_ci
from tflow.tasks import get_task
from tflow.tasks.base import subset
from tflow.utils import provenance, write_json_atomic

log = logging.getLogger("measure_lmnet")


@torch.no_grad()
def receiver_alone_nll(method: LMNet, problems: list) -> list[tuple[float, int]]:
    """The receiver alone on the same teacher-forced targets, by the same code as LMNet.reference_nll, with no
    soft tokens."""
    out: list[tuple[float, int]] = []
    none = torch.zeros(0, method.receiver.hidden_size)
    for k in range(0, len(problems), method.cfg.eval.batch_size):
        chunk = problems[k:k + method.cfg.eval.batch_size]
        nll, n = method.nll([none] * len(chunk), [receiver_prompt(p) for p in chunk], [p.solution for p in chunk])
        out += list(zip(nll.tolist(), n.tolist()))
    return out


def per_query(method: Any, problems: list, prompts: list[str], batch: int) -> dict[str, Any]:
    """Mean tokens per agent, processed tokens and seconds per phase per query (after the untimed warm-up)."""
    method.prepare(problems)
    rows: list[Accounting] = []
    for k in range(0, len(problems), batch):
        rows += [o.accounting for o in method.answer(problems[k:k + batch], prompts[k:k + batch])]
    n, tokens, seconds = len(rows), {}, {}
    for r in rows:
        for agent, t in r.tokens.items():
            for kind, v in t.items():
                tokens.setdefault(agent, {}).setdefault(kind, 0.0)
                tokens[agent][kind] += v / n
        for phase, sec in r.seconds.items():
            seconds[phase] = seconds.get(phase, 0.0) + sec / n
    return {"queries": n, "tokens_per_query": tokens, "processed_tokens_per_query": sum(r.processed_tokens for r in rows) / n,
            "seconds_per_query": seconds, "total_seconds_per_query": sum(seconds.values())}


def compare(method: list[tuple[float, int]], alone: list[tuple[float, int]], n_boot: int) -> dict[str, Any]:
    """Per-problem CE (NLL / scored tokens) of a method vs the receiver alone: means, paired CI of the difference,
    and the token-pooled CEs."""
    a = np.array([s / c for s, c in method])
    b = np.array([s / c for s, c in alone])
    lo, hi = paired_bootstrap_ci(a[None], b[None], n_boot=n_boot)
    pooled = lambda xs: sum(s for s, _ in xs) / sum(c for _, c in xs)  # noqa: E731
    return {"problems": len(a), "ce_mean": a.mean(), "ce_receiver_alone_mean": b.mean(), "ce_difference": (a - b).mean(),
            "ce_difference_ci95": [lo, hi], "relative_change": a.mean() / b.mean() - 1,
            "problems_improved": int((a < b).sum()), "ce_pooled": pooled(method), "ce_receiver_alone_pooled": pooled(alone),
            "ppl_pooled": math.exp(pooled(method)), "ppl_receiver_alone_pooled": math.exp(pooled(alone))}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for lmnet_measure.json")
    ap.add_argument("--work", required=True, help="folder for the trained edges")
    ap.add_argument("--config", action="append", default=None, help="run-config layers (default: cpu + qwen_pair)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--heldout", type=int, default=64, help="GSM8K test reference solutions")
    ap.add_argument("--queries", type=int, default=4, help="GSM8K test problems answered for tokens and seconds")
    ap.add_argument("--n-boot", type=int, default=10_000)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    layers = args.config or ["config/run/cpu.yaml", "config/run/qwen_pair.yaml"]
    base = [f"train.steps={args.steps}", "train.batch_size=2", "train.warmup_steps=2", "train.log_every=1",
            "train.ckpt_every=10", "data.max_solution_tokens=128", "eval.batch_size=4", "eval.max_new_tokens=64",
            "eval.method=lmnet", *args.overrides]
    out_path = Path(args.out) / "lmnet_measure.json"
    result: dict[str, Any] = {"command": shlex.join([sys.executable, *sys.argv]), "layers": layers, "overrides": base}
    heldout = None
    task = get_task("gsm8k")
    with shared_backbones():
        for variant, edge in (("lmnet", "transformer"), ("lmnet-mlp", "mlp")):
            cfg = load_config(layers, base + [f"lmnet.edge={edge}", f"train.out_dir={Path(args.work) / variant}",
                                              f"eval.checkpoint={Path(args.work) / variant}"])
            t0 = time.perf_counter()
            folder = train_lmnet(cfg, progress=False)
            train_s = time.perf_counter() - t0
            log.info("%s trained in %.0f s", variant, train_s)
            method, _ = LMNet.build(cfg)
            heldout = heldout or heldout_gsm8k(cfg.data.data_dir, args.heldout)
            t0 = time.perf_counter()
            nll = method.reference_nll(heldout)
            log.info("%s held-out NLL in %.0f s", variant, time.perf_counter() - t0)
            info = json.loads((folder / "trained.json").read_text())
            result[variant] = {"edge": edge, "train_seconds": train_s, "trained": info, "nll": nll}
            result["config"] = OmegaConf.to_container(cfg, resolve=True)
            write_json_atomic(out_path, result)
        alone = receiver_alone_nll(method, heldout)
        result["receiver_alone"] = {"nll": alone}
        for variant in ("lmnet", "lmnet-mlp"):
            result[variant]["heldout"] = compare(result[variant]["nll"], alone, args.n_boot)
        result["heldout"] = {"set": "gsm8k test", "problems": len(heldout), "seed": HELDOUT_SEED,
                             "task_ids": [p.id for p in heldout]}
        write_json_atomic(out_path, result)
        problems = [dataclasses.replace(p, view=task.sender_view(p))
                    for p in subset(task.load(cfg.data.data_dir, "offline")[0], args.queries, 0)]
        prompts = [task.prompt(p) for p in problems]
        result["receiver_alone"]["per_query"] = per_query(Single.build(cfg)[0], problems, prompts, cfg.eval.batch_size)
        for variant, edge in (("lmnet", "transformer"), ("lmnet-mlp", "mlp")):
            cfg = load_config(layers, base + [f"lmnet.edge={edge}", f"eval.checkpoint={Path(args.work) / variant}"])
            result[variant]["per_query"] = per_query(LMNet.build(cfg)[0], problems, prompts, cfg.eval.batch_size)
            write_json_atomic(out_path, result)
    result["provenance"] = provenance(seed=0)
    write_json_atomic(out_path, result)
    log.info("wrote %s", out_path)


if __name__ == "__main__":
    main()
