"""PyTorch reference for applying per-row LoRA deltas to a Linear's output.

Shapes (B batch rows, T tokens per row, S senders, r rank per sender, R = S*r):
  sum-type fusion (mean, attention): one LoRA of concatenated rank per row,
      delta[b] = x[b] @ at[b] @ bt[b]                 at: [B, d_in, R], bt: [B, R, d_out]
  max fusion: element-wise max over the senders' deltas,
      delta[b] = max_s x[b] @ at[b, s] @ bt[b, s]     at: [B, S, d_in, r], bt: [B, S, r, d_out]
Fusion weights and the LoRA scale are already folded into `bt`. The rank-r intermediate is
computed in the factors' dtype, then added to the output in its own dtype. `prepare` rounds the
factors to their storage dtype (fp32 by default, or bf16) and keeps them in at least fp32, so the
intermediate is fp32 whatever the storage: exactly what the fused backends compute.
"""
from __future__ import annotations

import torch


def lora_delta_sum(x: torch.Tensor, at: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    """x: [B, T, d_in] -> [B, T, d_out] (in the factors' dtype)."""
    return torch.bmm(torch.bmm(x.to(at.dtype), at), bt)  # [B, T, R] -> [B, T, d_out]


def lora_delta_max(x: torch.Tensor, at: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    """x: [B, T, d_in] -> [B, T, d_out]: element-wise max over senders."""
    xs = x.to(at.dtype).unsqueeze(1)  # [B, 1, T, d_in]
    return torch.matmul(torch.matmul(xs, at), bt).amax(dim=1)  # [B, S, T, r] -> [B, S, T, d_out] -> max


class TorchBackend:
    """Eager PyTorch backend. In no-grad mode the delta is added in place (one op fewer)."""

    name = "torch"

    @staticmethod
    def prepare(a: torch.Tensor, b: torch.Tensor, mode: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-transpose factors once per query batch.
        sum: a [B, R, d_in], b [B, d_out, R] -> at [B, d_in, R], bt [B, R, d_out]
        max: a [B, S, r, d_in], b [B, S, d_out, r] -> at [B, S, d_in, r], bt [B, S, r, d_out]
        Rounded to the storage `dtype`, held in at least fp32 (bf16 storage: bf16 values in fp32)."""
        compute = torch.promote_types(dtype, torch.float32)
        at = a.transpose(-1, -2).to(dtype).to(compute)
        bt = b.transpose(-1, -2).to(dtype).to(compute)
        if not torch.is_grad_enabled():
            at, bt = at.contiguous(), bt.contiguous()
        return at, bt

    @staticmethod
    def apply(out: torch.Tensor, x: torch.Tensor, handle: tuple[torch.Tensor, torch.Tensor], mode: str) -> torch.Tensor:
        """Return out + delta(x) (in place when gradients are off); handle = prepare(...)."""
        at, bt = handle
        flat = x.dim() == 2  # a Linear can be called on [B, d_in]
        if flat:
            x, out = x.unsqueeze(1), out.unsqueeze(1)
        delta = lora_delta_sum(x, at, bt) if mode == "sum" else lora_delta_max(x, at, bt)
        if torch.is_grad_enabled():
            res = out + delta.to(out.dtype)
        else:
            res = out.add_(delta)
        return res.squeeze(1) if flat else res
