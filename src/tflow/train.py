"""Train the generator: receiver next-token loss on reference solutions, backbones frozen.

    python -m tflow.train --config config/run/cpu.yaml [key=value ...]

Writes into `train.out_dir`: config.yaml (resolved), train_log.jsonl (loss, grad norm, |delta-W|
per layer; with train.validation_every, validation CE records), ckpt/last.pt (resumable state),
generator.pt (final), train_summary.json. Rerunning
the same command resumes from the last checkpoint and continues exactly as an uninterrupted run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from tflow import distributed
from tflow.agents import ConditionCache, receiver_batch
from tflow.errors import ConfigError, cli
from tflow.config import config_hash, load_config, to_yaml
from tflow.data import Problem
from tflow.mix import TrainingSet, receiver_prompt, sender_view, training_set
from tflow.lora import TransientLoRA
from tflow.models import Backbone, load_backbones, target_linears
from tflow.pipeline import TFlow, build_tflow, delta_for, save_generator, zero_delta_like
from tflow.utils import (discard_stale, provenance, rng_state, seed_everything, set_rng_state, torch_load, torch_save_atomic,
                         write_json_atomic, write_text_atomic)

log = logging.getLogger("tflow.train")


def receiver_loss(tflow: TFlow, receiver: Backbone, linears: dict, conds: list[list[torch.Tensor]],
                  problems: Sequence[Problem], cfg: DictConfig, zero_delta: bool = False,
                  ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], int]:
    """Mean next-token cross-entropy of the receiver on the problems' reference solutions with the
    generated transient LoRA (or delta-W = 0 with the same hooks).
    Returns (ce, l2 penalty, {module: ||delta-W||^2 [B, S]}, number of scored tokens)."""
    batch = receiver_batch(receiver.tokenizer, cfg.agents.receiver, [receiver_prompt(p) for p in problems],
                           [p.solution for p in problems], cfg.data.max_solution_tokens, padding_side="right")
    delta, sq = delta_for(tflow, receiver, conds, batch)
    if zero_delta:
        delta = zero_delta_like(delta)
    batch = {k: v.to(receiver.device) for k, v in batch.items()}
    with TransientLoRA(linears, delta, backend=cfg.backend):
        ce = receiver.model(**batch).loss
    l2 = torch.stack([v.mean() for v in sq.values()]).mean()
    return ce, l2, sq, int((batch["labels"][:, 1:] != -100).sum())


def conditions(cache: ConditionCache, problems: Sequence[Problem], cfg: DictConfig) -> list[list[torch.Tensor]]:
    """The cached sender conditions of `problems`, [problem][sender]."""
    by_role = [cache.get(None, r, [sender_view(p) for p in problems]) for r in cfg.agents.senders]
    return [list(per_problem) for per_problem in zip(*by_role)]


@torch.no_grad()
def validation_ce(tflow: TFlow, receiver: Backbone, linears: dict, cache: ConditionCache,
                  problems: Sequence[Problem], cfg: DictConfig) -> float:
    """Token-weighted receiver CE on held-back validation problems under the current generator (NaN: none)."""
    if not problems:
        return float("nan")
    was_training, total, tokens = tflow.training, 0.0, 0
    tflow.eval()
    for k in range(0, len(problems), cfg.train.batch_size):
        chunk = problems[k:k + cfg.train.batch_size]
        ce, _, _, n_tok = receiver_loss(tflow, receiver, linears, conditions(cache, chunk, cfg), chunk, cfg)
        total, tokens = total + ce.item() * n_tok, tokens + n_tok
    tflow.train(was_training)
    return total / max(tokens, 1)


def _log_validation(log_file, step: int, ce: float, n: int) -> None:
    """A validation record under the step just taken (-1: before training), so a resume that truncates the log
    at its start step keeps it."""
    log_file.write(json.dumps({"step": step, "steps_done": step + 1, "validation_ce": ce,
                               "validation_problems": n}) + "\n")
    log_file.flush()
    log.info("after %d steps: validation CE %.4f on %d problems", step + 1, ce, n)


def layer_norms(sq: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean |delta-W|_F per decoder layer (over modules, rows and senders)."""
    per: dict[str, list[float]] = {}
    for name, v in sq.items():
        per.setdefault(name.split(".")[1], []).append(v.detach().clamp_min(0).sqrt().mean().item())
    return {k: sum(v) / len(v) for k, v in per.items()}


def lr_at(step: int, cfg: DictConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    frac = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def batch_problems(problems: list[Problem], step: int, bs: int) -> list[Problem]:
    """Deterministic in `step`, so a resumed run sees exactly the batches it would have seen."""
    return [problems[(step * bs + j) % len(problems)] for j in range(bs)]


def train(cfg: DictConfig, progress: bool = True, stop_after: int | None = None,
          backbones: tuple[Backbone, Backbone] | None = None, problems: list[Problem] | None = None,
          restart_on_change: bool = False, validation: list[Problem] | None = None) -> Path | None:
    """Train (or resume) the generator described by `cfg`; returns the final checkpoint's path.

    stop_after: leave after this many steps of *this* invocation with a resumable checkpoint and
    return None (time-sliced cluster jobs). backbones / problems / validation: use these instead of
    loading the configured ones (tests, notebooks). restart_on_change: discard a checkpoint of another
    config in train.out_dir instead of failing (the workflow reruns a job whose settings changed).
    Under torchrun (WORLD_SIZE > 1) the ranks train one generator data-parallel (tflow.distributed);
    rank 0 alone writes files."""
    world = distributed.setup(cfg.train.batch_size, cfg.model.receiver.device)
    try:
        return _train(cfg, world, progress and world.main, stop_after, backbones, problems, restart_on_change,
                      validation)
    finally:
        distributed.teardown(world)


def _rank_config(cfg: DictConfig, world: distributed.World) -> DictConfig:
    """The config a rank loads its backbones with (its own GPU under torchrun)."""
    if not world.parallel:
        return cfg
    rcfg = cfg.copy()
    for key in ("receiver", "sender"):
        if rcfg.model.get(key) is not None:
            rcfg.model[key].device = distributed.rank_device(rcfg.model[key].device, world)
    return rcfg


def _train(cfg: DictConfig, world: distributed.World, progress: bool, stop_after: int | None,
           backbones: tuple[Backbone, Backbone] | None, problems: list[Problem] | None,
           restart_on_change: bool, validation: list[Problem] | None = None) -> Path | None:
    out = Path(cfg.train.out_dir)
    final = out / "generator.pt"
    chash = config_hash(cfg)
    if restart_on_change and world.main:
        stale = [torch_load(p, "training state").get("config_hash") != chash
                 for p in (final, out / "ckpt" / "last.pt") if p.is_file()]
        if any(stale):
            discard_stale(out, ["generator.pt", "ckpt", "train_log.jsonl", "train_summary.json"], "the config changed")
    distributed.barrier(world)
    if final.is_file():
        done = torch_load(final, "generator checkpoint").get("config_hash")
        if done != chash:
            raise ConfigError(f"{final} was trained with another config (hash {done} != {chash}); "
                              f"use a new train.out_dir or delete {out}")
        log.info("%s exists for this config: training already finished", final)
        return final
    ckpt_path = out / "ckpt" / "last.pt"
    state = torch_load(ckpt_path, "training state") if ckpt_path.is_file() else None
    if state is not None and state["config_hash"] != chash:
        raise ConfigError(f"{ckpt_path} was written with another config (hash {state['config_hash']} != {chash}); "
                          f"use a new train.out_dir or delete {out}")
    seed_everything(cfg.train.seed)

    budget = cfg.train.steps * cfg.train.batch_size
    data = training_set(cfg.data, cfg.train.seed, budget, cfg.model.cache_dir) if problems is None else \
        TrainingSet(problems[:budget], {"given": {"kept": len(problems)}}, validation=list(validation or []))
    problems = data.problems
    if world.main:  # after the data loaded: a missing data folder leaves nothing in out_dir
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.yaml", to_yaml(cfg))
    receiver, sender = backbones or load_backbones(_rank_config(cfg, world))
    linears = target_linears(receiver.model, list(cfg.lora.targets), None if cfg.lora.layers is None else list(cfg.lora.layers))
    cache = ConditionCache(cfg.model.cache_dir, sender, cfg.agents.max_question_tokens)
    if not world.main:  # rank 0 fills the shared cache first; the others then read it
        distributed.barrier(world)
    validation = data.validation if cfg.train.validation_every else []
    for role in cfg.agents.senders:  # senders are frozen: one prefill per question, ever (read per batch)
        cache.ensure(sender, role, [sender_view(p) for p in [*problems, *validation]], progress=progress)
    if world.main:
        distributed.barrier(world)

    tflow = build_tflow(cfg, receiver, sender).to(receiver.device)
    opt = torch.optim.AdamW(tflow.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    start = 0
    if state is not None:
        tflow.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        set_rng_state(state["rng"])
        start = state["step"]
        log.info("resuming from step %d (%s)", start, ckpt_path)
    log_path = out / "train_log.jsonl"
    if world.main:
        _truncate_log(log_path, start)

    n_params = sum(p.numel() for p in tflow.parameters())
    log.info("generator: %.2fM trainable parameters, %d target modules, %d generated values per sender per query; "
             "%d training problems (%s)", n_params / 1e6, len(tflow.specs), tflow.generator.num_generated_values(),
             len(problems), {k: v["kept"] for k, v in data.sources.items()})
    tflow.train()
    bar = tqdm(range(start, cfg.train.steps), initial=start, total=cfg.train.steps, desc="train generator",
               disable=not progress)
    with open(log_path, "a") if world.main else contextlib.nullcontext() as log_file:
        if world.main and cfg.train.validation_every and start == 0:  # the untrained generator's point
            _log_validation(log_file, -1, validation_ce(tflow, receiver, linears, cache, validation, cfg),
                            len(validation))
        for step in bar:
            t0 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            probs = batch_problems(problems, step, cfg.train.batch_size)
            mine = distributed.shard(probs, world)  # all of them in a single process
            ce, l2, sq, n_tok = receiver_loss(tflow, receiver, linears, conditions(cache, mine, cfg), mine, cfg)
            # Each rank's share of the batch (1 in a single process): weights that make the summed gradient
            # the whole batch's gradient. One collective gives the token total and the batch's ce and l2.
            row_share = len(mine) / len(probs)
            n_all, ce_sum, l2_all = distributed.all_sum([n_tok, ce.item() * n_tok, l2.item() * row_share],
                                                        world, receiver.device)
            ce_all = ce_sum / n_all  # exact: the shares are 1.0 in a single process
            loss = ce * (n_tok / n_all) + cfg.train.l2_delta * l2 * row_share
            opt.zero_grad(set_to_none=True)
            loss.backward()
            distributed.sum_gradients(tflow.parameters(), world)
            gnorm = torch.nn.utils.clip_grad_norm_(tflow.parameters(), cfg.train.grad_clip)
            opt.step()
            bar.set_postfix(loss=f"{ce_all:.4f}")
            if world.main and (step % cfg.train.log_every == 0 or step == cfg.train.steps - 1):
                rec = {"step": step, "loss": ce_all, "l2": l2_all, "grad_norm": gnorm.item(),
                       "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0,
                       "delta_w_norm_per_layer": layer_norms(sq)}
                log_file.write(json.dumps(rec) + "\n")
                log_file.flush()
            every = cfg.train.validation_every
            if world.main and every and ((step + 1) % every == 0 or step == cfg.train.steps - 1):
                _log_validation(log_file, step, validation_ce(tflow, receiver, linears, cache, validation, cfg),
                                len(validation))
            stopping = stop_after is not None and step + 1 - start >= stop_after and step + 1 < cfg.train.steps
            if world.main and (stopping or ((step + 1) % cfg.train.ckpt_every == 0 and step + 1 < cfg.train.steps)):
                torch_save_atomic({"model": tflow.state_dict(), "optim": opt.state_dict(), "step": step + 1,
                                   "rng": rng_state(), "config_hash": chash}, ckpt_path)
            if stopping:
                log.info("stopping after step %d as asked; rerun to resume", step + 1)
                return None
    if world.main:
        save_generator(final, tflow.eval(), cfg, receiver, sender, trained_steps=cfg.train.steps, config_hash=chash,
                       data_sources=data.sources, decontamination_removed=data.removed)
        write_json_atomic(out / "train_summary.json", {
            "steps": cfg.train.steps, "trainable_parameters": n_params, "training_problems": len(problems),
            "generated_values_per_query": tflow.generator.num_generated_values() * len(cfg.agents.senders),
            "data_sources": data.sources, "decontamination_removed": data.removed, "seed": cfg.train.seed,
            "ranks": world.size, "config": OmegaConf.to_container(cfg, resolve=True), "provenance": provenance()})
    distributed.barrier(world)  # the other ranks return once the generator is on disk
    return final


def cache_conditions(cfg: DictConfig, seeds: Sequence[int], manifest: str | Path, progress: bool = True) -> dict:
    """Prefill the frozen senders once on every training question any of `seeds` will use (the DAG's
    cache_conditions stage; every sweep cell and seed then reads the cache). Writes `manifest` atomically."""
    questions: dict[str, None] = {}
    sources = {}
    for seed in seeds:
        data = training_set(cfg.data, seed, cfg.train.steps * cfg.train.batch_size, cfg.model.cache_dir)
        sources = data.sources
        for p in data.problems:
            questions.setdefault(sender_view(p))
    _, sender = load_backbones(cfg)
    cache = ConditionCache(cfg.model.cache_dir, sender, cfg.agents.max_question_tokens)
    t0 = time.perf_counter()
    for role in cfg.agents.senders:
        cache.ensure(sender, role, list(questions), progress=progress)
    info = {"seeds": list(seeds), "questions": len(questions), "roles": list(cfg.agents.senders),
            "sender": sender.ident, "cache_dir": str(cache.root), "seconds": time.perf_counter() - t0,
            "data_sources": sources, "config": OmegaConf.to_container(cfg, resolve=True), "provenance": provenance()}
    write_json_atomic(manifest, info)
    return info


def _truncate_log(path: Path, start: int) -> None:
    """Drop log lines past the resume point, so a resumed log has no duplicate steps."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < start] \
        if start > 0 else []  # a fresh start keeps nothing (not even a killed run's pre-training record)
    write_text_atomic(path, "".join(ln + "\n" for ln in lines))


@cli
def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", default=[], help="YAML layer (repeatable, applied in order)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=50 lora.rank=8")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--stop-after", type=int, help="leave after N steps with a resumable checkpoint")
    ap.add_argument("--cache-only", metavar="MANIFEST", help="only prefill the senders on the training questions "
                    "of every --seeds run (shared condition cache), write MANIFEST (json) and exit")
    ap.add_argument("--restart-on-change", action="store_true",
                    help="discard a checkpoint of another config in train.out_dir instead of failing (workflow reruns)")
    ap.add_argument("--seeds", type=int, nargs="+", help="with --cache-only: the training seeds (default train.seed)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    if args.cache_only:
        info = cache_conditions(cfg, args.seeds or [cfg.train.seed], args.cache_only, progress=not args.no_progress)
        print(f"{info['questions']} questions x {len(info['roles'])} roles cached under {info['cache_dir']}")
        return
    final = train(cfg, progress=not args.no_progress, stop_after=args.stop_after,
                  restart_on_change=args.restart_on_change)
    print(final or f"stopped early; rerun the same command to resume from {cfg.train.out_dir}/ckpt/last.pt")


if __name__ == "__main__":
    main()
