"""One training loop for every method that trains a module of its own (static LoRA, trained comparators),
on the same footing as the generator (`tflow.train`): the same training set (`tflow.mix`), the same
batches in the same order, steps, warm-up + cosine schedule, AdamW, gradient clipping and seed; the loss
is the receiver's next-token cross-entropy on the same targets (plus whatever the module adds).

A method supplies a `Trainee` (its trainable module and how it scores a batch); `train_module` trains it
resumably (ckpt/last.pt; a rerun continues exactly where a killed run stopped), optionally over a grid of
learning rates chosen on the validation problems the mix holds back, and writes into train.out_dir:
config.yaml, train_log.jsonl (per grid point: lr~<x>/...), the saved module, train_summary.json and, last,
trained.json (tflow.methods.base.write_trained), which evaluation reads.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from tflow.config import config_hash, to_yaml
from tflow.data import Problem
from tflow.errors import ConfigError
from tflow.methods.base import trained_hash, write_trained
from tflow.mix import TrainingSet, training_set
from tflow.models import Backbone, load_backbones
from tflow.train import _truncate_log, batch_problems, lr_at
from tflow.utils import (discard_stale, provenance, rng_state, seed_everything, set_rng_state, torch_save_atomic,
                         write_json_atomic, write_text_atomic)

log = logging.getLogger(__name__)


class Trainee(Protocol):
    """A method's trainable module, built fresh for every training run (and grid point)."""

    def parameters(self) -> list[torch.nn.Parameter]:
        """The trainable tensors (fp32)."""
        ...

    def loss(self, problems: Sequence[Problem], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss to minimise on a batch and what to log (at least "ce"); `step` lets a method train in
        phases. With autograd off, the loss on held-out problems (validation)."""
        ...

    def save(self, folder: Path) -> None:
        """Write the trained module for evaluation into `folder` (it exists and is empty)."""
        ...


Build = Callable[[DictConfig, Backbone, Backbone], Trainee]


def train_module(cfg: DictConfig, method: str, build: Build, progress: bool = True, restart_on_change: bool = False,
                 lr_grid: Sequence[float] = ()) -> Path:
    """Train (or resume) `method`'s module; returns train.out_dir. With `lr_grid` (factors of train.lr),
    one run per learning rate, the one with the lowest validation loss is kept (its choice recorded).
    restart_on_change: discard results of another config in train.out_dir instead of failing."""
    out = Path(cfg.train.out_dir)
    chash = config_hash(cfg)
    parts = ["trained.json", "module", "ckpt", "grid", "train_log.jsonl", "train_summary.json"]
    if restart_on_change and trained_hash(out) not in (None, chash):
        discard_stale(out, parts, "the config changed")
    done = trained_hash(out)
    if done is not None:
        if done != chash:
            raise ConfigError(f"{out} was trained with another config; use a new train.out_dir or delete {out}")
        return out
    receiver, sender = load_backbones(cfg)  # data and backbones first: nothing is written before they load
    data = training_set(cfg.data, cfg.train.seed, cfg.train.steps * cfg.train.batch_size, cfg.model.cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.yaml", to_yaml(cfg))
    factors = list(lr_grid) or [1.0]
    runs = {f: (out / "grid" / f"lr~{f * cfg.train.lr:g}" if lr_grid else out) for f in factors}
    results, trainees = {}, {}
    for f, folder in runs.items():
        run_cfg = cfg.copy()
        run_cfg.train.lr = f * cfg.train.lr
        trainee = trainees[f] = _train_one(run_cfg, build, receiver, sender, data, folder, chash, progress,
                                           restart_on_change)
        results[f] = {"lr": run_cfg.train.lr, "validation_ce": validation_loss(trainee, data.validation, cfg),
                      "folder": str(folder)}
        log.info("%s: lr %.3g -> validation CE %.4f", method, run_cfg.train.lr, results[f]["validation_ce"])
    best = min(results, key=lambda f: results[f]["validation_ce"])
    module = out / "module"
    if runs[best] != out:  # without a grid the one run trained into out/module itself
        if module.exists():
            shutil.rmtree(module)
        shutil.copytree(runs[best] / "module", out / ".module.tmp", dirs_exist_ok=True)
        (out / ".module.tmp").rename(module)  # a half-copied module never looks finished
    n_params = sum(p.numel() for p in trainees[best].parameters())
    summary = {"method": method, "steps": cfg.train.steps, "batch_size": cfg.train.batch_size,
               "trainable_parameters": n_params, "training_problems": len(data.problems),
               "validation_problems": len(data.validation), "lr_grid": list(results.values()) if lr_grid else None,
               "chosen_lr": results[best]["lr"], "data_sources": data.sources, "decontamination_removed": data.removed,
               "config": OmegaConf.to_container(cfg, resolve=True), "provenance": provenance(seed=cfg.train.seed)}
    write_json_atomic(out / "train_summary.json", summary)
    write_trained(out, method, chash, receiver, trainable_parameters=n_params, chosen_lr=results[best]["lr"])
    return out


def _train_one(cfg: DictConfig, build: Build, receiver: Backbone, sender: Backbone, data: TrainingSet, out: Path,
               chash: str, progress: bool, restart_on_change: bool) -> Trainee:
    """One resumable run at cfg.train.lr into `out`; returns the trained module (also saved in out/module)."""
    out.mkdir(parents=True, exist_ok=True)
    key = f"{chash}/{cfg.train.lr:g}"
    ckpt_path = out / "ckpt" / "last.pt"
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False) if ckpt_path.is_file() else None
    if state is not None and state["key"] != key:
        if not restart_on_change:
            raise ConfigError(f"{ckpt_path} was written with another config; use a new train.out_dir or delete {out}")
        state = None
    seed_everything(cfg.train.seed)
    trainee = build(cfg, receiver, sender)
    params = trainee.parameters()
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    start = 0
    if state is not None:  # resume (a run finished before a later grid point was interrupted: weights only)
        for p, v in zip(params, state["params"]):
            p.data.copy_(v)
        opt.load_state_dict(state["optim"])
        set_rng_state(state["rng"])
        start = state["step"]
    log_path = out / "train_log.jsonl"
    _truncate_log(log_path, start)
    with open(log_path, "a") as log_file:
        for step in tqdm(range(start, cfg.train.steps), initial=start, total=cfg.train.steps,
                         desc=f"train (lr {cfg.train.lr:g})", disable=not progress):
            t0 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            loss, logs = trainee.loss(batch_problems(data.problems, step, cfg.train.batch_size), step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
            opt.step()
            if step % cfg.train.log_every == 0 or step == cfg.train.steps - 1:
                log_file.write(json.dumps({"step": step, **logs, "grad_norm": gnorm.item(),
                                           "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}) + "\n")
                log_file.flush()
            if (step + 1) % cfg.train.ckpt_every == 0 or step + 1 == cfg.train.steps:
                torch_save_atomic({"params": [p.detach().clone() for p in params], "optim": opt.state_dict(),
                                   "step": step + 1, "rng": rng_state(), "key": key}, ckpt_path)
    module = out / "module"
    if not (module / "done").is_file() or (module / "done").read_text() != key:
        if module.exists():
            shutil.rmtree(module)
        tmp = out / ".module.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        trainee.save(tmp)
        (tmp / "done").write_text(key)
        tmp.rename(module)
    return trainee


@torch.no_grad()
def validation_loss(trainee: Trainee, problems: Sequence[Problem], cfg: DictConfig, batch_size: int = 8) -> float:
    """Mean loss over the held-back validation problems (NaN when there are none)."""
    if not problems:
        return float("nan")
    total = 0.0
    for k in range(0, len(problems), batch_size):
        chunk = problems[k:k + batch_size]
        total += trainee.loss(chunk, cfg.train.steps)[1]["ce"] * len(chunk)
    return total / len(problems)


def trainer_main(method: str, build: Build, argv: Sequence[str] | None, doc: str, lr_grid: Callable[[DictConfig], Any] | None = None) -> None:
    """The command line of a method's trainer: `python -m tflow.methods.<method> --config ... key=value`."""
    import argparse

    from tflow.config import load_config

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", default=[], help="YAML layer (repeatable, applied in order)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides (use the generator's config and budget)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--restart-on-change", action="store_true",
                    help="discard results of another config in train.out_dir instead of failing (workflow reruns)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    print(train_module(cfg, method, build, progress=not args.no_progress, restart_on_change=args.restart_on_change,
                       lr_grid=lr_grid(cfg) if lr_grid else ()))
