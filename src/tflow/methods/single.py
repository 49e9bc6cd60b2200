"""`single`: the receiver alone, with its role prompt and the task prompt (the baseline)."""
from __future__ import annotations

from typing import Any, Sequence

from omegaconf import DictConfig

from tflow.accounting import Accounting
from tflow.methods.base import MethodOutput, generate, share_seconds, warm_up
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
            warm_up(self.receiver, self.cfg.agents.receiver, problems[0].question)

    def answer(self, problems: Sequence[EvalProblem], prompts: Sequence[str]) -> list[MethodOutput]:
        acc, rows = Accounting(), [Accounting() for _ in problems]
        res = generate(self.receiver, self.cfg.agents.receiver, prompts, self.cfg.eval, acc, rows, "receiver",
                       self.cfg.eval.max_new_tokens, [p.task_id for p in problems])
        share_seconds(acc, rows)
        return [MethodOutput(t, n, tr, row) for (t, n, tr), row in zip(res, rows)]
