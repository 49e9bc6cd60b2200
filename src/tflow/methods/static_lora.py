"""`static_lora`, the control "is per-query adaptation needed?": ONE peft LoRA on the receiver, trained
on TFlow's data and budget, then applied to every query. This module is both the method and its trainer:

    python -m tflow.methods.static_lora --config config/run/cpu.yaml [key=value ...]

It answers "is per-query adaptation needed?": same training problems (decontaminated), same
batches in the same order, steps, learning-rate schedule, optimiser, clipping and loss (the
receiver's next-token cross-entropy on reference solutions) as `tflow.train`, and the same
targets and total rank as TFlow's fused delta (senders x lora.rank, scale lora.alpha / lora.rank),
but no senders: every query gets the same adapter. Writes into `train.out_dir` (give it a folder
of its own): config.yaml, train_log.jsonl, ckpt/last.pt (resumable), adapter/ (a PEFT adapter
folder, written atomically), train_summary.json and, last, trained.json (the mark of a finished
training that `eval.method=static_lora eval.checkpoint=<train.out_dir>` reads).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm

from tflow.agents import receiver_batch
from tflow.config import config_hash, load_config, to_yaml
from tflow.data import training_set
from tflow.errors import ConfigError, cli
from tflow.methods.base import read_trained, trained_hash, write_trained
from tflow.methods.single import Single
from tflow.models import Backbone, load_backbones
from tflow.train import _truncate_log, batch_problems, lr_at
from tflow.utils import (discard_stale, provenance, rng_state, seed_everything, set_rng_state, torch_save_atomic, write_json_atomic,
                         write_text_atomic)

log = logging.getLogger("tflow.static_lora")


def peft_config(cfg: DictConfig) -> LoraConfig:
    """Targets, total rank and scale of TFlow's fused delta, as one static adapter."""
    r = len(cfg.agents.senders) * cfg.lora.rank
    scale = cfg.lora.alpha / cfg.lora.rank
    layers = None if cfg.lora.layers is None else list(cfg.lora.layers)
    return LoraConfig(r=r, lora_alpha=scale * r, target_modules=list(cfg.lora.targets), lora_dropout=0.0,
                      layers_to_transform=layers, bias="none")


def train_static(cfg: DictConfig, progress: bool = True, restart_on_change: bool = False) -> Path:
    """Train (or resume) the static adapter; returns train.out_dir. restart_on_change: discard results of
    another config in train.out_dir instead of failing (the workflow's reruns)."""
    out = Path(cfg.train.out_dir)
    adapter = out / "adapter"
    chash = config_hash(cfg)
    if restart_on_change:
        ckpt = out / "ckpt" / "last.pt"
        stale = trained_hash(out) not in (None, chash) or \
            (ckpt.is_file() and torch.load(ckpt, map_location="cpu", weights_only=False)["config_hash"] != chash)
        if stale:
            discard_stale(out, ["trained.json", "adapter", "ckpt", "train_log.jsonl", "train_summary.json"],
                          "the config changed")
    done = trained_hash(out)
    if done is not None:
        if done != chash:
            raise ConfigError(f"{out} was trained with another config; use a new train.out_dir or delete {out}")
        return out
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.yaml", to_yaml(cfg))
    seed_everything(cfg.train.seed)
    data = training_set(cfg.data, cfg.train.seed)
    problems = data.problems[:min(len(data.problems), cfg.train.steps * cfg.train.batch_size)]
    receiver, _ = load_backbones(cfg)
    model = get_peft_model(receiver.model, peft_config(cfg))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # train the adapter in fp32 (the frozen backbone keeps its dtype)
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    ckpt_path, start = out / "ckpt" / "last.pt", 0
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if state["config_hash"] != chash:
            raise ConfigError(f"{ckpt_path} was written with another config; use a new train.out_dir or delete {out}")
        for p, v in zip(params, state["params"]):
            p.data.copy_(v)
        opt.load_state_dict(state["optim"])
        set_rng_state(state["rng"])
        start = state["step"]
    log_path = out / "train_log.jsonl"
    _truncate_log(log_path, start)  # a resumed log has no duplicate steps
    model.train()
    with open(log_path, "a") as log_file:
        for step in tqdm(range(start, cfg.train.steps), initial=start, total=cfg.train.steps,
                         desc="train static LoRA", disable=not progress):
            t0 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            probs = batch_problems(problems, step, cfg.train.batch_size)
            batch = receiver_batch(receiver.tokenizer, cfg.agents.receiver, [p.question for p in probs],
                                   [p.solution for p in probs], cfg.data.max_solution_tokens, padding_side="right")
            loss = model(**{k: v.to(receiver.device) for k, v in batch.items()}).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
            opt.step()
            if step % cfg.train.log_every == 0 or step == cfg.train.steps - 1:
                log_file.write(json.dumps({"step": step, "loss": loss.item(), "grad_norm": gnorm.item(),
                                           "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}) + "\n")
                log_file.flush()
            if (step + 1) % cfg.train.ckpt_every == 0 and step + 1 < cfg.train.steps:
                torch_save_atomic({"params": [p.detach().clone() for p in params], "optim": opt.state_dict(),
                                   "step": step + 1, "rng": rng_state(), "config_hash": chash}, ckpt_path)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".adapter."))
    model.save_pretrained(tmp)
    if adapter.exists():
        shutil.rmtree(adapter)
    os.replace(tmp, adapter)  # atomic: a half-written adapter never looks finished
    write_json_atomic(out / "train_summary.json", {
        "steps": cfg.train.steps, "trainable_parameters": sum(p.numel() for p in params),
        "rank": peft_config(cfg).r, "training_problems": len(problems), "data_sources": data.sources,
        "decontamination_removed": data.removed, "config": OmegaConf.to_container(cfg, resolve=True),
        "provenance": provenance(seed=cfg.train.seed)})
    write_trained(out, "static_lora", chash, receiver, trainable_parameters=sum(p.numel() for p in params))
    return out


class StaticLoRA(Single):
    """The receiver with the trained static adapter applied to every query."""

    name = "static_lora"

    @classmethod
    def build(cls, cfg: DictConfig, layers: Sequence[Any] = (), overrides: Sequence[str] = ()) -> tuple["StaticLoRA", DictConfig]:
        from peft import PeftModel

        receiver, _ = load_backbones(cfg)
        folder = read_trained(cfg.eval.checkpoint, "static_lora", receiver)
        model = PeftModel.from_pretrained(receiver.model, str(folder / "adapter")).eval()
        return cls(cfg, Backbone(model=model, tokenizer=receiver.tokenizer,
                                 ident=f"{receiver.ident}+static:{folder.name}")), cfg


@cli
def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", default=[], help="YAML layer (repeatable, applied in order)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides (use the generator's config and budget)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--restart-on-change", action="store_true",
                    help="discard results of another config in train.out_dir instead of failing (workflow reruns)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    print(train_static(load_config(args.config, args.overrides), progress=not args.no_progress,
                       restart_on_change=args.restart_on_change))


if __name__ == "__main__":
    main()
