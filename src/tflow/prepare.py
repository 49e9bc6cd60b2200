"""Prepare data: load every evaluation set and the training set once and write a manifest.

The workflow's first stage. It fails early, naming the missing source and its fix, before any model
is loaded; and it records what later stages will read: per task the source, version, set size and
the seeded subset's task ids (the same subset every method and seed evaluates), and the training
set's sources with their decontamination counts. `python -m tflow.prepare --help`.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tflow.config import config_hash, load_config
from tflow.mix import training_set
from tflow.errors import cli
from tflow.tasks import get_task, subset
from tflow.utils import provenance, write_json_atomic

log = logging.getLogger(__name__)


def task_manifest(cfg: DictConfig, task_name: str) -> dict[str, Any]:
    """Source, version, size and the evaluated subset of one task (eval.n / eval.subset_seed of cfg)."""
    every, source = get_task(task_name).load(cfg.data.data_dir, cfg.eval.source)
    chosen = subset(every, cfg.eval.n, cfg.eval.subset_seed)
    digest = hashlib.sha256("\n".join(f"{p.task_id}\t{p.question}" for p in chosen).encode()).hexdigest()
    return {"source": source, "set_size": len(every), "subset_size": len(chosen), "subset_seed": cfg.eval.subset_seed,
            "task_ids": [p.task_id for p in chosen], "subset_sha256": digest}


def prepare(cfg: DictConfig, tasks: Sequence[str], seeds: Sequence[int]) -> dict[str, Any]:
    """The manifest: every task's subset and, per training seed, the training set's sources and counts."""
    out: dict[str, Any] = {"tasks": {}, "training": {}}
    for name in tasks:
        out["tasks"][name] = task_manifest(cfg, name)
        log.info("%s: %d of %d problems (%s)", name, out["tasks"][name]["subset_size"],
                 out["tasks"][name]["set_size"], out["tasks"][name]["source"].get("version", "?"))
    for seed in seeds:
        ts = training_set(cfg.data, seed, cfg.train.steps * cfg.train.batch_size, cfg.model.cache_dir)
        out["training"][str(seed)] = {"problems": len(ts.problems), "sources": ts.sources, "removed": ts.removed}
        log.info("training set (seed %d): %d problems after decontamination", seed, len(ts.problems))
    out["config"] = OmegaConf.to_container(cfg, resolve=True)
    out["config_hash"] = config_hash(cfg)
    out["provenance"] = provenance()
    return out


@cli
def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", default=[], help="run-config YAML layer (repeatable)")
    ap.add_argument("--tasks", nargs="*", default=[], help="task names, e.g. gsm8k math500")
    ap.add_argument("--seeds", nargs="*", type=int, default=[], help="training seeds whose training set to record")
    ap.add_argument("--out", required=True, help="manifest JSON (written atomically)")
    ap.add_argument("overrides", nargs="*", help="key=value run-config overrides, e.g. eval.n=6")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not args.tasks and not args.seeds:
        ap.error("nothing to prepare: give --tasks and/or --seeds")
    cfg = load_config(args.config, args.overrides)
    write_json_atomic(args.out, prepare(cfg, args.tasks, args.seeds))
    print(f"wrote {args.out}: tasks {args.tasks}; training seeds {args.seeds}")


if __name__ == "__main__":
    main()
