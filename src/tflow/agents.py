"""Agents: role prompts, chat formatting, and the senders' conditions (question-span hidden states).

A sender is a frozen backbone with a role system prompt. Its *condition* for a question is the
stack of hidden states of every layer (embeddings + each decoder layer) at the question's tokens,
taken from one prefill. Conditions are cached on disk, content-addressed, because senders are
frozen: every training run, seed and sweep cell reuses them.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from tflow.models import Backbone
from tflow.prompts import ROLES, chat_text
from tflow.utils import atomic_path, torch_load

log = logging.getLogger(__name__)

@dataclass
class SpanPrompt:
    input_ids: list[int]
    start: int  # first question token
    end: int  # one past the last kept question token
    truncated: bool


def question_span(tokenizer: PreTrainedTokenizerBase, role: str, question: str, max_tokens: int) -> SpanPrompt:
    """Tokenise the role prompt and locate the question's token span (from character offsets)."""
    text = chat_text(tokenizer, role, question)
    q0 = text.rfind(question)
    if q0 < 0 or not question.strip():
        raise ValueError(f"question text not found in the rendered {role} prompt (empty question?)")
    q1 = q0 + len(question)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    inside = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > q0 and a < q1 and b > a]
    start, end = inside[0], inside[-1] + 1
    truncated = end - start > max_tokens
    return SpanPrompt(list(enc["input_ids"]), start, min(end, start + max_tokens), truncated)


@torch.no_grad()
def sender_states(sender: Backbone, role: str, questions: Sequence[str], max_tokens: int,
                  batch_size: int = 8) -> tuple[list[torch.Tensor], list[int]]:
    """One frozen prefill per question. Returns per question a [L+1, T_q, d] tensor (backbone
    dtype, on CPU) of the question-span hidden states, and the number of prompt tokens processed."""
    prompts = [question_span(sender.tokenizer, role, q, max_tokens) for q in questions]
    if any(p.truncated for p in prompts):
        log.warning("%d of %d questions cut to %d tokens in the %s condition",
                    sum(p.truncated for p in prompts), len(prompts), max_tokens, role)
    pad = sender.tokenizer.pad_token_id
    states: list[torch.Tensor] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        width = max(len(p.input_ids) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, p in enumerate(chunk):  # right padding: positions of real tokens are unchanged
            ids[j, :len(p.input_ids)] = torch.tensor(p.input_ids)
            mask[j, :len(p.input_ids)] = 1
        out = sender.model(input_ids=ids.to(sender.device), attention_mask=mask.to(sender.device),
                           output_hidden_states=True, use_cache=False)
        for j, p in enumerate(chunk):  # L+1 tensors of [b, width, d] -> [L+1, T_q, d] for row j
            states.append(torch.stack([h[j, p.start:p.end] for h in out.hidden_states]).to("cpu", copy=True))
    return states, [len(p.input_ids) for p in prompts]


class ConditionCache:
    """Content-addressed on-disk cache of sender conditions: one file per (sender, role, question)."""

    def __init__(self, root: str | Path, sender: Backbone, max_tokens: int):
        slug = sender.ident.replace("/", "__").replace(":", "_")
        self.root = Path(root).expanduser() / "conditions" / slug
        self.sender_ident, self.max_tokens = sender.ident, max_tokens
        self.template = json.dumps(getattr(sender.tokenizer, "chat_template_kwargs", {}), sort_keys=True)

    def path(self, role: str, question: str) -> Path:
        key = f"{self.sender_ident}\n{ROLES[role]}\n{self.max_tokens}\n{question}"
        key = hashlib.sha256((key if self.template == "{}" else f"{key}\n{self.template}").encode()).hexdigest()
        return self.root / role / key[:2] / f"{key}.pt"

    def ensure(self, sender: Backbone | None, role: str, questions: Sequence[str], batch_size: int = 8,
               progress: bool = False) -> None:
        """Compute (with `sender`) and store the conditions that are not cached yet."""
        paths = {q: self.path(role, q) for q in questions}
        missing = [q for q, p in paths.items() if not p.is_file()]
        if not missing:
            return
        if sender is None:
            raise FileNotFoundError(f"{len(missing)} {role} conditions are not cached under {self.root}")
        if sender.ident != self.sender_ident:
            raise ValueError(f"cache is for {self.sender_ident}, got sender {sender.ident}")
        step = batch_size * 4
        for k in tqdm(range(0, len(missing), step), desc=f"sender prefill [{role}]", disable=not progress):
            chunk = missing[k:k + step]
            states, _ = sender_states(sender, role, chunk, self.max_tokens, batch_size)
            for q, s in zip(chunk, states):
                with atomic_path(paths[q]) as tmp:
                    torch.save(s, tmp)

    def get(self, sender: Backbone | None, role: str, questions: Sequence[str], batch_size: int = 8,
            progress: bool = False) -> list[torch.Tensor]:
        """Conditions for `questions` ([L+1, T_q, d] each), computing the missing ones first."""
        self.ensure(sender, role, questions, batch_size, progress)
        return [torch_load(self.path(role, q), "cached sender condition") for q in questions]


@dataclass
class Conditions:
    """A padded batch of sender conditions."""

    states: torch.Tensor  # [B, S, L+1, T, d] question-span hidden states of every layer
    mask: torch.Tensor  # [B, S, T] bool, True at real tokens

    @staticmethod
    def collate(per_example: Sequence[Sequence[torch.Tensor]], device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> "Conditions":
        """per_example[b][s]: [L+1, T_bs, d] -> padded `Conditions`."""
        B, S = len(per_example), len(per_example[0])
        L1, _, d = per_example[0][0].shape
        T = max(x.shape[1] for ex in per_example for x in ex)
        states = torch.zeros(B, S, L1, T, d, dtype=dtype)
        mask = torch.zeros(B, S, T, dtype=torch.bool)
        for b, ex in enumerate(per_example):
            if len(ex) != S:
                raise ValueError("every example needs one condition per sender")
            for s, x in enumerate(ex):
                states[b, s, :, : x.shape[1]] = x.to(dtype)
                mask[b, s, : x.shape[1]] = True
        return Conditions(states.to(device), mask.to(device))

    def index(self, rows: torch.Tensor | list[int]) -> "Conditions":
        return Conditions(self.states[rows], self.mask[rows])


def receiver_batch(tokenizer: PreTrainedTokenizerBase, role: str, questions: Sequence[str],
                   answers: Sequence[str] | None = None, max_answer_tokens: int = 0,
                   padding_side: str = "left") -> dict[str, torch.Tensor]:
    """Tokenise receiver prompts (and, for training, answers + end-of-turn) into a padded batch.
    With `answers`, `labels` mask everything but the answer tokens with -100."""
    rows, labels = [], []
    eot = tokenizer.eos_token_id
    for i, q in enumerate(questions):
        prompt = tokenizer(chat_text(tokenizer, role, q), add_special_tokens=False)["input_ids"]
        if answers is None:
            rows.append(prompt)
            continue
        ans = tokenizer(answers[i], add_special_tokens=False)["input_ids"]
        if max_answer_tokens:
            ans = ans[:max_answer_tokens]
        ans = ans + [eot]
        rows.append(prompt + ans)
        labels.append([-100] * len(prompt) + ans)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    for j, r in enumerate(rows):
        sl = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
        ids[j, sl] = torch.tensor(r)
        mask[j, sl] = 1
        if answers is not None:
            lab[j, sl] = torch.tensor(labels[j])
    out = {"input_ids": ids, "attention_mask": mask}
    if answers is not None:
        out["labels"] = lab
    return out
