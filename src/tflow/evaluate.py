"""Evaluate one method on one benchmark: a JSON line per problem and a metrics.json.

    python -m tflow.evaluate --config config/run/cpu.yaml eval.task=gsm8k eval.method=single \\
        eval.n=32 eval.out_dir=results/eval/gsm8k-single
    python -m tflow.evaluate ... eval.method=tflow eval.checkpoint=results/runs/cpu/generator.pt

Writes into `eval.out_dir`:
  config.yaml    the resolved config this run uses (written first; a rerun must match it)
  records.jsonl  one line per problem: task_id, method, prediction, extracted, gold, correct, detail
                 (base/plus status for code), truncated, tokens per agent, processed_tokens, seconds
                 per phase (and the senders' messages for textmas)
  metrics.json   accuracy (code: base and plus pass@1), truncation rate, processed tokens and
                 seconds (totals and per-problem means, per agent and per phase), peak memory, the
                 subset's task ids, the data source and version, resolved config and provenance
Several runs in one process (the workflow runs every seed of a (task, method, cell) this way on
small machines, where Python start-up is a third of a job): `--each "eval.seed=1 eval.out_dir=..."`,
repeatable; each run is the shared layers and overrides plus its own, built from scratch (models
the frozen backbones loaded once and reused, except for static_lora; seeds reset), and writes its own
folder exactly as it would alone.

Batches are consecutive chunks of eval.batch_size problems of the whole subset, in subset order, and
sampling is seeded per problem (tflow.methods.base.RowSampler), so a problem's record does not depend
on what ran before it. Resume: rerunning the same command keeps every completely recorded batch and
redoes the rest whole (a torn last line and a partly recorded batch's records are dropped first), so a
run killed anywhere and resumed writes the records an uninterrupted run writes, greedy or sampled.
Another config in the same out_dir is an error naming the fix. A run holds `out_dir/.lock` while it
works: a second run on the same folder fails at once, naming the holder's PID.

"Processed tokens" of a problem = every agent's prompt tokens + every agent's generated tokens
(TextMAS senders' prompts and messages, TFlow senders' prefills, the receiver's prompt and answer).
"""
from __future__ import annotations

import argparse
import dataclasses
import contextlib
import gc
import json
import logging
import os
import resource
import shlex
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from tflow.config import config_hash, load_config, to_yaml
from tflow.errors import ConfigError, cli
from tflow.methods import build_method
from tflow.models import shared_backbones
from tflow.tasks import get_task, subset
from tflow.tasks.base import EvalProblem
from tflow.utils import (discard_stale, folder_lock, provenance, seed_everything, write_json_atomic,
                         write_text_atomic)

log = logging.getLogger(__name__)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Complete records of an earlier (possibly interrupted) run; a torn last line is cut off the file."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log.warning("%s: dropping a torn last line (%d bytes) from an interrupted run", path, len(data) - end)
        with open(path, "r+b") as f:
            f.truncate(end)
    return [json.loads(line) for line in data[:end].decode("utf-8").splitlines() if line.strip()]


def batches_of(problems: Sequence[EvalProblem], ev: DictConfig, task: Any) -> list[list[EvalProblem]]:
    """The run's fixed batches: consecutive chunks of eval.batch_size problems, in subset order or, with
    eval.sort_by_length, in order of the receiver prompt's length (similar lengths pad less)."""
    order = sorted(problems, key=lambda p: len(task.prompt(p))) if ev.sort_by_length else list(problems)
    return [order[k:k + ev.batch_size] for k in range(0, len(order), ev.batch_size)]


def finished_batches(path: Path, batches: Sequence[Sequence[EvalProblem]]) -> dict[str, dict[str, Any]]:
    """The records of the batches an earlier run recorded completely. Records of a partly recorded batch (and
    duplicates) are dropped from the file (atomic rewrite), so that batch is redone whole, as it first ran."""
    records = read_records(path)
    by_id = {r["task_id"]: r for r in records}
    if set(by_id) - {p.task_id for b in batches for p in b}:
        raise ConfigError(f"{path} has problems outside this subset; delete {path.parent} to start over")
    kept = [by_id[p.task_id] for b in batches if all(p.task_id in by_id for p in b) for p in b]
    if len(kept) != len(records):
        log.warning("%s: dropping %d records of a partly recorded batch; it is redone whole", path,
                    len(records) - len(kept))
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
    return {r["task_id"]: r for r in kept}


def check_config(out: Path, cfg: DictConfig, restart_on_change: bool = False) -> None:
    """Write config.yaml on the first run; later runs in the same folder must use the same config
    (or, with restart_on_change, the old results are discarded: the workflow reruns a changed job)."""
    path = out / "config.yaml"
    text = to_yaml(cfg)
    if path.is_file():
        old = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        if config_hash(old) == config_hash(cfg):
            return
        if not restart_on_change:
            raise ConfigError(f"{out} holds results of another config ({path}); choose another eval.out_dir "
                              "or delete the folder to start over")
        discard_stale(out, ["records.jsonl", "metrics.json", "config.yaml"], "the config changed")
    write_text_atomic(path, text)


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy, truncation, token and time totals and per-problem means over `records`."""
    n = len(records)
    agents: dict[str, dict[str, int]] = {}
    phases: dict[str, float] = {}
    for r in records:
        for agent, t in r["tokens"].items():
            a = agents.setdefault(agent, {"prompt": 0, "generated": 0})
            a["prompt"] += t["prompt"]
            a["generated"] += t["generated"]
        for phase, sec in r["seconds"].items():
            phases[phase] = phases.get(phase, 0.0) + sec
    processed = sum(r["processed_tokens"] for r in records)
    out = {"n": n, "accuracy": sum(r["correct"] for r in records) / max(n, 1),
           "truncated_rate": sum(r["truncated"] for r in records) / max(n, 1),
           "processed_tokens": {"total": processed, "mean": processed / max(n, 1)},
           "tokens_per_agent": {"total": agents,
                                "mean": {a: {k: v / max(n, 1) for k, v in t.items()} for a, t in agents.items()}},
           "seconds_per_phase": {"total": phases, "mean": {p: s / max(n, 1) for p, s in phases.items()}},
           "seconds": {"total": sum(phases.values()), "mean": sum(phases.values()) / max(n, 1)}}
    if records and "base" in records[0].get("detail", {}):  # code tasks: evalplus base and plus pass@1
        out["pass@1"] = {"base": sum(r["detail"]["base"] == "pass" for r in records) / n, "plus": out["accuracy"]}
    return out


def peak_memory() -> dict[str, float]:
    # the process's peak: with --each, runs earlier in the same process count too
    mem = {"max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # Linux: KiB
    if torch.cuda.is_available():
        mem["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return mem


def evaluate(cfg: DictConfig, layers: Sequence[Any] = (), overrides: Sequence[str] = (),
             restart_on_change: bool = False) -> dict[str, Any]:
    """Run (or resume) one evaluation; returns the metrics written to metrics.json."""
    ev = cfg.eval
    out = Path(ev.out_dir)
    task = get_task(ev.task)
    every, source = task.load(cfg.data.data_dir, ev.source)
    problems = [dataclasses.replace(p, view=task.sender_view(p)) for p in subset(every, ev.n, ev.subset_seed)]
    with folder_lock(out):  # before any model loads: a second run on this folder fails at once
        return _evaluate(cfg, out, task, problems, source, layers, overrides, restart_on_change)


def _evaluate(cfg: DictConfig, out: Path, task: Any, problems: list[EvalProblem], source: dict[str, Any],
              layers: Sequence[Any], overrides: Sequence[str], restart_on_change: bool) -> dict[str, Any]:
    ev = cfg.eval
    method, run_cfg = build_method(cfg, layers, overrides)
    check_config(out, run_cfg, restart_on_change)
    records_path = out / "records.jsonl"
    batches = batches_of(problems, ev, task)
    done = finished_batches(records_path, batches)
    todo = [b for b in batches if b[0].task_id not in done]
    seed_everything(ev.seed)
    method.prepare(problems)
    t0 = time.perf_counter()
    with open(records_path, "a", encoding="utf-8") as f, \
            tqdm(total=len(problems), initial=len(done), desc=f"{ev.task}/{ev.method}") as bar:
        for chunk in todo:
            outputs = method.answer(chunk, [task.prompt(p) for p in chunk])
            scores = task.score(chunk, [o.text for o in outputs], out / "work")
            lines = []
            for p, o, s in zip(chunk, outputs, scores):
                rec = {"task_id": p.task_id, "method": ev.method, "prediction": o.text, "extracted": s.extracted,
                       "gold": p.gold, "correct": bool(s.correct), "detail": s.detail, "truncated": o.truncated,
                       "generated_tokens": o.generated_tokens, **o.accounting.to_dict()}
                if o.messages is not None:
                    rec["messages"] = o.messages
                done[p.task_id] = rec
                lines.append(json.dumps(rec) + "\n")
            f.write("".join(lines))  # a batch is one write, flushed to disk before the next batch starts
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(chunk))
    records = [done[p.task_id] for p in problems]
    metrics = {"task": ev.task, "method": ev.method, **summarize(records), "peak_memory": peak_memory(),
               "run_seconds_this_invocation": time.perf_counter() - t0,
               "resumed_from": len(problems) - sum(map(len, todo)),
               "data": {**source, "subset_seed": ev.subset_seed, "subset_size": len(problems),
                        "task_ids": [p.task_id for p in problems]},
               "processed_tokens_definition": "every agent's prompt tokens + every agent's generated tokens",
               "config": OmegaConf.to_container(run_cfg, resolve=True), "config_hash": config_hash(run_cfg),
               "provenance": provenance(seed=ev.seed)}
    write_json_atomic(out / "metrics.json", metrics)
    return metrics


def report(m: dict[str, Any], out_dir: str) -> str:
    """One line for the terminal: accuracy, truncation, tokens and seconds per problem."""
    line = f"{m['task']} / {m['method']}: accuracy {m['accuracy']:.3f} on {m['n']} problems"
    if "pass@1" in m:
        line += f" (base {m['pass@1']['base']:.3f}, plus {m['pass@1']['plus']:.3f})"
    return (line + f"; truncated {m['truncated_rate']:.2f}; processed tokens/problem {m['processed_tokens']['mean']:.0f}; "
            f"seconds/problem {m['seconds']['mean']:.2f}; wrote {out_dir}/metrics.json")


@cli
def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", default=[], help="run-config YAML layer (repeatable)")
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. eval.task=gsm8k eval.method=textmas eval.n=32")
    ap.add_argument("--each", action="append", default=[], metavar="'K=V K=V'",
                    help="one run's own overrides on top of the shared ones (repeatable: the runs go one after "
                         "another in this process, e.g. one per seed)")
    ap.add_argument("--restart-on-change", action="store_true",
                    help="discard results of another config in eval.out_dir instead of failing (the workflow's reruns)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    runs = [[*args.overrides, *shlex.split(own)] for own in args.each] or [list(args.overrides)]
    cfgs = [load_config(args.config, ov) for ov in runs]  # every run's config is checked before any model loads
    outs = [c.eval.out_dir for c in cfgs]
    if len(set(outs)) != len(outs):
        raise ConfigError(f"--each runs share an eval.out_dir ({outs}); give each run its own folder")
    # the runs share the frozen backbones (loaded once), except static_lora, whose adapter wraps the model in place
    share = len(cfgs) > 1 and all(c.eval.method != "static_lora" for c in cfgs)
    with shared_backbones() if share else contextlib.nullcontext():
        for cfg, ov in zip(cfgs, runs):
            m = evaluate(cfg, args.config, ov, args.restart_on_change)
            print(report(m, cfg.eval.out_dir), flush=True)
            del m
            gc.collect()

if __name__ == "__main__":
    main()
