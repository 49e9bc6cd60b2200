"""`lmnet`: learned dense-vector edges (LMNet, arXiv 2505.12741) on TFlow's harness. This module is both the
method and its trainer:

    python -m tflow.methods.lmnet --config config/run/cpu.yaml [lmnet.edge=mlp] [key=value ...]

Topology. LMNet's vertices are LLMs without embedding / de-embedding, its edges trainable seq2seq modules
carrying dense vectors, a vertex's input the sum of its incoming edges. Here, as in TFlow, there is one layer
of edges, senders -> receiver, and every backbone stays frozen:

  sender s (frozen; its role prompt + the sender view, one prefill)
    -> final hidden states (after the final norm, before de-embedding) at the question span [T_s, d_sender]
       (the positions before it are the role prompt, identical for every query under causal attention; the
       same span TFlow's condition reads, capped at agents.max_question_tokens)
    -> edge s (trainable): LayerNorm + Linear to the edge width, `lmnet.depth` blocks, LayerNorm + Linear to
       the receiver's embedding width, times the receiver's embedding RMS [T_s, d_receiver]
  receiver (frozen; reads inputs_embeds): its chat prompt's token embeddings (role prompt, user turn, task
       prompt) with [edge 1's T_1 soft tokens][edge 2's T_2] inserted where the user message's content starts
       -> answers. (Not before the whole prompt: these models keep an attention sink on the chat's first token;
       with soft vectors in its place the Qwen receiver's CE on the second training batch, after one update,
       was 8.02, against 0.63 with this placement.)

Blocks: `transformer` (LMNet's edge): pre-norm self-attention over the sender's span (bidirectional: the
message is complete before the receiver starts) and an MLP; `mlp` (the capacity variant a reviewer asked
for): the same blocks without attention, so each soft token depends on its own sender state only.
Aggregation: LMNet sums incoming edges position by position because all its vertices read the same prompt;
the receiver here reads its own prompt, so each edge's message is a segment of soft tokens inside it
(segments in sender order, padding outside every row's sequence, positions from the attention mask).

Parameters are matched to TFlow's trainable module (layer aggregator, generator, fusion; tflow.pipeline) for
the same config: with lmnet.width null the edge width is the one whose total (all senders' edges) is closest,
and it must lie within lmnet.match_tolerance; both counts go into train_summary.json and trained.json.

Training (tflow.methods.trainer, TFlow's data, batches, budget, schedule and optimiser): the receiver's
next-token cross-entropy on the reference solution after tflow.mix.receiver_prompt(p) with the soft tokens.
Accounting: each sender's whole prompt as its prefill; the soft tokens as receiver prompt tokens (the
receiver processes them); phases sender_prefill, transform (the edges), receiver_prefill, decode.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from tflow.accounting import Accounting, PrefillTimer
from tflow.agents import question_span, receiver_batch
from tflow.data import Problem
from tflow.errors import CheckpointError, ConfigError, cli
from tflow.generator import Attention
from tflow.methods.base import MethodOutput, decode_rows, read_trained, sampling, share_seconds, warm_up
from tflow.methods.trainer import train_module, trainer_main
from tflow.mix import receiver_prompt, sender_view
from tflow.models import Backbone, load_backbones
from tflow.tasks.base import EvalProblem
from tflow.utils import torch_save_atomic

FORMAT = "tflow-lmnet/1"
ARCH = ("edge", "depth", "heads", "mlp_ratio")  # lmnet keys a trained module must agree on with the run


class EdgeBlock(nn.Module):
    """Pre-norm residual block: self-attention over the sequence (transformer edge only), then an MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, attention: bool):
        super().__init__()
        self.attn = Attention(width, heads) if attention else None
        self.attn_norm = nn.LayerNorm(width) if attention else None
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # x: [B, T, W]; mask: [B, T] True at real tokens
        if self.attn is not None:
            x = x + self.attn(self.attn_norm(x), mask=mask)
        return x + self.mlp(self.norm(x))


class Edge(nn.Module):
    """One sender -> receiver edge: sender states [B, T, d_in] -> soft input embeddings [B, T, d_out]."""

    def __init__(self, kind: str, d_in: int, d_out: int, width: int, depth: int, heads: int, mlp_ratio: int,
                 out_scale: float = 1.0):
        super().__init__()
        self.inp = nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, width))
        self.blocks = nn.ModuleList([EdgeBlock(width, heads, mlp_ratio, kind == "transformer") for _ in range(depth)])
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, d_out))
        self.register_buffer("out_scale", torch.tensor(float(out_scale)))  # the receiver's embedding RMS

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.inp(h)  # [B, T, W]
        for block in self.blocks:
            x = block(x, mask)
        return self.out(x) * self.out_scale  # [B, T, d_out]


def make_edges(lm: Any, senders: int, d_in: int, d_out: int, width: int, out_scale: float = 1.0) -> nn.ModuleList:
    return nn.ModuleList([Edge(lm.edge, d_in, d_out, width, lm.depth, lm.heads, lm.mlp_ratio, out_scale)
                          for _ in range(senders)])


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tflow_parameters(cfg: DictConfig, receiver: Backbone, sender: Backbone) -> int:
    """Trainable parameters of TFlow's module (aggregator, generator, fusion) for this config and backbones."""
    from tflow.pipeline import build_tflow

    with torch.device("meta"):
        return count(build_tflow(cfg, receiver, sender))


def matched_width(lm: Any, senders: int, d_in: int, d_out: int, target: int) -> int:
    """The edge width (a multiple of the heads for the transformer edge) whose edges' total parameter count is
    closest to `target`; a ConfigError when even the closest is off by more than lm.match_tolerance."""
    step = lm.heads if lm.edge == "transformer" else 1

    def total(w: int) -> int:
        with torch.device("meta"):
            return count(make_edges(lm, senders, d_in, d_out, w))

    lo, hi = 1, 1  # in steps: total(lo * step) < target <= total(hi * step), unless target is tiny
    while total(hi * step) < target:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total(mid * step) < target else (lo, mid)
    width = min((lo * step, hi * step), key=lambda w: abs(total(w) - target))
    gap = abs(total(width) - target) / target
    if gap > lm.match_tolerance:
        raise ConfigError(f"key 'lmnet.width': no {lm.edge} edge width matches TFlow's {target} parameters within "
                          f"{lm.match_tolerance:.0%} (closest: width {width}, {total(width)}); set lmnet.width")
    return width


def pad(rows: Sequence[torch.Tensor], side: str, fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row an [n_b, ...] tensor -> padded [B, N, ...] and mask [B, N] (long), padding on `side`."""
    N = max(r.shape[0] for r in rows)
    out = rows[0].new_full((len(rows), N, *rows[0].shape[1:]), fill)
    mask = torch.zeros(len(rows), N, dtype=torch.long, device=rows[0].device)
    for b, r in enumerate(rows):
        sl = slice(N - r.shape[0], N) if side == "left" else slice(0, r.shape[0])
        out[b, sl], mask[b, sl] = r, 1
    return out, mask


class Graph:
    """Senders -> edges -> receiver: what training and evaluation share."""

    def __init__(self, cfg: DictConfig, receiver: Backbone, sender: Backbone, edges: nn.ModuleList):
        self.cfg, self.receiver, self.sender, self.edges = cfg, receiver, sender, edges.to(receiver.device)

    @torch.no_grad()
    def sender_states(self, role: str, views: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """One frozen prefill of the role's prompts: final hidden states at the question spans [B, T, d_s]
        (fp32), their mask [B, T] (bool) and each row's prompt tokens."""
        tok, dev = self.sender.tokenizer, self.sender.device
        spans = [question_span(tok, role, v, self.cfg.agents.max_question_tokens) for v in views]
        ids, mask = pad([torch.tensor(s.input_ids) for s in spans], "right", tok.pad_token_id)
        h = self.sender.model.model(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                                    use_cache=False).last_hidden_state  # [B, W, d_s], after the final norm
        states, smask = pad([h[b, s.start:s.end].float() for b, s in enumerate(spans)], "right")
        return states.to(self.receiver.device), smask.bool().to(self.receiver.device), [len(s.input_ids) for s in spans]

    def soft_tokens(self, views: Sequence[str], acc: Accounting | None = None,
                    rows: list[Accounting] | None = None) -> list[torch.Tensor]:
        """Per row, the edges' messages in sender order: [n_b, d_r] (fp32)."""
        acc = acc or Accounting()
        parts = []
        for role, edge in zip(self.cfg.agents.senders, self.edges):
            with acc.phase("sender_prefill"):
                states, mask, prompt = self.sender_states(role, views)
            for b, row in enumerate(rows or []):
                row.add_tokens(f"sender:{role}", prompt=prompt[b])
            with acc.phase("transform"):
                out = edge(states, mask)  # [B, T_s, d_r]
            parts.append([out[b, mask[b]] for b in range(len(views))])
        return [torch.cat(seg) for seg in zip(*parts)]

    def inputs(self, soft: Sequence[torch.Tensor], prompts: Sequence[str], solutions: Sequence[str] | None = None,
               side: str = "right") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[int]]:
        """The receiver's input: per row its chat prompt (and solution) embeddings with the soft tokens inserted
        where the user message's content starts, padded on `side`. Returns inputs_embeds [B, N, d_r], attention
        mask [B, N], labels [B, N] (-100 outside the solution; None without solutions) and each row's length
        (soft tokens included)."""
        rec, dev, role = self.receiver, self.receiver.device, self.cfg.agents.receiver
        batch = receiver_batch(rec.tokenizer, role, prompts, solutions, self.cfg.data.max_solution_tokens,
                               padding_side="right")
        starts = [question_span(rec.tokenizer, role, p, 1 << 30).start for p in prompts]  # the user content's first token
        embed = rec.model.get_input_embeddings()
        dtype = embed.weight.dtype
        seqs, labels = [], []
        for b, (s, k) in enumerate(zip(soft, starts)):
            n = int(batch["attention_mask"][b].sum())
            e = embed(batch["input_ids"][b, :n].to(dev))  # [n, d_r]
            seqs.append(torch.cat([e[:k], s.to(dtype), e[k:]]))  # [n + n_s, d_r]
            if solutions is not None:
                row = batch["labels"][b, :n]
                labels.append(torch.cat([row[:k], torch.full((s.shape[0],), -100), row[k:]]).to(dev))
        embeds, mask = pad(seqs, side)
        lab = pad(labels, side, -100)[0] if solutions is not None else None
        return embeds, mask, lab, [len(x) for x in seqs]

    def nll(self, soft: Sequence[torch.Tensor], prompts: Sequence[str], solutions: Sequence[str]
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced solutions after the soft tokens and the prompts: per row the summed next-token NLL [B]
        (differentiable) and the scored tokens [B]. Left padding puts every solution at the end, so the logits
        are computed for the last K positions only (the vocabulary projection of a 150k-token vocabulary is a
        large share of a forward pass); equal to tflow.methods.base.row_nll on the full logits."""
        embeds, mask, labels, _ = self.inputs(soft, prompts, solutions, side="left")
        K = int((labels != -100).sum(1).max()) + 1  # the scored tail and the position before it
        logits = self.receiver.model(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=K,
                                     position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits  # [B, K, V]
        target = labels[:, -K:][:, 1:]  # position t predicts token t+1: [B, K-1]
        nll = nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, ignore_index=-100,
                                          reduction="none")  # [B, K-1]
        return nll.sum(1), (target != -100).sum(1)


def receiver_rms(receiver: Backbone) -> float:
    """RMS of the receiver's input-embedding entries: the scale its token embeddings have."""
    return receiver.model.get_input_embeddings().weight.float().pow(2).mean().sqrt().item()


class LMNetTrainee(Graph):
    """The edges (fresh, fp32), matched to TFlow's parameter count unless lmnet.width is set."""

    def __init__(self, cfg: DictConfig, receiver: Backbone, sender: Backbone):
        lm, S = cfg.lmnet, len(cfg.agents.senders)
        target = tflow_parameters(cfg, receiver, sender)
        width = lm.width or matched_width(lm, S, sender.hidden_size, receiver.hidden_size, target)
        super().__init__(cfg, receiver, sender, make_edges(lm, S, sender.hidden_size, receiver.hidden_size, width,
                                                           receiver_rms(receiver)))
        n = count(self.edges)
        self.info = {"edge": lm.edge, "width": width, "depth": lm.depth, "heads": lm.heads, "mlp_ratio": lm.mlp_ratio,
                     "senders": list(cfg.agents.senders), "d_sender": sender.hidden_size,
                     "d_receiver": receiver.hidden_size, "lmnet_parameters": n, "tflow_parameters": target,
                     "parameter_ratio": n / target, "matched": lm.width is None}

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.edges.parameters())

    def loss(self, problems: Sequence[Problem], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        soft = self.soft_tokens([sender_view(p) for p in problems])
        nll, n = self.nll(soft, [receiver_prompt(p) for p in problems], [p.solution for p in problems])
        ce = nll.sum() / n.sum()  # mean over the batch's solution tokens, as the generator's loss
        return ce, {"ce": ce.item()}

    def save(self, folder: Path) -> None:
        torch_save_atomic({"format": FORMAT, "state_dict": self.edges.state_dict(), "arch": self.info,
                           "sender": self.sender.fingerprint()}, folder / "edges.pt")
        (folder / "edges.json").write_text(json.dumps(self.info, indent=1))

    def summary(self) -> dict[str, Any]:
        """Extra facts for train_summary.json and trained.json: both parameter counts and the edge shape."""
        return {"lmnet": self.info}


class LMNet(Graph):
    """The receiver answering after the trained edges' soft tokens."""

    name = "lmnet"

    @classmethod
    def build(cls, cfg: DictConfig, layers: Sequence[Any] = (), overrides: Sequence[str] = ()) -> tuple["LMNet", DictConfig]:
        receiver, sender = load_backbones(cfg)
        folder = read_trained(cfg.eval.checkpoint, cls.name, receiver)
        saved = torch.load(folder / "module" / "edges.pt", map_location="cpu", weights_only=False)
        arch = saved["arch"]
        want = {**{k: cfg.lmnet[k] for k in ARCH}, "senders": list(cfg.agents.senders), "d_sender": sender.hidden_size}
        if cfg.lmnet.width is not None:
            want["width"] = cfg.lmnet.width
        bad = [f"{k}: trained {arch[k]!r} vs run {v!r}" for k, v in want.items() if arch[k] != v]
        bad += [f"sender.{k}: trained {v!r} vs loaded {sender.fingerprint().get(k)!r}"
                for k, v in saved["sender"].items() if sender.fingerprint().get(k) != v]
        if bad:
            raise CheckpointError(f"{folder} does not fit this run:\n  " + "\n  ".join(bad))
        lm = OmegaConf.create({k: arch[k] for k in ARCH})
        edges = make_edges(lm, len(arch["senders"]), arch["d_sender"], arch["d_receiver"], arch["width"])
        edges.load_state_dict(saved["state_dict"])
        return cls(cfg, receiver, sender, edges.eval()), cfg

    def prepare(self, problems: Sequence[EvalProblem]) -> None:
        if problems:  # the untimed warm-up every method gets (tflow.methods.warm_up)
            warm_up(self.receiver, self.cfg.agents.receiver, problems[0].question)
            if self.sender is not self.receiver:
                warm_up(self.sender, self.cfg.agents.senders[0], problems[0].question)

    @torch.no_grad()
    def answer(self, problems: Sequence[EvalProblem], prompts: Sequence[str]) -> list[MethodOutput]:
        acc, rows = Accounting(), [Accounting() for _ in problems]
        soft = self.soft_tokens([p.sender_view for p in problems], acc, rows)
        embeds, mask, _, lengths = self.inputs(soft, prompts, side="left")
        tok, timer = self.receiver.tokenizer, PrefillTimer()
        out = self.receiver.model.generate(inputs_embeds=embeds, attention_mask=mask,
                                           max_new_tokens=self.cfg.eval.max_new_tokens, pad_token_id=tok.pad_token_id,
                                           streamer=timer,
                                           **sampling(self.cfg.eval, [p.task_id for p in problems], "receiver"))  # [B, new]
        prefill, decode = timer.split()
        acc.add_seconds("receiver_prefill", prefill)
        acc.add_seconds("decode", decode)
        res = decode_rows(tok, out)
        for row, n_prompt, (_, n, _) in zip(rows, lengths, res):
            row.add_tokens("receiver", prompt=n_prompt, generated=n)
        share_seconds(acc, rows)
        return [MethodOutput(t, n, tr, row) for (t, n, tr), row in zip(res, rows)]

    @torch.no_grad()
    def reference_nll(self, problems: Sequence[Problem]) -> list[tuple[float, int]]:
        """Per problem: the receiver's summed NLL of p.solution (teacher-forced, after the soft tokens and
        tflow.mix.receiver_prompt(p), as in training) and the scored tokens."""
        out: list[tuple[float, int]] = []
        for k in range(0, len(problems), self.cfg.eval.batch_size):
            chunk = problems[k:k + self.cfg.eval.batch_size]
            soft = self.soft_tokens([sender_view(p) for p in chunk])
            nll, n = self.nll(soft, [receiver_prompt(p) for p in chunk], [p.solution for p in chunk])
            out += list(zip(nll.tolist(), n.tolist()))
        return out


def train_lmnet(cfg: DictConfig, progress: bool = True, restart_on_change: bool = False) -> Path:
    """Train (or resume) the edges at train.lr, TFlow's learning rate (no grid, as the generator); returns
    train.out_dir."""
    return train_module(cfg, "lmnet", LMNetTrainee, progress, restart_on_change)


@cli
def main(argv: Sequence[str] | None = None) -> None:
    trainer_main("lmnet", LMNetTrainee, argv, __doc__)


if __name__ == "__main__":
    main()
