"""The released TFlow parameter generator (`generator.variant: release`), rebuilt from the public release's
description (BWR-hhh/TFlow, src/models/param_gen): the architecture the paper-scale config uses.

Layout. Each targeted factor is flattened row-major (A: r x d_in, B: d_out x r) and cut into tiles of
r * tile_size scalars, each viewed as r rows of tile_size ("cells"); a layer's tiles are every A tile
(modules in sorted order: mlp.down, mlp.gate, mlp.up, self_attn.k, o, q, v), then every B tile. `acc`
consecutive cells of a tile are packed into one parameter token of width `width` (cell width width/acc),
so a layer has tiles * r / acc tokens (Qwen3-4B: 224 tiles, 448 tokens per layer, 16,128 in all).

Parameter tokens start from the condition ("replace" mode): a learned query per token pools the projected
condition through a zero-initialised, bias-free projection (single-head attention), added to learned
positions (per cell of a layer + per layer), RMS-normalised. Blocks (pre-norm RMSNorm, no dropout):
self-attention across layers (1-D rotary over the layer), within a layer (2-D rotary over tile and cell
pair), cross-attention to the condition (queries 2-D rotary over (layer, token), condition keys on the
diagonal, offset by the number of tiles), and a SiLU MLP of ratio `mlp_ratio`. Two shared heads (A, B)
map each cell back to tile_size scalars; both factors are multiplied by output_scale (0.01). The B head
starts at zero, so an untrained generator gives delta-W = 0. No per-sender embedding: senders differ only
through their prompts. Differences from the release, on purpose: padded condition tokens are masked (the
release pads with zeros and attends to them, so its output depends on the batch), and its unused
`cond_proj` (d^2 + d parameters, off in the release) is not built.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tflow.generator import ModuleSpec

PROJ_ORDER = {"down_proj": 0, "gate_proj": 1, "up_proj": 2, "k_proj": 3, "o_proj": 4, "q_proj": 5, "v_proj": 6}


def rotary_angles(positions: torch.Tensor, dims: int, theta: float = 1e4) -> torch.Tensor:
    """positions [N] -> angles [N, dims/2] for rotating adjacent channel pairs."""
    freqs = theta ** (-torch.arange(0, dims, 2, dtype=torch.float32) / dims)  # [dims/2]
    return positions.float()[:, None] * freqs[None, :]


def axes_angles(positions: list[torch.Tensor], head_dim: int) -> torch.Tensor:
    """One rotary per axis over equal channel slices of the head: [N] each -> angles [N, head_dim/2]."""
    per = head_dim // len(positions)
    return torch.cat([rotary_angles(p, per) for p in positions], dim=-1)


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x [..., N, hd]; angles [N, hd/2]: rotate pairs (2k, 2k+1) by angles[:, k]."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class RotaryAttention(nn.Module):
    """Multi-head attention with biased q/k/v/o projections and rotary on q and k."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.hd = heads, width // heads
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, q_angles: torch.Tensor, k_angles: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        # x [N, Q, W]; ctx [N, K, W]; angles [Q, hd/2], [K, hd/2]; mask [N, K] True = attend
        N, Q, W = x.shape
        q = rotate(self.q(x).view(N, Q, self.heads, self.hd).transpose(1, 2), q_angles)  # [N, H, Q, hd]
        k = rotate(self.k(ctx).view(N, -1, self.heads, self.hd).transpose(1, 2), k_angles)  # [N, H, K, hd]
        v = self.v(ctx).view(N, -1, self.heads, self.hd).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])
        return self.o(y.transpose(1, 2).reshape(N, Q, W))


class ReleaseBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norms = nn.ModuleList([nn.RMSNorm(width, eps=1e-6) for _ in range(4)])
        self.across, self.within, self.cross = (RotaryAttention(width, heads) for _ in range(3))
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.SiLU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: torch.Tensor, enc: torch.Tensor, mask: torch.Tensor, rope: dict[str, torch.Tensor]
                ) -> torch.Tensor:
        # x [N, L, P, W] parameter tokens; enc [N, T, W] condition; mask [N, T]
        N, L, P, W = x.shape
        h = self.norms[0](x).transpose(1, 2).reshape(N * P, L, W)  # across layers, per token position
        x = x + self.across(h, h, rope["layer"], rope["layer"]).view(N, P, L, W).transpose(1, 2)
        h = self.norms[1](x).reshape(N * L, P, W)  # within a layer
        x = x + self.within(h, h, rope["cell"], rope["cell"]).view(N, L, P, W)
        h = self.norms[2](x).reshape(N, L * P, W)  # every token to the condition
        x = x + self.cross(h, enc, rope["query"], rope["key"][: enc.shape[1]], mask).view(N, L, P, W)
        return x + self.mlp(self.norms[3](x))


class ReleaseParameterGenerator(nn.Module):
    """Same interface as tflow.generator.ParameterGenerator, the release's architecture."""

    def __init__(self, specs: list[ModuleSpec], cond_dim: int, num_senders: int, rank: int, width: int = 1024,
                 depth: int = 2, heads: int = 8, mlp_ratio: int = 4, tile_size: int = 256, accumulation: int = 2,
                 output_scale: float = 0.01, max_condition_tokens: int = 4096):
        super().__init__()
        if width % accumulation or rank % accumulation or width % heads or (width // heads) % 4:
            raise ValueError("generator: width and rank must be multiples of generator.accumulation, and "
                             "width/heads a multiple of 4 (2-D rotary)")
        self.specs, self.rank, self.tile, self.acc, self.output_scale = specs, rank, tile_size, accumulation, output_scale
        self.layers = sorted({s.layer for s in specs})
        projs = sorted({s.proj for s in specs}, key=lambda p: (PROJ_ORDER.get(p, 99), p))
        first = {s.proj: s for s in specs if s.layer == self.layers[0]}
        if len(specs) != len(self.layers) * len(projs):
            raise ValueError("every targeted layer must have the same target projections")
        # (proj, factor, first tile, tiles) in the release's order: every A tile, then every B tile
        self.slots, h = [], 0
        for factor, dim in (("A", "d_in"), ("B", "d_out")):
            for p in projs:
                n = math.ceil(getattr(first[p], dim) / tile_size)
                self.slots.append((p, factor, h, n))
                h += n
        self.tiles, L = h, len(self.layers)
        self.tokens_per_layer = h * rank // accumulation
        cell = width // accumulation
        self.hidden_in = nn.Linear(cond_dim, width)
        self.norm_input, self.norm_tokens, self.norm_final = (nn.RMSNorm(width, eps=1e-6) for _ in range(3))
        self.cell_pos = nn.Embedding(h * rank, cell)  # one per (tile, tile row) of a layer
        self.layer_pos = nn.Embedding(L, cell)
        self.cond_token_proj = nn.Linear(width, width, bias=False)
        nn.init.zeros_(self.cond_token_proj.weight)
        self.cond_token_query = nn.Parameter(torch.randn(L * self.tokens_per_layer, width) * 0.002)
        self.blocks = nn.ModuleList([ReleaseBlock(width, heads, mlp_ratio) for _ in range(depth)])
        self.head_a, self.head_b = nn.Linear(cell, tile_size), nn.Linear(cell, tile_size)
        nn.init.normal_(self.head_a.weight, std=0.02)
        nn.init.zeros_(self.head_a.bias)
        nn.init.zeros_(self.head_b.weight)  # delta-W = 0 at initialisation
        nn.init.zeros_(self.head_b.bias)
        hd = width // heads
        P = self.tokens_per_layer
        tile_of, pair = torch.arange(P) // (rank // accumulation), torch.arange(P) % (rank // accumulation)
        layer = torch.arange(L)
        cond = torch.arange(max_condition_tokens) + h  # the condition on the diagonal, after the tiles
        for name, angles in {"layer": rotary_angles(layer, hd), "cell": axes_angles([tile_of, pair], hd),
                             "query": axes_angles([layer.repeat_interleave(P), torch.arange(P).repeat(L)], hd),
                             "key": axes_angles([cond, cond], hd)}.items():
            self.register_buffer(f"rope_{name}", angles, persistent=False)

    def num_generated_values(self) -> int:
        """LoRA values generated per sender per query."""
        return sum(self.rank * (s.d_in + s.d_out) for s in self.specs)

    def forward(self, pooled: torch.Tensor, mask: torch.Tensor) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """pooled [B, S, T, d_cond]; mask [B, S, T] -> ({name: (A [B,S,r,d_in], B [B,S,d_out,r])}, summary [B,S,W])."""
        B, S, T, _ = pooled.shape
        if T > self.rope_key.shape[0]:
            raise ValueError(f"condition of {T} tokens; the generator positions at most {self.rope_key.shape[0]}")
        L, P, r, acc = len(self.layers), self.tokens_per_layer, self.rank, self.acc
        enc = self.norm_input(self.hidden_in(pooled.reshape(B * S, T, -1)))  # [BS, T, W]
        flat_mask = mask.reshape(B * S, T)
        m = flat_mask.float().unsqueeze(-1)
        summary = ((enc * m).sum(1) / m.sum(1).clamp_min(1.0)).view(B, S, -1)
        kv = self.cond_token_proj(enc)  # [BS, T, W]
        scores = self.cond_token_query @ kv.transpose(1, 2) / math.sqrt(kv.shape[-1])  # [BS, LP, T]
        scores = scores.masked_fill(~flat_mask[:, None, :], float("-inf"))
        cond_tokens = torch.softmax(scores, dim=-1) @ kv  # [BS, LP, W]
        pos = self.cell_pos.weight[None, :, :] + self.layer_pos.weight[:, None, :]  # [L, h*r, W/acc]
        pos = pos.reshape(L, P, -1)  # acc consecutive cells -> one token: [L, P, W]
        x = self.norm_tokens(cond_tokens.view(B * S, L, P, -1) + pos)
        rope = {"layer": self.rope_layer, "cell": self.rope_cell, "query": self.rope_query, "key": self.rope_key}
        for block in self.blocks:
            x = block(x, enc, flat_mask, rope)
        cells = self.norm_final(x).reshape(B * S, L, self.tiles, r, -1)  # [BS, L, tiles, r, W/acc]
        out = {}
        for proj, factor, start, n in self.slots:
            head = self.head_a if factor == "A" else self.head_b
            flat = head(cells[:, :, start:start + n]).reshape(B * S, L, -1) * self.output_scale  # [BS, L, n*r*tile]
            d_in, d_out = (lambda s: (s.d_in, s.d_out))(next(s for s in self.specs if s.proj == proj))
            shape = (r, d_in) if factor == "A" else (d_out, r)
            out[proj, factor] = flat[..., : shape[0] * shape[1]].reshape(B, S, L, *shape)
        factors = {}
        for s in self.specs:
            li = self.layers.index(s.layer)
            factors[s.name] = (out[s.proj, "A"][:, :, li], out[s.proj, "B"][:, :, li])
        return factors, summary
