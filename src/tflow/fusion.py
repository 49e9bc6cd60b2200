"""Fusion of the senders' generated LoRAs into one per-row delta (registered in `tflow.registry.FUSIONS`).

- `mean` (TFlow): delta = sum_s (1/S) * scale * x A_s^T B_s^T, a mean of delta-W (not of A, B).
- `attention`: the same sum with per-query weights softmax_s(q(receiver) . k(sender_s)), where q
  reads the receiver's prompt (mean token embedding) and k the sender's condition summary. Its
  query projection starts at zero, so it starts as `mean`.
- `max`: delta = max_s scale * x A_s^T B_s^T, element-wise over the senders' delta outputs.
Sum-type fusions are one LoRA of concatenated rank S*r with the weights folded into B; the
kernels and the PEFT export rely on this.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ModuleDelta:
    a: torch.Tensor  # sum: [B, R, d_in]          max: [B, S, r, d_in]
    b: torch.Tensor  # sum: [B, d_out, R] (weights and scale folded in)   max: [B, S, d_out, r] (scale folded in)


@dataclass
class LoraDelta:
    """Per-row LoRA deltas for every target module of the receiver."""

    mode: str  # "sum" | "max"
    modules: dict[str, ModuleDelta]
    batch: int
    sender_weights: torch.Tensor | None = None  # [B, S] for sum-type fusions


class Fusion(nn.Module):
    mode = "sum"

    def sender_weights(self, summary: torch.Tensor, receiver: torch.Tensor) -> torch.Tensor:
        """summary: [B, S, W] sender condition summaries; receiver: [B, d_r] -> weights [B, S]."""
        raise NotImplementedError


class MeanFusion(Fusion):
    def __init__(self, width: int, receiver_dim: int, gate_width: int):
        super().__init__()

    def sender_weights(self, summary: torch.Tensor, receiver: torch.Tensor) -> torch.Tensor:
        B, S, _ = summary.shape
        return summary.new_full((B, S), 1.0 / S)


class AttentionFusion(Fusion):
    def __init__(self, width: int, receiver_dim: int, gate_width: int):
        super().__init__()
        self.query = nn.Linear(receiver_dim, gate_width, bias=False)
        self.key = nn.Linear(width, gate_width, bias=False)
        nn.init.zeros_(self.query.weight)  # uniform weights (= mean) at initialisation

    def sender_weights(self, summary: torch.Tensor, receiver: torch.Tensor) -> torch.Tensor:
        q = self.query(receiver.to(self.query.weight.dtype))  # [B, g]
        k = self.key(summary)  # [B, S, g]
        return torch.softmax(torch.einsum("bg,bsg->bs", q, k) / q.shape[-1] ** 0.5, dim=-1)


class MaxFusion(Fusion):
    mode = "max"

    def __init__(self, width: int, receiver_dim: int, gate_width: int):
        super().__init__()


def fuse(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], fusion: Fusion, summary: torch.Tensor,
         receiver: torch.Tensor, scale: float) -> LoraDelta:
    """factors: {name: (A [B, S, r, d_in], B [B, S, d_out, r])} -> LoraDelta."""
    some_a = next(iter(factors.values()))[0]
    B, S, r, _ = some_a.shape
    if fusion.mode == "max":
        mods = {n: ModuleDelta(a, b * scale) for n, (a, b) in factors.items()}
        return LoraDelta("max", mods, B)
    w = fusion.sender_weights(summary, receiver)  # [B, S]
    mods = {}
    for name, (a, b) in factors.items():
        a_cat = a.reshape(B, S * r, a.shape[-1])  # [B, S*r, d_in], row s*r+j = A_s[j]
        b_w = b * (w * scale)[:, :, None, None]  # [B, S, d_out, r]
        b_cat = b_w.permute(0, 2, 1, 3).reshape(B, b.shape[2], S * r)  # [B, d_out, S*r], col s*r+j = B_s[:, j]
        mods[name] = ModuleDelta(a_cat, b_cat)
    return LoraDelta("sum", mods, B, w)
