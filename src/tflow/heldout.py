"""Held-out evidence: per problem, the receiver's teacher-forced cross-entropy on the reference solution of
a held-out test problem, under one method (the DAG's `heldout` families; the same command line as
tflow.evaluate):

    python -m tflow.heldout --config config/run/cpu.yaml eval.task=gsm8k eval.method=tflow \\
        eval.checkpoint=results/runs/cpu/generator.pt eval.n=64 eval.out_dir=results/heldout/gsm8k/tflow

The problems are the task's seeded subset (eval.n, eval.subset_seed), never trained on (the training mix
is decontaminated against every evaluation set); the reference solution is formatted as the receiver is
asked to answer (Task.reference), and the receiver reads the problem exactly as in training and
evaluation (its task prompt; the senders its sender view). Every method that implements
`reference_nll` can be scored: the receiver alone (single), TFlow, its zero-update and shuffled-condition
controls, the static LoRA, and the trained comparators. One line per problem in records.jsonl (summed
token NLL, scored tokens, their ratio `ce`), metrics.json with the token-weighted and per-problem means.
Resumable like tflow.evaluate; another config in the same folder is an error (or, with
--restart-on-change, discarded).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import math
import shlex
import time
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from tflow.config import config_hash, load_config
from tflow.data import Problem
from tflow.errors import ConfigError, cli
from tflow.evaluate import check_config, finished_batches
from tflow.methods import build_method
from tflow.models import shared_backbones
from tflow.tasks import get_task, subset
from tflow.utils import folder_lock, provenance, seed_everything, write_json_atomic

log = logging.getLogger(__name__)


def reference_problems(task_name: str, data_dir: str, source: str, n: int | None, subset_seed: int
                       ) -> tuple[list[Problem], dict[str, Any]]:
    """The task's seeded subset as training-style problems whose target is the reference solution."""
    task = get_task(task_name)
    every, info = task.load(data_dir, source)
    chosen = subset(every, n, subset_seed)
    problems = [Problem(p.task_id, p.question, task.reference(p), p.gold, task=task_name) for p in chosen]
    if any(p.solution is None for p in problems):
        raise ConfigError(f"task {task_name!r} has no reference solutions; the held-out family needs one with them "
                          "(gsm8k, math500, minerva_math, humanevalplus, mbppplus)")
    return problems, {**info, "eval_problems": chosen}


def heldout(cfg: DictConfig, layers: Sequence[Any] = (), overrides: Sequence[str] = (),
            restart_on_change: bool = False) -> dict[str, Any]:
    """Score (or resume scoring) the reference solutions under the configured method; returns metrics.json."""
    ev = cfg.eval
    out = Path(ev.out_dir)
    problems, source = reference_problems(ev.task, cfg.data.data_dir, ev.source, ev.n, ev.subset_seed)
    with folder_lock(out):  # before any model loads: a second run on this folder fails at once
        return _heldout(cfg, out, problems, source, layers, overrides, restart_on_change)


def _heldout(cfg: DictConfig, out: Path, problems: list[Problem], source: dict[str, Any], layers: Sequence[Any],
             overrides: Sequence[str], restart_on_change: bool) -> dict[str, Any]:
    ev = cfg.eval
    eval_problems = source.pop("eval_problems")
    method, run_cfg = build_method(cfg, layers, overrides)
    eval_problems = [dataclasses.replace(p, view=get_task(ev.task).sender_view(p)) for p in eval_problems]
    if not hasattr(method, "reference_nll"):
        raise ConfigError(f"method {ev.method!r} cannot score reference solutions (no reference_nll)")
    out.mkdir(parents=True, exist_ok=True)
    check_config(out, run_cfg, restart_on_change)
    records_path = out / "records.jsonl"
    batches = [problems[k:k + ev.batch_size] for k in range(0, len(problems), ev.batch_size)]
    done = finished_batches(records_path, [eval_problems[k:k + ev.batch_size] for k in range(0, len(problems), ev.batch_size)])
    todo = [b for b in batches if b[0].id not in done]
    seed_everything(ev.seed)
    method.prepare(eval_problems)
    t0 = time.perf_counter()
    with open(records_path, "a", encoding="utf-8") as f, \
            tqdm(total=len(problems), initial=len(done), desc=f"heldout {ev.task}/{ev.method}") as bar:
        for chunk in todo:
            t1 = time.perf_counter()
            scores = method.reference_nll(chunk)
            share = (time.perf_counter() - t1) / len(chunk)
            for p, (nll, tokens) in zip(chunk, scores):
                rec = {"task_id": p.id, "method": ev.method, "nll": nll, "tokens_scored": int(tokens),
                       "ce": nll / max(int(tokens), 1), "seconds_total": share}
                done[p.id] = rec
                f.write(json.dumps(rec) + "\n")
            f.flush()
            bar.update(len(chunk))
    records = [done[p.id] for p in problems]
    nll, tokens = sum(r["nll"] for r in records), sum(r["tokens_scored"] for r in records)
    metrics = {"task": ev.task, "method": ev.method, "kind": "heldout", "n": len(records),
               "ce_token_weighted": nll / max(tokens, 1), "ce_per_problem_mean": sum(r["ce"] for r in records) / len(records),
               "ppl_token_weighted": math.exp(nll / max(tokens, 1)), "scored_tokens": tokens,
               "run_seconds_this_invocation": time.perf_counter() - t0,
               "resumed_from": len(problems) - sum(len(b) for b in todo),
               "data": {**source, "subset_seed": ev.subset_seed, "subset_size": len(problems),
                        "task_ids": [p.id for p in problems]},
               "config": OmegaConf.to_container(run_cfg, resolve=True), "config_hash": config_hash(run_cfg),
               "provenance": provenance(seed=ev.seed)}
    write_json_atomic(out / "metrics.json", metrics)
    return metrics


@cli
def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", default=[], help="run-config YAML layer (repeatable)")
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. eval.task=gsm8k eval.method=tflow eval.n=64")
    ap.add_argument("--each", action="append", default=[], metavar="'K=V K=V'",
                    help="one run's own overrides on top of the shared ones (repeatable: runs one after another)")
    ap.add_argument("--restart-on-change", action="store_true",
                    help="discard results of another config in eval.out_dir instead of failing (the workflow's reruns)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    runs = [[*args.overrides, *shlex.split(own)] for own in args.each] or [list(args.overrides)]
    cfgs = [load_config(args.config, ov) for ov in runs]
    share = len(cfgs) > 1 and all(c.eval.method != "static_lora" for c in cfgs)
    with shared_backbones() if share else contextlib.nullcontext():
        for cfg, ov in zip(cfgs, runs):
            m = heldout(cfg, args.config, ov, args.restart_on_change)
            print(f"{m['task']} / {m['method']}: held-out CE {m['ce_token_weighted']:.4f} (per-problem mean "
                  f"{m['ce_per_problem_mean']:.4f}) on {m['n']} reference solutions; wrote {cfg.eval.out_dir}/metrics.json",
                  flush=True)
            del m
            gc.collect()


if __name__ == "__main__":
    main()
