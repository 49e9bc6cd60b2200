"""TFlow end to end: sender conditions -> layer aggregator -> generator -> fusion -> LoRA delta,
plus generator checkpoints that refuse to load against the wrong receiver or architecture."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from tflow.agents import Conditions
from tflow.errors import CheckpointError
from tflow.fusion import LoraDelta, fuse
from tflow.generator import LayerAggregator, ModuleSpec, ParameterGenerator
from tflow.generator_release import ReleaseParameterGenerator
from tflow.models import Backbone, target_linears
from tflow.registry import FUSIONS
from tflow.utils import provenance, torch_load, torch_save_atomic

CHECKPOINT_FORMAT = "tflow-generator/1"
# Config sections that define the trained object: a checkpoint only fits a run that agrees on them.
ARCH_KEYS = ["agents.senders", "agents.receiver", "agents.max_question_tokens", "lora.rank", "lora.alpha",
             "lora.output_scale", "lora.targets", "lora.layers", "generator", "fusion"]


def module_specs(receiver: Backbone, targets: list[str], layers: list[int] | None) -> list[ModuleSpec]:
    specs = []
    for name, lin in target_linears(receiver.model, list(targets), None if layers is None else list(layers)).items():
        _, i, proj = name.split(".")
        specs.append(ModuleSpec(name, int(i), proj, lin.in_features, lin.out_features))
    return specs


class TFlow(nn.Module):
    """The trainable part of TFlow: layer aggregator, parameter generator and fusion gate."""

    def __init__(self, cfg: DictConfig, specs: list[ModuleSpec], sender_states: int, sender_dim: int,
                 receiver_dim: int):
        super().__init__()
        g, lo = cfg.generator, cfg.lora
        self.specs = specs
        self.scale = lo.alpha / lo.rank
        self.aggregator = LayerAggregator(sender_states)
        if g.variant == "release":
            self.generator = ReleaseParameterGenerator(
                specs, sender_dim, len(cfg.agents.senders), lo.rank, width=g.width, depth=g.depth, heads=g.heads,
                mlp_ratio=g.mlp_ratio, tile_size=g.tile_size, accumulation=g.accumulation,
                output_scale=lo.output_scale, max_condition_tokens=cfg.agents.max_question_tokens)
        else:
            self.generator = ParameterGenerator(
                specs, sender_dim, len(cfg.agents.senders), lo.rank, width=g.width, depth=g.depth, heads=g.heads,
                mlp_ratio=g.mlp_ratio, tile_size=g.tile_size, output_scale=lo.output_scale,
                sender_embedding=g.sender_embedding)
        self.fusion = FUSIONS.load(cfg.fusion.name)(g.width, receiver_dim, cfg.fusion.gate_width)

    def factors(self, cond: Conditions) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Per-sender factors {name: (A [B,S,r,d_in], B [B,S,d_out,r])} and summaries [B, S, W]."""
        pooled = self.aggregator(cond.states)  # [B, S, T, d]
        return self.generator(pooled, cond.mask)

    def forward(self, cond: Conditions, receiver_summary: torch.Tensor) -> tuple[LoraDelta, dict[str, torch.Tensor]]:
        """Returns the fused delta and {name: ||scale * B_s A_s||_F^2 [B, S]} for the L2 penalty/logs."""
        factors, summary = self.factors(cond)
        return fuse(factors, self.fusion, summary, receiver_summary, self.scale), delta_sq_norms(factors, self.scale)


def delta_sq_norms(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float) -> dict[str, torch.Tensor]:
    """||scale * B A||_F^2 per row and sender, via trace((A A^T)(B^T B)) in r x r."""
    out = {}
    for name, (a, b) in factors.items():
        aat = a @ a.transpose(-1, -2)  # [B, S, r, r]
        btb = b.transpose(-1, -2) @ b  # [B, S, r, r]
        out[name] = scale ** 2 * (aat * btb).sum((-1, -2))  # [B, S]
    return out


@torch.no_grad()
def receiver_summary(receiver: Backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean input-token embedding of the receiver's prompt: [B, d_r] (read by attention fusion)."""
    emb = receiver.model.get_input_embeddings()(input_ids.to(receiver.device)).float()  # [B, T, d]
    m = attention_mask.to(emb.device).float().unsqueeze(-1)
    return (emb * m).sum(1) / m.sum(1).clamp_min(1.0)


def zero_delta_like(delta: LoraDelta) -> LoraDelta:
    """The delta-W = 0 control: same hooks and shapes, every factor zero."""
    from tflow.fusion import ModuleDelta
    return LoraDelta(delta.mode, {n: ModuleDelta(torch.zeros_like(d.a), torch.zeros_like(d.b))
                                  for n, d in delta.modules.items()}, delta.batch, delta.sender_weights)


def build_tflow(cfg: DictConfig, receiver: Backbone, sender: Backbone) -> TFlow:
    specs = module_specs(receiver, cfg.lora.targets, cfg.lora.layers)
    return TFlow(cfg, specs, sender.num_layers + 1, sender.hidden_size, receiver.hidden_size)


def _arch(cfg: DictConfig) -> dict[str, Any]:
    full = OmegaConf.to_container(cfg, resolve=True)
    out = {}
    for key in ARCH_KEYS:
        node = full
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out


def save_generator(path: str | Path, tflow: TFlow, cfg: DictConfig, receiver: Backbone, sender: Backbone,
                   **extra: Any) -> None:
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "state_dict": tflow.state_dict(),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "arch": _arch(cfg),
        "receiver": receiver.fingerprint(),
        "sender": sender.fingerprint(),
        "specs": [asdict(s) for s in tflow.specs],
        "provenance": provenance(),
        **extra,
    }
    torch_save_atomic(ckpt, path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"generator checkpoint not found: {path}. Train one first "
                              "(python -m tflow.train ...); TFlow never runs an untrained generator silently.")
    ckpt = torch_load(path, "generator checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
    return ckpt


def backbone_ident(b: DictConfig) -> str:
    """The ident `tflow.models.load_backbone` gives the backbone that `b` (a model.receiver/sender section)
    describes, known before it loads."""
    return {"asset": f"asset:{b.name}", "path": f"path:{Path(b.name).name}"}.get(b.source, f"hub:{b.name}")


def _mismatches(ckpt: dict[str, Any], cfg: DictConfig, backbones: dict[str, dict[str, Any]], what: str) -> list[str]:
    """How a checkpoint differs from the run: its architecture keys, and the given fingerprint fields per role
    (`what` the backbones are: "configured" or "loaded")."""
    want = _arch(cfg)
    out = [f"{k}: checkpoint {v!r} vs run {want.get(k)!r}" for k, v in ckpt["arch"].items() if want.get(k) != v]
    for role, fp in backbones.items():
        out += [f"{role}.{k}: checkpoint {v!r} vs {what} {fp[k]!r}"
                for k, v in ckpt[role].items() if k in fp and fp[k] != v]
    return out


def _refuse(path: str | Path, problems: list[str]) -> None:
    if problems:
        raise CheckpointError(f"generator checkpoint {path} does not fit this run (use its own settings and "
                              "backbones, or train a generator for this run):\n  " + "\n  ".join(problems))


def checked_checkpoint(path: str | Path, cfg: DictConfig) -> dict[str, Any]:
    """The checkpoint at `path`, after checking, before any backbone loads, that it can fit `cfg`: the
    architecture keys and the backbones' idents (the loaded backbones are checked in full by load_generator)."""
    ckpt = read_checkpoint(path)
    m = cfg.model
    _refuse(path, _mismatches(ckpt, cfg, {"receiver": {"ident": backbone_ident(m.receiver)},
                                          "sender": {"ident": backbone_ident(m.sender or m.receiver)}}, "configured"))
    return ckpt


def load_generator(path: str | Path, cfg: DictConfig, receiver: Backbone, sender: Backbone,
                   ckpt: dict[str, Any] | None = None) -> TFlow:
    """Rebuild the TFlow module of a checkpoint (`ckpt`: already read from `path`) and check it fits `cfg` and
    the loaded backbones."""
    ckpt = ckpt if ckpt is not None else read_checkpoint(path)
    _refuse(path, _mismatches(ckpt, cfg, {"receiver": receiver.fingerprint(), "sender": sender.fingerprint()}, "loaded"))
    tflow = build_tflow(cfg, receiver, sender)
    tflow.load_state_dict(ckpt["state_dict"])
    return tflow.to(receiver.device).eval()


def delta_for(tflow: TFlow, receiver: Backbone, per_example: list[list[torch.Tensor]], batch: dict[str, torch.Tensor],
              ) -> tuple[LoraDelta, dict[str, torch.Tensor]]:
    """Fused delta for a batch: per_example[b][s] = sender s's condition [L+1, T, d] for row b;
    `batch` is the receiver's tokenised prompt batch (for the attention-fusion summary)."""
    cond = Conditions.collate(per_example, device=receiver.device)
    summary = receiver_summary(receiver, batch["input_ids"], batch["attention_mask"])
    return tflow(cond, summary)
