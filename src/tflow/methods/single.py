"""`single`: the receiver alone, with its role prompt and the task prompt (the baseline)."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from omegaconf import DictConfig

from tflow.accounting import Accounting
from tflow.methods.base import MethodOutput, generate, receiver_role, reference_batch, row_nll, share_seconds, warm_up
from tflow.models import Backbone, load_backbones
from tflow.tasks.base import EvalProblem


class Single:
    """The receiver alone (static_lora subclasses it with an adapter applied)."""

    name = "single"

    def __init__(self, cfg: DictConfig, receiver: Backbone):
        self.cfg, self.receiver = cfg, receiver

    @classmethod
    def build(cls, cfg: DictConfig, layers: Sequence[Any] = (), overrides: Sequence[str] = ()) -> tuple["Single", DictConfig]:
        receiver, _ = load_backbones(cfg)
        return cls(cfg, receiver), cfg

    def prepare(self, problems: Sequence[EvalProblem]) -> None:
        if problems:
            warm_up(self.receiver, receiver_role(self.cfg), problems[0].question)

    def answer(self, problems: Sequence[EvalProblem], prompts: Sequence[str]) -> list[MethodOutput]:
        acc, rows = Accounting(), [Accounting() for _ in problems]
        res = generate(self.receiver, receiver_role(self.cfg), prompts, self.cfg.eval, acc, rows, "receiver",
                       self.cfg.eval.max_new_tokens, [p.task_id for p in problems])
        share_seconds(acc, rows)
        return [MethodOutput(t, n, tr, row) for (t, n, tr), row in zip(res, rows)]

    @torch.no_grad()
    def reference_nll(self, problems: Sequence[Any]) -> list[tuple[float, int]]:
        """Teacher-forced NLL of each problem's reference solution (the held-out family)."""
        batch = reference_batch(self.receiver.tokenizer, receiver_role(self.cfg), problems,
                                self.cfg.data.max_solution_tokens)
        batch = {k: v.to(self.receiver.device) for k, v in batch.items()}
        logits = self.receiver.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return list(zip(*row_nll(logits, batch["labels"])))
