"""Training-free latent comparators: activation communication and KV-cache communication.

  ac  Activation communication (arXiv 2501.14082): each sender reads the question under its role
      prompt; its last-token hidden state after layer k is taken (the senders' states averaged).
      The receiver's prefill is paused after its layer j at the prompt's last token, its state h is
      combined with the senders' state a by `replace` (a), `sum` (h + a) or `mean` ((h + a) / 2),
      and the forward pass resumes; decoding then runs unmodified.
  kv  Homogeneous KV-cache communication: the senders' prefills (role prompt + question, in sender
      order, one continuous context) leave a KV cache that the receiver attends to: the receiver's
      prompt is appended after it and generation reads the whole cache. (With one shared backbone
      this is exact cache reuse, not a learned cross-model transform.)
Both count every sender prompt token as processed (prefill), as TFlow's sender prefills are.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from omegaconf import DictConfig

from tflow.accounting import Accounting, PrefillTimer
from tflow.agents import receiver_batch
from tflow.errors import ConfigError
from tflow.methods.base import MethodOutput, decode_rows, generate, sampling, share_seconds, warm_up
from tflow.models import Backbone, decoder_layers, load_backbones
from tflow.prompts import chat_text
from tflow.tasks.base import EvalProblem

AC_OPS = ("replace", "sum", "mean")


def resolve_layer(layer: int | None, num_layers: int) -> int:
    """A hidden-state index in 1..L (after that decoder layer); None = round(0.93 L), the depth the
    AC paper found best (26 of 28 layers); negative values count from the end."""
    j = round(0.93 * num_layers) if layer is None else (layer if layer >= 0 else num_layers + 1 + layer)
    if not 1 <= j <= num_layers:
        raise ConfigError(f"activation-communication layer {layer} is outside 1..{num_layers}")
    return j


@contextlib.contextmanager
def patch_last_token(layer: torch.nn.Module, state: torch.Tensor, op: str) -> Iterator[None]:
    """On the layer's first call (the receiver's prefill), combine its output at the last position
    with `state` [B, d]; later calls (decode steps) pass through."""
    calls = {"n": 0}

    def hook(module, args, out):
        calls["n"] += 1
        if calls["n"] > 1:
            return None
        h = out[0] if isinstance(out, tuple) else out  # [B, T, d]
        a = state.to(h.dtype)
        last = h[:, -1, :]
        h = h.clone()
        h[:, -1, :] = a if op == "replace" else (last + a if op == "sum" else (last + a) / 2)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class ActivationCommunication:
    name = "ac"

    def __init__(self, cfg: DictConfig, receiver: Backbone, sender: Backbone):
        self.cfg, self.receiver, self.sender = cfg, receiver, sender
        ev = cfg.eval
        if ev.ac_op not in AC_OPS:
            raise ConfigError(f"key 'eval.ac_op': unknown op {ev.ac_op!r}; choose from {AC_OPS}")
        self.k = resolve_layer(ev.ac_sender_layer, sender.num_layers)
        self.j = resolve_layer(ev.ac_receiver_layer, receiver.num_layers)

    @classmethod
    def build(cls, cfg: DictConfig, layers: Sequence[Any] = (), overrides: Sequence[str] = ()):
        return cls(cfg, *load_backbones(cfg)), cfg

    def prepare(self, problems: Sequence[EvalProblem]) -> None:
        if problems:  # the untimed warm-up every method gets (tflow.methods.warm_up)
            warm_up(self.receiver, self.cfg.agents.receiver, problems[0].question)
            if self.sender is not self.receiver:
                warm_up(self.sender, self.cfg.agents.senders[0], problems[0].question)

    @torch.no_grad()
    def sender_state(self, questions: Sequence[str], acc: Accounting, rows: list[Accounting]) -> torch.Tensor:
        """Mean over senders of the last-token hidden state after layer k: [B, d]."""
        states = []
        for role in self.cfg.agents.senders:
            batch = receiver_batch(self.sender.tokenizer, role, questions, padding_side="left")
            with acc.phase("sender_prefill"):
                out = self.sender.model(**{k: v.to(self.sender.device) for k, v in batch.items()},
                                        output_hidden_states=True, use_cache=False)
            states.append(out.hidden_states[self.k][:, -1, :].float())  # left padding: last = real token
            for i, row in enumerate(rows):
                row.add_tokens(f"sender:{role}", prompt=int(batch["attention_mask"][i].sum()))
        return torch.stack(states).mean(0)

    def answer(self, problems: Sequence[EvalProblem], prompts: Sequence[str]) -> list[MethodOutput]:
        acc, rows = Accounting(), [Accounting() for _ in problems]
        state = self.sender_state([p.sender_view for p in problems], acc, rows)
        layer = decoder_layers(self.receiver.model)[self.j - 1]
        with patch_last_token(layer, state.to(self.receiver.device), self.cfg.eval.ac_op):
            res = generate(self.receiver, self.cfg.agents.receiver, prompts, self.cfg.eval, acc, rows, "receiver",
                           self.cfg.eval.max_new_tokens, [p.task_id for p in problems])
        share_seconds(acc, rows)
        return [MethodOutput(t, n, tr, row) for (t, n, tr), row in zip(res, rows)]


def _left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


class KVCommunication:
    name = "kv"

    def __init__(self, cfg: DictConfig, receiver: Backbone, sender: Backbone):
        if sender is not receiver:
            raise ConfigError("method kv is homogeneous KV-cache communication: it needs the senders to share the "
                              "receiver's backbone (leave model.sender unset)")
        self.cfg, self.model = cfg, receiver

    @classmethod
    def build(cls, cfg: DictConfig, layers: Sequence[Any] = (), overrides: Sequence[str] = ()):
        return cls(cfg, *load_backbones(cfg)), cfg

    def prepare(self, problems: Sequence[EvalProblem]) -> None:
        if problems:  # the untimed warm-up every method gets (tflow.methods.warm_up)
            warm_up(self.model, self.cfg.agents.receiver, problems[0].question)

    def layout(self, problems: Sequence[EvalProblem], prompts: Sequence[str]
               ) -> tuple[torch.Tensor, torch.Tensor, int, list[dict[str, int]]]:
        """ids/mask [B, P + Q]: the senders' contexts (left-padded to P) then the receiver's prompt
        (left-padded to Q); the padding in the middle is masked. Also each row's tokens per agent."""
        tok = self.model.tokenizer
        enc = lambda role, text: tok(chat_text(tok, role, text), add_special_tokens=False)["input_ids"]  # noqa: E731
        prefix, counts = [], []
        for p in problems:
            parts = {f"sender:{r}": enc(r, p.question) for r in self.cfg.agents.senders}
            prefix.append([t for ids in parts.values() for t in ids])
            counts.append({a: len(ids) for a, ids in parts.items()})
        rec = [enc(self.cfg.agents.receiver, q) for q in prompts]
        for c, r in zip(counts, rec):
            c["receiver"] = len(r)
        p_ids, p_mask = _left_pad(prefix, tok.pad_token_id)
        r_ids, r_mask = _left_pad(rec, tok.pad_token_id)
        return torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1), p_ids.shape[1], counts

    @torch.no_grad()
    def answer(self, problems: Sequence[EvalProblem], prompts: Sequence[str]) -> list[MethodOutput]:
        acc, rows = Accounting(), [Accounting() for _ in problems]
        ids, mask, P, counts = self.layout(problems, prompts)
        dev = self.model.device
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with acc.phase("sender_prefill"):  # the senders' KV cache of the shared context
            cache = self.model.model(input_ids=ids[:, :P], attention_mask=mask[:, :P], position_ids=pos[:, :P],
                                     use_cache=True).past_key_values
        timer = PrefillTimer()
        out = self.model.model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache,
                                        max_new_tokens=self.cfg.eval.max_new_tokens,
                                        pad_token_id=self.model.tokenizer.pad_token_id, streamer=timer,
                                        **sampling(self.cfg.eval, [p.task_id for p in problems], "receiver"))
        prefill, decode = timer.split()
        acc.add_seconds("receiver_prefill", prefill)
        acc.add_seconds("decode", decode)
        res = decode_rows(self.model.tokenizer, out[:, ids.shape[1]:])
        for row, c, (_, n, _) in zip(rows, counts, res):
            for agent, k in c.items():
                row.add_tokens(agent, prompt=k, generated=n if agent == "receiver" else 0)
        share_seconds(acc, rows)
        return [MethodOutput(t, n, tr, row) for (t, n, tr), row in zip(res, rows)]
