"""`kv_hetero`: dense KV-cache communication across models (arXiv 2606.13594, "See What I See, Know What I
Think"). The senders run on a SENDER model (kv.sender, else model.sender, else the receiver's; frozen) that
may differ from the receiver in layers, KV heads and head width; a lightweight learned cache transformation
maps each sender's KV cache of its prompt (role prompt + sender view) into the receiver's layers and heads,
and the receiver answers with the transformed caches (sender order) before its own prompt.

    python -m tflow.methods.kv_hetero --config config/run/cpu.yaml [--config config/run/qwen_pair.yaml] [key=value ...]

The transformation (`CacheTransform`, ~1.9M parameters for Qwen2.5-Coder 0.5B -> 1.5B):
  layers   receiver layer j reads a softmax mix of the sender's layers (per K and V), initialised peaked at the
           proportional layer j (Ls - 1) / (Lr - 1);
  heads    one affine map per receiver layer (and K/V) from the sender's concatenated KV heads
           [Hs * ds] to the receiver's [Hr * dr] (heads and head width at once); built as a rectangular
           identity, set at phase 1's first step to the ridge least-squares fit on that batch (RIDGE);
  rotary   keys are un-rotated with the sender's rotary at the sender's positions, mapped, and rotated with
           the receiver's rotary at the positions the receiver gives the transferred tokens (each sender's
           prompt from position 0 on the sender; one after another on the receiver), so the map sees no
           position and the receiver's attention sees consistent ones.
The receiver must read the senders' tokens as the same ids (a shared tokenizer): transferred tokens keep their
ids, and reconstruction aligns the two models' K/V token by token.

Training (tflow.methods.trainer: TFlow's data, batches, steps, schedule, optimiser, seed), both models frozen,
in the paper's two phases: steps < kv.reconstruction_fraction x train.steps minimise the normalised MSE
between the transformed cache and the receiver's OWN K/V of the same tokens (per layer, K and V, relative to
the target's energy); later steps minimise the receiver's next-token cross-entropy on the solution with the
transformed cache before its prompt. Phase 2 trains the context-aware layout by default (kv.train_context:
aware | unaware | alternate): the paper's duality puts the dense knowledge the context-unaware setting needs
in reconstruction, which is layout-free, so one trained transformation serves both evaluation settings
(eval.kv_context): aware, the receiver also reads its full task prompt; unaware, it reads only the
answer-format part of it (the problem text removed), so the question reaches it only through the cache.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig
from torch import nn

from tflow.accounting import Accounting
from tflow.agents import receiver_batch
from tflow.data import Problem
from tflow.errors import CheckpointError, ConfigError, cli
from tflow.methods.base import MethodOutput, read_trained, row_nll, share_seconds, warm_up
from tflow.methods.latent import as_cache, cache_tensors, left_pad, positions, receive, rotary, rotate, unrotate
from tflow.methods.trainer import trainer_main
from tflow.mix import receiver_prompt, sender_view
from tflow.models import Backbone, load_backbone, load_backbones
from tflow.prompts import chat_text
from tflow.tasks.base import EvalProblem


def kv_shape(bb: Backbone) -> tuple[int, int, int]:
    """(layers, KV heads, head width) of a backbone's cache."""
    c = bb.model.config
    return c.num_hidden_layers, c.num_key_value_heads, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


# Relative ridge of the least-squares start of phase 1 (times the mean diagonal of the Gram matrix): on the
# Qwen2.5-Coder 0.5B -> 1.5B pair, fitted on one batch of 2, the normalised MSE on other batches is 0.33 at
# 0.1 and 0.78 at 0.001 (overfitted), against 1.77 after 20 Adam steps (lr 2e-3) from the identity start.
RIDGE = 0.1


class CacheTransform(nn.Module):
    """Sender cache [Ls, B, Hs, T, ds] -> receiver cache [Lr, B, Hr, T, dr]; index 0 of every parameter maps
    keys, index 1 values."""

    def __init__(self, src: tuple[int, int, int], dst: tuple[int, int, int]):
        super().__init__()
        (ls, hs, ds), (lr, hr, dr) = src, dst
        self.dst = dst
        proportional = torch.arange(lr).float()[:, None] * (ls - 1) / max(lr - 1, 1)  # [Lr, 1]
        mix = -4.0 * (torch.arange(ls).float()[None, :] - proportional).abs()  # [Lr, Ls]
        self.mix = nn.Parameter(mix.expand(2, lr, ls).clone())  # [2, Lr, Ls] layer-mix logits
        self.weight = nn.Parameter(torch.eye(hs * ds, hr * dr).expand(2, lr, -1, -1).clone())  # [2, Lr, Ds, Dr]
        self.bias = nn.Parameter(torch.zeros(2, lr, hr * dr))  # [2, Lr, Dr]

    def _mixed(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """x [Ls, B, Hs, T, ds] -> receiver layer j's mix of the sender's layers [Lr, B, T, Ds] (i: 0 keys, 1 values)."""
        ls, b, hs, t, ds = x.shape
        x = x.permute(0, 1, 3, 2, 4).reshape(ls, b, t, hs * ds)  # [Ls, B, T, Ds]
        return torch.einsum("rl,lbtd->rbtd", self.mix[i].softmax(-1), x)

    def _map(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """x [Ls, B, Hs, T, ds] -> [Lr, B, Hr, T, dr] with map i (0 keys, 1 values)."""
        lr, hr, dr = self.dst
        y = torch.einsum("rbtd,rde->rbte", self._mixed(x, i), self.weight[i]) + self.bias[i][:, None, None]  # [Lr, B, T, Dr]
        return y.view(lr, y.shape[1], y.shape[2], hr, dr).permute(0, 1, 3, 2, 4)

    @torch.no_grad()
    def fit(self, src: tuple[torch.Tensor, torch.Tensor], dst: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
            ridge: float = RIDGE) -> None:
        """Set the head/width maps (keys, values) to the ridge least-squares fit of dst [Lr, B, Hr, T, dr] from
        src [Ls, B, Hs, T, ds] (un-rotated keys) over the real tokens (mask [B, T]), given the layer mix."""
        keep = mask.bool().to(self.weight.device)
        for i in (0, 1):
            x = self._mixed(src[i].float(), i)[:, keep]  # [Lr, N, Ds]
            y = dst[i].float().permute(0, 1, 3, 2, 4).flatten(3)[:, keep]  # [Lr, N, Dr]
            x = torch.cat([x, torch.ones_like(x[..., :1])], -1)  # a bias column
            gram = x.transpose(1, 2) @ x  # [Lr, Ds + 1, Ds + 1]
            gram += ridge * gram.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * torch.eye(gram.shape[-1], device=x.device)
            w = torch.linalg.solve(gram, x.transpose(1, 2) @ y)  # [Lr, Ds + 1, Dr]
            self.weight[i].copy_(w[:, :-1])
            self.bias[i].copy_(w[:, -1])

    def forward(self, keys: torch.Tensor, values: torch.Tensor, src_rot: tuple[torch.Tensor, torch.Tensor],
                dst_rot: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sender keys (rotated at the sender's positions: src_rot) and values -> receiver keys (rotated at
        the receiver's: dst_rot) and values, fp32."""
        return rotate(self._map(unrotate(keys.float(), src_rot), 0), dst_rot), self._map(values.float(), 1)


# ----------------------------------------------------------------------------- layouts
Blocks = list[tuple[torch.Tensor, torch.Tensor]]  # per sender (in order): left-padded ids, mask [B, T_s]


def sender_blocks(tok: Any, roles: Sequence[str], views: Sequence[str]) -> Blocks:
    """Every sender's prompt (its role prompt + the view) for a batch of views."""
    enc = lambda role, text: tok(chat_text(tok, role, text), add_special_tokens=False)["input_ids"]  # noqa: E731
    return [left_pad([enc(role, v) for v in views], tok.pad_token_id) for role in roles]


def prefill_kv(bb: Backbone, blocks: Blocks) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone's K/V of every block, each prefilled alone from position 0, concatenated: [L, B, H, P, d]."""
    parts, dev = [], bb.device
    for ids, mask in blocks:
        cache = bb.model.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=positions(mask).to(dev),
                               use_cache=True).past_key_values
        parts.append(cache_tensors(cache))
    return torch.cat([k for k, _ in parts], 3), torch.cat([v for _, v in parts], 3)


def answer_format(prompt: str, texts: Sequence[str]) -> str:
    """The task prompt without the problem (the first of `texts` found in it): what a context-unaware receiver
    reads, the answer-format instruction (an emptied code fence dropped)."""
    for text in texts:
        if text.strip() and text.strip() in prompt:
            rest = re.sub(r"```python\s*```", "", prompt.replace(text.strip(), ""))
            return re.sub(r"\n{3,}", "\n\n", rest).strip()
    raise ValueError(f"no problem text found in the prompt {prompt[:80]!r}...: cannot drop it (context-unaware)")


def same_ids(sender: Backbone, receiver: Backbone) -> bool:
    """Whether the receiver's tokenizer gives every token of the sender's the same id."""
    theirs = receiver.tokenizer.get_vocab()
    return all(theirs.get(t) == i for t, i in sender.tokenizer.get_vocab().items())


def kv_sender(cfg: DictConfig, sender: Backbone) -> Backbone:
    """kv_hetero's sender: kv.sender when set, else the run's sender."""
    if cfg.kv.sender is None:
        return sender
    bb = load_backbone(cfg.kv.sender, cfg.model.cache_dir)
    bb.tokenizer.chat_template_kwargs = ({} if cfg.model.enable_thinking is None  # as load_backbones does
                                         else {"enable_thinking": bool(cfg.model.enable_thinking)})
    return bb


# ----------------------------------------------------------------------------- the trainable link
class KVHeteroTrainee:
    """The transformation between a sender and the receiver, with both settings' losses (tflow.methods.trainer's
    Trainee; evaluation reuses it frozen)."""

    def __init__(self, cfg: DictConfig, receiver: Backbone, sender: Backbone):
        self.cfg, self.receiver, self.sender = cfg, receiver, kv_sender(cfg, sender)
        if self.sender is not receiver and not same_ids(self.sender, receiver):
            raise ConfigError(f"kv_hetero needs the receiver ({receiver.ident}) to read every token of the sender "
                              f"({self.sender.ident}) as the same id (a shared tokenizer)")
        self.transform = CacheTransform(kv_shape(self.sender), kv_shape(receiver)).to(receiver.device)
        self.reconstruction_steps = round(cfg.kv.reconstruction_fraction * cfg.train.steps)

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.transform.parameters())

    def transfer(self, blocks: Blocks, keys: torch.Tensor, values: torch.Tensor, dst: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The senders' K/V [Ls, B, Hs, P, ds] of `blocks` as receiver K/V [Lr, B, Hr, P, dr] at receiver
        positions dst [B, P] (default: the blocks one after another, padding skipped)."""
        src = torch.cat([positions(m) for _, m in blocks], 1)  # each sender numbered its prompt from 0
        dst = positions(torch.cat([m for _, m in blocks], 1)) if dst is None else dst
        return self.transform(keys, values, rotary(self.sender, src), rotary(self.receiver, dst))

    def prompts(self, problems: Sequence[Problem | EvalProblem], prompts: Sequence[str], context: str) -> list[str]:
        """The receiver's user messages: the task prompts (aware) or their answer-format part (unaware)."""
        if context == "aware":
            return list(prompts)
        views = [p.sender_view if isinstance(p, EvalProblem) else sender_view(p) for p in problems]
        return [answer_format(q, [v, p.question]) for q, v, p in zip(prompts, views, problems)]

    def scored(self, problems: Sequence[Problem], context: str, views: Sequence[str] | None = None
               ) -> tuple[Any, torch.Tensor]:
        """The receiver's teacher-forced forward on the solutions after the transferred cache: (output, labels).
        views: what the senders read (default each problem's own view; a control passes other problems')."""
        views = [sender_view(p) for p in problems] if views is None else views
        blocks = sender_blocks(self.sender.tokenizer, self.cfg.agents.senders, views)
        with torch.no_grad():
            keys, values = prefill_kv(self.sender, blocks)
        keys, values = self.transfer(blocks, keys, values)
        dtype, dev = self.receiver.model.dtype, self.receiver.device
        prompts = self.prompts(problems, [receiver_prompt(p) for p in problems], context)
        batch = receiver_batch(self.receiver.tokenizer, self.cfg.agents.receiver, prompts, [p.solution for p in problems],
                               self.cfg.data.max_solution_tokens, padding_side="right")
        mask = torch.cat([torch.cat([m for _, m in blocks], 1), batch["attention_mask"]], 1)  # [B, P + T]
        P = mask.shape[1] - batch["input_ids"].shape[1]
        out = self.receiver.model(input_ids=batch["input_ids"].to(dev), attention_mask=mask.to(dev),
                                  position_ids=positions(mask)[:, P:].to(dev), labels=batch["labels"].to(dev),
                                  past_key_values=as_cache(keys.to(dtype), values.to(dtype)))
        return out, batch["labels"]

    def loss(self, problems: Sequence[Problem], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        if step < self.reconstruction_steps:  # phase 1: the receiver's own K/V of the same tokens
            blocks = sender_blocks(self.sender.tokenizer, self.cfg.agents.senders, [sender_view(p) for p in problems])
            with torch.no_grad():
                keys, values = prefill_kv(self.sender, blocks)
                target = prefill_kv(self.receiver, blocks)
            src = torch.cat([positions(m) for _, m in blocks], 1)
            mask = torch.cat([m for _, m in blocks], 1).to(keys.device)  # [B, P]
            if step == 0:  # phase 1 starts from the least-squares map of its first batch
                self.transform.fit((unrotate(keys.float(), rotary(self.sender, src)), values),
                                   (unrotate(target[0].float(), rotary(self.receiver, src)), target[1]), mask)
            pred = self.transfer(blocks, keys, values, dst=src)  # the receiver's positions for the same text
            mask = mask[None, :, None, :, None].float()  # [1, B, 1, P, 1]
            nmse = [(((p - t.float()) ** 2 * mask).sum((1, 2, 3, 4)) / ((t.float() ** 2) * mask).sum((1, 2, 3, 4)))
                    for p, t in zip(pred, target)]  # per layer, keys and values
            rec = torch.cat(nmse).mean()
            return rec, {"phase": 1, "reconstruction": rec.item()}
        ctx = self.cfg.kv.train_context
        context = ("aware" if step % 2 == 0 else "unaware") if ctx == "alternate" else ctx
        ce = self.scored(problems, context)[0].loss
        return ce, {"phase": 2, "ce": ce.item()}

    def save(self, folder: Path) -> None:
        torch.save({"state": self.transform.state_dict(), "sender": self.sender.fingerprint(),
                    "receiver": self.receiver.fingerprint()}, folder / "transform.pt")


# ----------------------------------------------------------------------------- the method
class KVHetero:
    name = "kv_hetero"

    def __init__(self, cfg: DictConfig, link: KVHeteroTrainee):
        self.cfg, self.link = cfg, link
        link.transform.requires_grad_(False)

    @classmethod
    def build(cls, cfg: DictConfig, layers: Sequence[Any] = (), overrides: Sequence[str] = ()) -> tuple["KVHetero", DictConfig]:
        receiver, sender = load_backbones(cfg)
        folder = read_trained(cfg.eval.checkpoint, "kv_hetero", receiver)
        link = KVHeteroTrainee(cfg, receiver, sender)
        blob = torch.load(folder / "module" / "transform.pt", map_location=receiver.device, weights_only=True)
        if blob["sender"] != link.sender.fingerprint():
            raise CheckpointError(f"{folder} maps sender {blob['sender']['ident']}, not {link.sender.ident}")
        link.transform.load_state_dict(blob["state"])
        return cls(cfg, link), cfg

    def prepare(self, problems: Sequence[EvalProblem]) -> None:
        if problems:  # the untimed warm-up every method gets (tflow.methods.warm_up)
            warm_up(self.link.receiver, self.cfg.agents.receiver, problems[0].question)
            if self.link.sender is not self.link.receiver:
                warm_up(self.link.sender, self.cfg.agents.senders[0], problems[0].question)

    @torch.no_grad()
    def answer(self, problems: Sequence[EvalProblem], prompts: Sequence[str]) -> list[MethodOutput]:
        acc, rows = Accounting(), [Accounting() for _ in problems]
        link, receiver = self.link, self.link.receiver
        roles = list(self.cfg.agents.senders)
        blocks = sender_blocks(link.sender.tokenizer, roles, [p.sender_view for p in problems])
        with acc.phase("sender_prefill"):
            keys, values = prefill_kv(link.sender, blocks)
        with acc.phase("transform"):
            keys, values = link.transfer(blocks, keys, values)
            cache = as_cache(keys.to(receiver.model.dtype), values.to(receiver.model.dtype))
        prompt = receiver_batch(receiver.tokenizer, self.cfg.agents.receiver,
                                link.prompts(problems, prompts, self.cfg.eval.kv_context), padding_side="left")
        ids, mask = torch.cat([i for i, _ in blocks], 1), torch.cat([m for _, m in blocks], 1)
        res = receive(receiver, ids, mask, cache, prompt, self.cfg.eval, acc, [p.task_id for p in problems])
        for i, (row, (_, n, _)) in enumerate(zip(rows, res)):
            for role, (_, m) in zip(roles, blocks):
                row.add_tokens(f"sender:{role}", prompt=int(m[i].sum()))
            row.add_tokens("receiver", prompt=int(prompt["attention_mask"][i].sum()), generated=n)
        share_seconds(acc, rows)
        return [MethodOutput(t, n, tr, row) for (t, n, tr), row in zip(res, rows)]

    @torch.no_grad()
    def reference_nll(self, problems: Sequence[Problem]) -> list[tuple[float, int]]:
        """Per problem: the summed NLL of its solution tokens (and their count) after the transferred cache,
        in the configured setting (eval.kv_context)."""
        out = []
        for k in range(0, len(problems), self.cfg.eval.batch_size):
            res, labels = self.link.scored(problems[k:k + self.cfg.eval.batch_size], self.cfg.eval.kv_context)
            out += list(zip(*row_nll(res.logits, labels.to(res.logits.device))))
        return out


@cli
def main(argv: Sequence[str] | None = None) -> None:
    trainer_main("kv_hetero", KVHeteroTrainee, argv, __doc__)


if __name__ == "__main__":
    main()
