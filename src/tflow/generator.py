"""Layer aggregator and parameter generator: sender condition -> LoRA factors for every target.

The generator follows TFlow: the condition is projected to `width`; a bank of learned parameter
tokens (one per tile of a LoRA factor, for every targeted module of every layer) cross-attends to
it; transformer blocks mix the tokens within a layer and across layers; per-kind output heads
produce the tiles, which are reassembled ("detokenised") into A (r x d_in) and B (d_out x r).
The B heads start at zero, so an untrained generator yields delta-W = 0 exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModuleSpec:
    """One target Linear of the receiver."""

    name: str  # "layers.{i}.{proj}"
    layer: int
    proj: str
    d_in: int
    d_out: int


class LayerAggregator(nn.Module):
    """Softmax-weighted sum over the L+1 hidden states with a learned temperature."""

    def __init__(self, num_states: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_states))
        self.log_temperature = nn.Parameter(torch.zeros(()))

    def weights(self) -> torch.Tensor:
        return torch.softmax(self.logits / self.log_temperature.exp().clamp_min(0.01), dim=0)  # [L+1], as the release

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return torch.einsum("l,bsltd->bstd", self.weights(), states)  # [B, S, T, d]


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.out = nn.Linear(width, width), nn.Linear(width, 2 * width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        # x: [N, Q, W]; ctx: [N, K, W] (self-attention when None); mask: [N, K] True = attend
        ctx = x if ctx is None else ctx
        N, Q, W = x.shape
        q = self.q(x).view(N, Q, self.heads, -1).transpose(1, 2)  # [N, H, Q, W/H]
        k, v = self.kv(ctx).view(N, ctx.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)  # [N, H, K, W/H] each
        attn_mask = None if mask is None else mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [N, H, Q, W/H]
        return self.out(y.transpose(1, 2).reshape(N, Q, W))


class Block(nn.Module):
    """Cross-attention to the condition, self-attention within a layer and across layers, MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norms = nn.ModuleList([nn.LayerNorm(width) for _ in range(4)])
        self.cross, self.within, self.across = (Attention(width, heads) for _ in range(3))
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # x: [N, L, P, W] parameter tokens (L layers, P tokens per layer); cond: [N, T, W]; mask: [N, T]
        N, L, P, W = x.shape
        h = self.norms[0](x).view(N, L * P, W)
        x = x + self.cross(h, cond, mask).view(N, L, P, W)
        h = self.norms[1](x).view(N * L, P, W)
        x = x + self.within(h).view(N, L, P, W)
        h = self.norms[2](x).transpose(1, 2).reshape(N * P, L, W)
        x = x + self.across(h).view(N, P, L, W).transpose(1, 2)
        return x + self.mlp(self.norms[3](x))


@dataclass(frozen=True)
class FactorKind:
    """The tiles of one factor (A or B) of one projection type, identical in every layer."""

    proj: str
    factor: str  # "A" (r x d_in, tiled along d_in) or "B" (d_out x r, tiled along d_out)
    dim: int  # the tiled dimension
    tiles: int
    offset: int  # first token of this kind within a layer


class ParameterGenerator(nn.Module):
    """Maps a pooled sender condition to per-module LoRA factors for every sender."""

    def __init__(self, specs: list[ModuleSpec], cond_dim: int, num_senders: int, rank: int, width: int = 256,
                 depth: int = 2, heads: int = 4, mlp_ratio: int = 2, tile_size: int = 192,
                 output_scale: float = 0.01, sender_embedding: bool = True):
        super().__init__()
        self.specs, self.rank, self.tile, self.output_scale = specs, rank, tile_size, output_scale
        self.layers = sorted({s.layer for s in specs})
        projs = list(dict.fromkeys(s.proj for s in specs))
        first = {s.proj: s for s in specs if s.layer == self.layers[0]}
        if len(specs) != len(self.layers) * len(projs):
            raise ValueError("every targeted layer must have the same target projections")
        kinds, offset = [], 0
        for proj in projs:
            for factor, dim in (("A", first[proj].d_in), ("B", first[proj].d_out)):
                tiles = math.ceil(dim / tile_size)
                kinds.append(FactorKind(proj, factor, dim, tiles, offset))
                offset += tiles
        self.kinds, self.tokens_per_layer = kinds, offset
        L = len(self.layers)
        self.cond_in = nn.Sequential(nn.LayerNorm(cond_dim), nn.Linear(cond_dim, width))
        self.sender_emb = nn.Parameter(torch.zeros(num_senders, width)) if sender_embedding else None
        self.param_tokens = nn.Parameter(torch.randn(L, offset, width) * 0.02)  # the token bank
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(width)
        self.heads = nn.ModuleDict({f"{k.proj}_{k.factor}": nn.Linear(width, rank * tile_size) for k in kinds})
        for k in kinds:
            if k.factor == "B":  # zero B => delta-W = 0 at initialisation
                nn.init.zeros_(self.heads[f"{k.proj}_B"].weight)
                nn.init.zeros_(self.heads[f"{k.proj}_B"].bias)

    def num_generated_values(self) -> int:
        """LoRA values generated per sender per query."""
        return sum(self.rank * (s.d_in + s.d_out) for s in self.specs)

    def forward(self, pooled: torch.Tensor, mask: torch.Tensor) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """pooled: [B, S, T, d_cond]; mask: [B, S, T].
        Returns {module name: (A [B, S, r, d_in], B [B, S, d_out, r])} and the senders'
        condition summaries [B, S, width] (masked mean of the projected condition)."""
        B, S, T, _ = pooled.shape
        cond = self.cond_in(pooled)  # [B, S, T, W]
        if self.sender_emb is not None:
            cond = cond + self.sender_emb[:S, None, :]
        m = mask.float().unsqueeze(-1)  # [B, S, T, 1]
        summary = (cond * m).sum(2) / m.sum(2).clamp_min(1.0)  # [B, S, W]
        cond, flat_mask = cond.reshape(B * S, T, -1), mask.reshape(B * S, T)
        x = self.param_tokens.unsqueeze(0).expand(B * S, -1, -1, -1)  # [BS, L, P, W]
        for block in self.blocks:
            x = block(x, cond, flat_mask)
        x = self.norm_out(x)
        r, tile, L = self.rank, self.tile, len(self.layers)
        out: dict[str, list] = {}
        for k in self.kinds:
            y = self.heads[f"{k.proj}_{k.factor}"](x[:, :, k.offset:k.offset + k.tiles])  # [BS, L, tiles, r*tile]
            y = y * self.output_scale
            if k.factor == "A":  # tiles along d_in: [BS, L, tiles, r, tile] -> [BS, L, r, d_in]
                y = y.view(B * S, L, k.tiles, r, tile).permute(0, 1, 3, 2, 4).reshape(B * S, L, r, -1)[..., :k.dim]
                y = y.reshape(B, S, L, r, k.dim)
            else:  # tiles along d_out: [BS, L, tiles, tile, r] -> [BS, L, d_out, r]
                y = y.view(B * S, L, k.tiles * tile, r)[:, :, :k.dim].reshape(B, S, L, k.dim, r)
            out[f"{k.proj}_{k.factor}"] = y
        factors = {}
        for s in self.specs:
            li = self.layers.index(s.layer)
            factors[s.name] = (out[f"{s.proj}_A"][:, :, li], out[f"{s.proj}_B"][:, :, li])
        return factors, summary
