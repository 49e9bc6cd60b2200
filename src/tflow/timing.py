"""Clean wall-clock timing: each method on a fixed subset, alone on the machine (the DAG's timing rule takes
every core, so no other job runs beside it), after a warm-up, repeated; the median over repeats.

Evaluation jobs run in parallel (two at a time on 2 cores) and time themselves as they run, so their
seconds depend on what ran beside them; the paper's time columns and phase figure come from here instead.

    python -m tflow.timing --config config/run/cpu.yaml eval.task=gsm8k eval.method=tflow eval.n=4 \\
        eval.checkpoint=... --repeats 3 --out results/cpu/timing/gsm8k/tflow.json

Writes JSON: per repeat the seconds per problem (total and per phase) and the generated tokens, the median
over repeats, the threads and the machine; `timing_rows` turns such files into rows of the stats frame.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from tflow.errors import cli
from tflow.utils import provenance, write_json_atomic

log = logging.getLogger(__name__)


def time_method(cfg: Any, layers: Sequence[Any], overrides: Sequence[str], repeats: int) -> dict[str, Any]:
    """Run the configured method `repeats` times on the task's subset (after its untimed warm-up)."""
    import torch

    from tflow.methods import build_method
    from tflow.tasks import get_task, subset

    ev = cfg.eval
    task = get_task(ev.task)
    problems = subset(task.load(cfg.data.data_dir, ev.source)[0], ev.n, ev.subset_seed)
    problems = [dataclasses.replace(p, view=task.sender_view(p)) for p in problems]
    method, run_cfg = build_method(cfg, layers, overrides)
    method.prepare(problems)
    runs = []
    for r in range(repeats):
        torch.manual_seed(ev.seed + r)
        phases: dict[str, float] = {}
        generated, t0 = 0, time.perf_counter()
        for k in range(0, len(problems), ev.batch_size):
            chunk = problems[k:k + ev.batch_size]
            for out in method.answer(chunk, [task.prompt(p) for p in chunk]):
                generated += out.generated_tokens
                for phase, sec in out.accounting.seconds.items():
                    phases[phase] = phases.get(phase, 0.0) + sec
        wall = time.perf_counter() - t0
        runs.append({"seconds_per_problem": wall / len(problems), "generated_tokens": generated,
                     "phase_seconds_per_problem": {k: v / len(problems) for k, v in phases.items()}})
        log.info("repeat %d: %.3f s per problem", r, wall / len(problems))
    med = statistics.median(r["seconds_per_problem"] for r in runs)
    phases = {k: statistics.median(r["phase_seconds_per_problem"].get(k, 0.0) for r in runs)
              for k in dict.fromkeys(k for r in runs for k in r["phase_seconds_per_problem"])}
    return {"task": ev.task, "method": ev.method, "problems": len(problems), "repeats": runs,
            "median_seconds_per_problem": med, "median_phase_seconds_per_problem": phases,
            "threads": torch.get_num_threads(), "config": OmegaConf.to_container(run_cfg, resolve=True)}


def timing_rows(paths: Sequence[str | Path], names: Sequence[str], family: str = "timing") -> list[dict[str, Any]]:
    """Rows of the stats frame (family `timing`, metric seconds) from timing files; `names` are the DAG
    method names of the files, in order."""
    rows = []
    for path, name in zip(paths, names):
        t = json.loads(Path(path).read_text())
        per = [r["seconds_per_problem"] for r in t["repeats"]]
        rows.append({"family": family, "task": t["task"], "method": name, "cell": "none", "metric": "seconds",
                     "n_problems": t["problems"], "n_seeds": len(per), "seconds_mean": t["median_seconds_per_problem"],
                     "seconds_min": min(per), "seconds_max": max(per), "threads": t["threads"], "is_baseline": False,
                     **{f"s_{k}_mean": v for k, v in t["median_phase_seconds_per_problem"].items()}})
    return rows


@cli
def main(argv: Sequence[str] | None = None) -> None:
    from tflow.config import load_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", default=[], help="run-config YAML layer (repeatable)")
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. eval.task=gsm8k eval.method=tflow eval.n=4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", required=True, help="the timing JSON (written atomically)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    result = time_method(cfg, args.config, args.overrides, args.repeats)
    write_json_atomic(args.out, {**result, "provenance": provenance(seed=cfg.eval.seed)})
    print(f"{result['task']} / {result['method']}: {result['median_seconds_per_problem']:.3f} s per problem "
          f"(median of {args.repeats}, {result['threads']} threads); wrote {args.out}")


if __name__ == "__main__":
    main()
