"""Training-free latent comparators: activation communication and KV-cache communication.

  ac         Activation communication (arXiv 2501.14082): each sender reads the question under its role
             prompt; its last-token hidden state after layer k is taken (the senders' states averaged).
             The receiver's prefill is paused after its layer j at the prompt's last token, its state h is
             combined with the senders' state a by `replace` (a), `sum` (h + a) or `mean` ((h + a) / 2),
             and the forward pass resumes; decoding then runs unmodified.
  kv         KV-cache communication after the senders reason (as KV-based multi-agent systems): each sender
             writes its message (kv.message_tokens) under its role prompt, and the receiver attends to every
             sender's KV of its prompt and message before reading its own prompt.
  kv_prompt  Prompt-only KV: the senders' prefills (role prompt + sender view, one continuous context) leave
             a cache the receiver's prompt follows. With one shared backbone this equals a longer prompt, so
             nothing a sender computed reaches the receiver: a control, named so.
All count every sender prompt (and message) token as processed, as TFlow's sender prefills are. The
heterogeneous, learned variant is `tflow.methods.kv_hetero`.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from omegaconf import DictConfig
from transformers import DynamicCache

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


# ----------------------------------------------------------------------------- KV caches and rotary positions
def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> ids, mask [B, T], left-padded."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position of every token of a padded row [B, T]: real tokens 0, 1, ... (padding: 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def rotary(bb: Backbone, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone's rotary (cos, sin) at positions pos [B, T], fp32, as [B, 1, T, head_dim] each."""
    cos, sin = bb.model.model.rotary_emb(torch.zeros(1, device=bb.device), pos.to(bb.device))
    return cos.float().unsqueeze(1), sin.float().unsqueeze(1)


def _half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, -1)
    return torch.cat((-b, a), -1)


def rotate(x: torch.Tensor, cs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Apply rotary (cos, sin) to keys x [B, H, T, d] (Llama/Qwen's half-split pairs)."""
    cos, sin = cs
    return x * cos + _half(x) * sin


def unrotate(x: torch.Tensor, cs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Undo `rotate` with the same (cos, sin): exact, also when the rotary scales them (YaRN-style)."""
    cos, sin = cs
    return (x * cos - _half(x) * sin) / (cos ** 2 + sin ** 2)


def cache_tensors(cache: DynamicCache) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of every layer of a cache: [L, B, H, T, d] each."""
    return torch.stack([layer.keys for layer in cache.layers]), torch.stack([layer.values for layer in cache.layers])


def as_cache(keys: torch.Tensor, values: torch.Tensor) -> DynamicCache:
    """A cache holding keys and values [L, B, H, T, d] (autograd flows through it)."""
    return DynamicCache(ddp_cache_data=list(zip(keys.unbind(0), values.unbind(0))))


def receive(bb: Backbone, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor, cache: DynamicCache,
            prompt: dict[str, torch.Tensor], ev: DictConfig, acc: Accounting, task_ids: Sequence[str]
            ) -> list[tuple[str, int, bool]]:
    """The receiver answers its left-padded `prompt` batch after a transferred `cache` of the prefix [B, P]
    (masked where prefix_mask is 0; generate numbers the real tokens on from the prefix's); row i answers
    problem task_ids[i] (its sampling seed). Adds its prefill and decode seconds to `acc`; returns (text,
    generated tokens, truncated) per row."""
    ids = torch.cat([prefix_ids, prompt["input_ids"]], 1).to(bb.device)
    mask = torch.cat([prefix_mask, prompt["attention_mask"]], 1).to(bb.device)
    timer = PrefillTimer()
    with torch.no_grad():
        out = bb.model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=ev.max_new_tokens,
                                pad_token_id=bb.tokenizer.pad_token_id, streamer=timer,
                                **sampling(ev, task_ids, "receiver"))
    prefill, decode = timer.split()
    acc.add_seconds("receiver_prefill", prefill)
    acc.add_seconds("decode", decode)
    return decode_rows(bb.tokenizer, out[:, ids.shape[1]:])


# ----------------------------------------------------------------------------- homogeneous KV comparators
class KVPromptCommunication:
    """`kv_prompt`: the senders' prompts (role prompt + sender view, in sender order, one continuous context)
    prefilled once; the receiver's prompt is appended after that cache. With one shared backbone this equals a
    longer prompt: nothing a sender computed beyond reading reaches the receiver (kept as that control)."""

    name = "kv_prompt"

    def __init__(self, cfg: DictConfig, receiver: Backbone, sender: Backbone):
        if sender is not receiver:
            raise ConfigError(f"method {self.name} is homogeneous KV-cache communication: it needs the senders to "
                              "share the receiver's backbone (leave model.sender unset; kv_hetero maps across models)")
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
            parts = {f"sender:{r}": enc(r, p.sender_view) for r in self.cfg.agents.senders}
            prefix.append([t for ids in parts.values() for t in ids])
            counts.append({a: len(ids) for a, ids in parts.items()})
        rec = [enc(self.cfg.agents.receiver, q) for q in prompts]
        for c, r in zip(counts, rec):
            c["receiver"] = len(r)
        p_ids, p_mask = left_pad(prefix, tok.pad_token_id)
        r_ids, r_mask = left_pad(rec, tok.pad_token_id)
        return torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1), p_ids.shape[1], counts

    @torch.no_grad()
    def answer(self, problems: Sequence[EvalProblem], prompts: Sequence[str]) -> list[MethodOutput]:
        acc, rows = Accounting(), [Accounting() for _ in problems]
        ids, mask, P, counts = self.layout(problems, prompts)
        dev = self.model.device
        with acc.phase("sender_prefill"):  # the senders' KV cache of the shared context
            cache = self.model.model(input_ids=ids[:, :P].to(dev), attention_mask=mask[:, :P].to(dev),
                                     position_ids=positions(mask[:, :P]).to(dev), use_cache=True).past_key_values
        res = receive(self.model, ids[:, :P], mask[:, :P], cache, {"input_ids": ids[:, P:], "attention_mask": mask[:, P:]},
                      self.cfg.eval, acc, [p.task_id for p in problems])
        for row, c, (_, n, _) in zip(rows, counts, res):
            for agent, k in c.items():
                row.add_tokens(agent, prompt=k, generated=n if agent == "receiver" else 0)
        share_seconds(acc, rows)
        return [MethodOutput(t, n, tr, row) for (t, n, tr), row in zip(res, rows)]


@torch.no_grad()
def message_cache(bb: Backbone, role: str, views: Sequence[str], tokens: int, ev: DictConfig, acc: Accounting,
                  task_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[int], list[int]]:
    """One sender writes its message (role prompt + view, exactly `tokens` new tokens, as TextMAS short48) and
    keeps the KV of its prompt and message. Returns ids, keep mask, its positions [B, T] (prompt + message
    tokens; keep is 0 at padding and after a row's end of turn), keys and values [L, B, H, T, d], and per
    row the prompt and message token counts."""
    batch = receiver_batch(bb.tokenizer, role, views, padding_side="left")
    batch = {k: v.to(bb.device) for k, v in batch.items()}
    timer = PrefillTimer()
    out = bb.model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=bb.tokenizer.pad_token_id,
                            streamer=timer, return_dict_in_generate=True,
                            **sampling(ev, task_ids, f"sender:{role}"))
    prefill, decode = timer.split()
    acc.add_seconds("sender_prefill", prefill)
    acc.add_seconds("sender_decode", decode)
    seq, width = out.sequences, batch["input_ids"].shape[1]  # [B, T]: prompt then message
    full = torch.cat([batch["attention_mask"], torch.ones_like(seq[:, width:])], 1)
    pos = positions(full)  # what generate numbered the tokens with
    cache = out.past_key_values
    with acc.phase("sender_decode"):  # generate samples the last token but never reads it: its KV too
        bb.model(input_ids=seq[:, -1:], attention_mask=full, position_ids=pos[:, -1:], past_key_values=cache)
    keys, values = cache_tensors(cache)
    if keys.shape[3] != seq.shape[1]:
        raise RuntimeError(f"sender cache holds {keys.shape[3]} tokens, expected {seq.shape[1]}")
    sent = [n for _, n, _ in decode_rows(bb.tokenizer, seq[:, width:], forced=True)]
    keep = full.clone()
    for i, n in enumerate(sent):
        keep[i, width + n:] = 0
    return seq, keep, pos, keys, values, batch["attention_mask"].sum(1).tolist(), sent


class KVCommunication(KVPromptCommunication):
    """`kv`: each sender first writes its message (kv.message_tokens, as TextMAS short48's senders); the
    receiver attends to every sender's KV of its prompt AND message (sender order), then reads its prompt.
    The senders' caches are computed apart (each from position 0); their keys are moved to the positions the
    receiver gives the transferred tokens (rotary undone at the sender's, applied at the receiver's), the
    `transform` phase."""

    name = "kv"

    @torch.no_grad()
    def answer(self, problems: Sequence[EvalProblem], prompts: Sequence[str]) -> list[MethodOutput]:
        acc, rows = Accounting(), [Accounting() for _ in problems]
        parts = []
        for role in self.cfg.agents.senders:
            seq, keep, pos, keys, values, n_prompt, n_sent = message_cache(
                self.model, role, [p.sender_view for p in problems], self.cfg.kv.message_tokens, self.cfg.eval, acc,
                [p.task_id for p in problems])
            parts.append((seq, keep, pos, keys, values))
            for row, a, b in zip(rows, n_prompt, n_sent):
                row.add_tokens(f"sender:{role}", prompt=a, generated=b)
        with acc.phase("transform"):  # the edge: concatenate the senders' caches at the receiver's positions
            ids, keep, src = (torch.cat([p[i] for p in parts], 1) for i in range(3))
            keys, values = (torch.cat([p[i] for p in parts], 3) for i in (3, 4))  # [L, B, H, P, d]
            keys = rotate(unrotate(keys.float(), rotary(self.model, src)), rotary(self.model, positions(keep)))
            cache = as_cache(keys.to(values.dtype), values)
        prompt = receiver_batch(self.model.tokenizer, self.cfg.agents.receiver, prompts, padding_side="left")
        res = receive(self.model, ids, keep, cache, prompt, self.cfg.eval, acc, [p.task_id for p in problems])
        for i, (row, (_, n, _)) in enumerate(zip(rows, res)):
            row.add_tokens("receiver", prompt=int(prompt["attention_mask"][i].sum()), generated=n)
        share_seconds(acc, rows)
        return [MethodOutput(t, n, tr, row) for (t, n, tr), row in zip(res, rows)]
