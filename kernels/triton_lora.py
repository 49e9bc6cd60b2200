"""Triton LoRA-apply kernels for TFlow's transient, per-row, multi-sender deltas.

For each batch row b (its own factors) and every token t of that row:
  sum-type fusions (senders concatenated along the rank, weights and scale folded into B):
      out[b, t] += (x[b, t] @ a[b]^T) @ b[b]^T          a: [B, R, d_in], b: [B, d_out, R]
  max fusion (its own path):
      out[b, t] += max_s (x[b, t] @ a[b, s]^T) @ b[b, s]^T    a: [B, S, r, d_in], b: [B, S, d_out, r]
One launch per module. A program owns (row b, a block of tokens, a block of output features);
it accumulates the rank-R intermediate over d_in in fp32, multiplies by its block of B in fp32
(IEEE precision, no TF32) and adds into `out` in place, rounding once to out's dtype. The rank is
padded to >= 16 inside the kernel (the GPU compiler's minimum dot size); padded lanes are
masked loads of zero. x and out may be fp32, fp16 or bf16 and strided; the factors are stored as
fp32 or bf16 (half the bytes; per row at rank 4 on Qwen3-4B, ~0.4% / 0.2% of the weights') and
converted to fp32 on load, so both dots are IEEE fp32 either way.

Under TRITON_INTERPRET=1 (set before this module is imported) the kernels run on CPU tensors,
which is how the test suite checks them without a GPU (fp32 and fp16 only: the interpreter's
bf16 dot is wrong).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _lora_sum_kernel(x_ptr, a_ptr, b_ptr, out_ptr, T, K, N, R,
                     sx_b, sx_t, sx_k, sa_b, sa_r, sa_k, sb_b, sb_n, sb_r, so_b, so_t, so_n,
                     BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr):
    pid_b, pid_t, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    xa = tl.zeros((BLOCK_T, R_PAD), dtype=tl.float32)  # rank-R intermediate, fp32
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + pid_b * sx_b + offs_t[:, None] * sx_t + offs_k[None, :] * sx_k,
                    mask=(offs_t[:, None] < T) & (offs_k[None, :] < K), other=0.0)  # [BLOCK_T, BLOCK_K]
        a = tl.load(a_ptr + pid_b * sa_b + offs_r[None, :] * sa_r + offs_k[:, None] * sa_k,
                    mask=(offs_r[None, :] < R) & (offs_k[:, None] < K), other=0.0)  # [BLOCK_K, R_PAD] = A^T tile
        xa += tl.dot(x.to(tl.float32), a.to(tl.float32), input_precision="ieee")
    bt = tl.load(b_ptr + pid_b * sb_b + offs_r[:, None] * sb_r + offs_n[None, :] * sb_n,
                 mask=(offs_r[:, None] < R) & (offs_n[None, :] < N), other=0.0)  # [R_PAD, BLOCK_N] = B^T tile
    delta = tl.dot(xa, bt.to(tl.float32), input_precision="ieee")  # [BLOCK_T, BLOCK_N]
    o_ptrs = out_ptr + pid_b * so_b + offs_t[:, None] * so_t + offs_n[None, :] * so_n
    o_mask = (offs_t[:, None] < T) & (offs_n[None, :] < N)
    o = tl.load(o_ptrs, mask=o_mask, other=0.0)
    tl.store(o_ptrs, (o.to(tl.float32) + delta).to(o.dtype), mask=o_mask)


@triton.jit
def _lora_max_kernel(x_ptr, a_ptr, b_ptr, out_ptr, T, K, N, R,
                     sx_b, sx_t, sx_k, sa_b, sa_s, sa_r, sa_k, sb_b, sb_s, sb_n, sb_r, so_b, so_t, so_n,
                     S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                     R_PAD: tl.constexpr):
    pid_b, pid_t, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    best = tl.full((BLOCK_T, BLOCK_N), float("-inf"), dtype=tl.float32)
    for s in tl.static_range(S):
        xa = tl.zeros((BLOCK_T, R_PAD), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + pid_b * sx_b + offs_t[:, None] * sx_t + offs_k[None, :] * sx_k,
                        mask=(offs_t[:, None] < T) & (offs_k[None, :] < K), other=0.0)
            a = tl.load(a_ptr + pid_b * sa_b + s * sa_s + offs_r[None, :] * sa_r + offs_k[:, None] * sa_k,
                        mask=(offs_r[None, :] < R) & (offs_k[:, None] < K), other=0.0)
            xa += tl.dot(x.to(tl.float32), a.to(tl.float32), input_precision="ieee")
        bt = tl.load(b_ptr + pid_b * sb_b + s * sb_s + offs_r[:, None] * sb_r + offs_n[None, :] * sb_n,
                     mask=(offs_r[:, None] < R) & (offs_n[None, :] < N), other=0.0)
        best = tl.maximum(best, tl.dot(xa, bt.to(tl.float32), input_precision="ieee"))
    o_ptrs = out_ptr + pid_b * so_b + offs_t[:, None] * so_t + offs_n[None, :] * so_n
    o_mask = (offs_t[:, None] < T) & (offs_n[None, :] < N)
    o = tl.load(o_ptrs, mask=o_mask, other=0.0)
    tl.store(o_ptrs, (o.to(tl.float32) + best).to(o.dtype), mask=o_mask)


def _blocks(T: int, K: int, N: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_K, BLOCK_N): 16-token tiles for decode, larger for prefill (all >= 16)."""
    block_t = 16 if T <= 16 else 64
    block_k = min(128, max(16, triton.next_power_of_2(K)))
    block_n = min(128 if T <= 16 else 64, max(16, triton.next_power_of_2(N)))
    return block_t, block_k, block_n


def lora_apply_(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, mode: str = "sum") -> torch.Tensor:
    """In place: out += delta(x). x: [B, T, d_in], out: [B, T, d_out] (any strides); factors as in the
    module docstring. Returns out."""
    B, T, K = x.shape
    N = out.shape[-1]
    if a.dtype != b.dtype or a.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"factors must both be float32 or both bfloat16, got {a.dtype} / {b.dtype}")
    if out.shape[:2] != (B, T):
        raise ValueError(f"out {tuple(out.shape)} does not match x {tuple(x.shape)}")
    bt, bk, bn = _blocks(T, K, N)
    grid = (B, triton.cdiv(T, bt), triton.cdiv(N, bn))
    if mode == "sum":
        R = a.shape[1]
        if a.shape != (B, R, K) or b.shape != (B, N, R):
            raise ValueError(f"sum factors: a {tuple(a.shape)} / b {tuple(b.shape)} do not fit x {tuple(x.shape)}, N={N}")
        _lora_sum_kernel[grid](x, a, b, out, T, K, N, R, *x.stride(), *a.stride(), *b.stride(), *out.stride(),
                               BLOCK_T=bt, BLOCK_K=bk, BLOCK_N=bn, R_PAD=max(16, triton.next_power_of_2(R)))
    elif mode == "max":
        S, R = a.shape[1], a.shape[2]
        if a.shape != (B, S, R, K) or b.shape != (B, S, N, R):
            raise ValueError(f"max factors: a {tuple(a.shape)} / b {tuple(b.shape)} do not fit x {tuple(x.shape)}, N={N}")
        _lora_max_kernel[grid](x, a, b, out, T, K, N, R, *x.stride(), *a.stride(), *b.stride(), *out.stride(),
                               S=S, BLOCK_T=bt, BLOCK_K=bk, BLOCK_N=bn, R_PAD=max(16, triton.next_power_of_2(R)))
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return out
