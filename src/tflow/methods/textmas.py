"""`textmas`: verbal communication. Each sender writes a text message (role prompt + sender view); the
messages, in sender order, precede the receiver's task prompt. Presets (`eval.textmas_preset`,
`tflow.methods.TEXTMAS_PRESETS`): long (up to 1024 tokens per sender, the paper's budget) and short48
(exactly 48 tokens per sender, the reviewers' baseline)."""
from __future__ import annotations

from typing import Any, Sequence

from omegaconf import DictConfig

from tflow.accounting import Accounting
from tflow.methods import TEXTMAS_PRESETS
from tflow.methods.base import MethodOutput, generate, receiver_role, share_seconds, warm_up
from tflow.models import Backbone, load_backbones
from tflow.tasks.base import EvalProblem


def textmas_prompt(messages: dict[str, str], prompt: str) -> str:
    """The receiver's user message in TextMAS: the senders' messages in sender order, then the task."""
    notes = "\n\n".join(f"[{role}]\n{text.strip()}" for role, text in messages.items())
    return f"Notes from your teammates:\n\n{notes}\n\n---\n\n{prompt}"


class TextMAS:
    name = "textmas"

    def __init__(self, cfg: DictConfig, receiver: Backbone, sender: Backbone):
        self.cfg, self.receiver, self.sender = cfg, receiver, sender
        preset = TEXTMAS_PRESETS[cfg.eval.textmas_preset]
        self.message_tokens = cfg.eval.message_tokens or preset["message_tokens"]
        self.fixed = preset["fixed"]

    @classmethod
    def build(cls, cfg: DictConfig, layers: Sequence[Any] = (), overrides: Sequence[str] = ()) -> tuple["TextMAS", DictConfig]:
        return cls(cfg, *load_backbones(cfg)), cfg

    def prepare(self, problems: Sequence[EvalProblem]) -> None:
        if problems:
            warm_up(self.receiver, receiver_role(self.cfg), problems[0].question)
            if self.sender is not self.receiver:
                warm_up(self.sender, self.cfg.agents.senders[0], problems[0].question)

    def answer(self, problems: Sequence[EvalProblem], prompts: Sequence[str]) -> list[MethodOutput]:
        acc, rows = Accounting(), [Accounting() for _ in problems]
        messages: list[dict[str, str]] = [{} for _ in problems]
        ids = [p.task_id for p in problems]
        for role in self.cfg.agents.senders:  # senders read the task's sender view, as in TFlow
            res = generate(self.sender, role, [p.sender_view for p in problems], self.cfg.eval, acc, rows,
                           f"sender:{role}", self.message_tokens, ids, self.message_tokens if self.fixed else 0,
                           phases=("sender_prefill", "sender_decode"))
            for i, (text, _, _) in enumerate(res):
                messages[i][role] = text
        full = [textmas_prompt(m, p) for m, p in zip(messages, prompts)]
        res = generate(self.receiver, receiver_role(self.cfg), full, self.cfg.eval, acc, rows, "receiver",
                       self.cfg.eval.max_new_tokens, ids)
        share_seconds(acc, rows)
        return [MethodOutput(t, n, tr, row, m) for (t, n, tr), row, m in zip(res, rows, messages)]
