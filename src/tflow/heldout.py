"""Held-out loss: the receiver's per-token cross-entropy on GSM8K *test* reference solutions with
the trained generator's transient LoRA versus delta-W = 0 (same prompt, same hooks).

    python -m tflow.heldout --checkpoint results/runs/quickstart/generator.pt [--n 64] [--out heldout.json]
"""
from __future__ import annotations

import argparse
import logging
import math
from typing import Sequence

import torch
from tqdm.auto import tqdm

from tflow.agents import ConditionCache
from omegaconf import OmegaConf

from tflow.data import HELDOUT_SEED, heldout_gsm8k, load_gsm8k
from tflow.errors import cli
from tflow.infer import TFlowAgents, config_from_checkpoint
from tflow.mix import sender_view
from tflow.train import receiver_loss
from tflow.utils import provenance, write_json_atomic


@torch.no_grad()
def heldout_loss(agents: TFlowAgents, n: int, batch_size: int = 8, progress: bool = True) -> dict:
    cfg = agents.cfg
    problems = heldout_gsm8k(cfg.data.data_dir, n)
    cache = ConditionCache(cfg.model.cache_dir, agents.sender, cfg.agents.max_question_tokens)
    conds = {r: cache.get(agents.sender, r, [sender_view(p) for p in problems]) for r in cfg.agents.senders}
    sums = {"trained": 0.0, "zero": 0.0}
    tokens = 0
    for k in tqdm(range(0, len(problems), batch_size), desc="held-out loss", disable=not progress):
        chunk = problems[k:k + batch_size]
        per_example = [[conds[r][k + i] for r in cfg.agents.senders] for i in range(len(chunk))]
        for key in sums:
            ce, _, _, n_tok = receiver_loss(agents.tflow, agents.receiver, agents.linears, per_example, chunk, cfg,
                                            zero_delta=key == "zero")
            sums[key] += ce.item() * n_tok
        tokens += n_tok
    ce = {k: v / tokens for k, v in sums.items()}
    return {"problems": len(problems), "scored_tokens": tokens, "ce_trained": ce["trained"], "ce_zero_delta": ce["zero"],
            "ppl_trained": math.exp(ce["trained"]), "ppl_zero_delta": math.exp(ce["zero"]),
            "relative_change": ce["trained"] / ce["zero"] - 1}


@cli
def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--n", type=int, default=None, help="problems (default: data.heldout_size)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = config_from_checkpoint(args.checkpoint, args.overrides)
    agents = TFlowAgents(cfg, args.checkpoint)
    res = heldout_loss(agents, args.n or cfg.data.heldout_size, args.batch_size)
    print(f"held-out GSM8K reference solutions: {res['problems']} problems, {res['scored_tokens']} tokens\n"
          f"  receiver CE with the generated LoRA: {res['ce_trained']:.4f} (ppl {res['ppl_trained']:.3f})\n"
          f"  receiver CE with delta-W = 0:        {res['ce_zero_delta']:.4f} (ppl {res['ppl_zero_delta']:.3f})\n"
          f"  relative change: {100 * res['relative_change']:+.2f}%")
    if args.out:
        _, source = load_gsm8k(cfg.data.data_dir, "test")
        write_json_atomic(args.out, {**res, "checkpoint": args.checkpoint, "heldout_seed": HELDOUT_SEED, "data": source,
                                     "config": OmegaConf.to_container(cfg, resolve=True), "provenance": provenance()})


if __name__ == "__main__":
    main()
