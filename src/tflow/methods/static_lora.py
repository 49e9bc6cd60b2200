"""`static_lora`, the control "is per-query adaptation needed?": ONE LoRA on the receiver, trained on
TFlow's data and budget, then applied to every query. This module is both the method and its trainer:

    python -m tflow.methods.static_lora --config config/run/cpu.yaml [key=value ...]

Same footing as the generator (tflow.methods.trainer): the same training problems, batches, steps,
schedule, optimiser, clipping and loss (the receiver's next-token cross-entropy plus the same L2 penalty
on ||scale B A||_F^2, weight train.l2_delta), the same targets and total rank as TFlow's fused delta
(senders x lora.rank, scale lora.alpha / lora.rank), applied through the same transient hooks, but no
senders: every query gets the same adapter. Its learning rate is chosen from train.lr x train.lr_grid on
the validation problems the mix holds back (a fair budget; the choice is recorded in train_summary.json
and trained.json). The trained adapter is a standard PEFT folder (module/adapter) that evaluation loads.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig

from tflow.agents import receiver_batch
from tflow.data import Problem
from tflow.errors import cli
from tflow.export import export_peft
from tflow.fusion import LoraDelta, ModuleDelta
from tflow.lora import TransientLoRA
from tflow.methods.base import read_trained
from tflow.methods.single import Single
from tflow.methods.trainer import train_module, trainer_main
from tflow.mix import receiver_prompt
from tflow.models import Backbone, load_backbones, target_linears


class StaticTrainee:
    """One rank-(senders x r) LoRA per target Linear: A Kaiming-uniform (as PEFT), B zero (delta-W = 0 at start)."""

    def __init__(self, cfg: DictConfig, receiver: Backbone, sender: Backbone):
        self.cfg, self.receiver = cfg, receiver
        layers = None if cfg.lora.layers is None else list(cfg.lora.layers)
        self.linears = target_linears(receiver.model, list(cfg.lora.targets), layers)
        self.rank = len(cfg.agents.senders) * cfg.lora.rank
        self.scale = cfg.lora.alpha / cfg.lora.rank
        self.a, self.b = {}, {}
        for name, lin in self.linears.items():
            a = torch.empty(self.rank, lin.in_features)
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.a[name] = torch.nn.Parameter(a.to(receiver.device))  # [R, d_in]
            self.b[name] = torch.nn.Parameter(torch.zeros(lin.out_features, self.rank, device=receiver.device))  # [d_out, R]

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for name in self.linears for p in (self.a[name], self.b[name])]

    def delta(self, rows: int) -> LoraDelta:
        """The adapter as a sum-type delta of `rows` identical rows (scale folded into B)."""
        return LoraDelta("sum", {n: ModuleDelta(self.a[n].expand(rows, -1, -1), (self.scale * self.b[n]).expand(rows, -1, -1))
                                 for n in self.linears}, rows)

    def loss(self, problems: Sequence[Problem], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        batch = receiver_batch(self.receiver.tokenizer, self.cfg.agents.receiver, [receiver_prompt(p) for p in problems],
                               [p.solution for p in problems], self.cfg.data.max_solution_tokens, padding_side="right")
        batch = {k: v.to(self.receiver.device) for k, v in batch.items()}
        with TransientLoRA(self.linears, self.delta(len(problems)), backend=self.cfg.backend):
            ce = self.receiver.model(**batch).loss
        # ||scale B A||_F^2 = scale^2 trace((A A^T)(B^T B)), averaged over modules, as the generator's penalty
        l2 = torch.stack([self.scale ** 2 * ((self.a[n] @ self.a[n].T) * (self.b[n].T @ self.b[n])).sum()
                          for n in self.linears]).mean()
        return ce + self.cfg.train.l2_delta * l2, {"ce": ce.item(), "l2": l2.item()}

    def save(self, folder: Path) -> None:
        export_peft(self.delta(1), 0, self.receiver.model, self.linears, folder / "adapter",
                    metadata={"method": "static_lora", "rank": self.rank, "scale": self.scale})


def train_static(cfg: DictConfig, progress: bool = True, restart_on_change: bool = False) -> Path:
    """Train (or resume) the static adapter over the learning-rate grid; returns train.out_dir."""
    return train_module(cfg, "static_lora", StaticTrainee, progress, restart_on_change, lr_grid=list(cfg.train.lr_grid))


class StaticLoRA(Single):
    """The receiver with the trained static adapter applied to every query."""

    name = "static_lora"

    @classmethod
    def build(cls, cfg: DictConfig, layers: Sequence[Any] = (), overrides: Sequence[str] = ()) -> tuple["StaticLoRA", DictConfig]:
        from peft import PeftModel

        receiver, _ = load_backbones(cfg)
        folder = read_trained(cfg.eval.checkpoint, "static_lora", receiver)
        model = PeftModel.from_pretrained(receiver.model, str(folder / "module" / "adapter")).eval()
        return cls(cfg, Backbone(model=model, tokenizer=receiver.tokenizer,
                                 ident=f"{receiver.ident}+static:{folder.name}")), cfg


@cli
def main(argv: Sequence[str] | None = None) -> None:
    trainer_main("static_lora", StaticTrainee, argv, __doc__, lr_grid=lambda cfg: list(cfg.train.lr_grid))


if __name__ == "__main__":
    main()
