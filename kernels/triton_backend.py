"""Backend wrapper of the Triton kernels (`backend: triton`), and the `auto` dispatcher."""
from __future__ import annotations

import os

import torch

from tflow_kernels.reference import TorchBackend


class TritonBackend:
    """One Triton launch per hooked Linear call (inference). With autograd on (training) it calls
    the reference explicitly: the kernel has no backward."""

    name = "triton"

    @staticmethod
    def prepare(a: torch.Tensor, b: torch.Tensor, mode: str, dtype: torch.dtype = torch.float32) -> tuple:
        if torch.is_grad_enabled():
            return ("reference", TorchBackend.prepare(a, b, mode, dtype))
        if not a.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernel on CPU "
                               "for testing); on CPU use backend=cpu_fused or backend=torch")
        from tflow_kernels import triton_lora  # noqa: F401  (compiles lazily; honours TRITON_INTERPRET)

        if dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"backend 'triton' stores factors as float32 or bfloat16, not {dtype}")
        a = a.to(dtype).contiguous()  # [B, (S,) R, d_in]: loads run along d_in
        b = b.to(dtype).transpose(-1, -2).contiguous().transpose(-1, -2)  # [B, (S,) d_out, R] view of [.., R, d_out]
        return ("kernel", (a, b))

    @staticmethod
    def apply(out: torch.Tensor, x: torch.Tensor, handle: tuple, mode: str) -> torch.Tensor:
        kind, factors = handle
        if kind == "reference" or torch.is_grad_enabled():
            if kind != "reference":
                a, b = factors
                factors = TorchBackend.prepare(a, b, mode, a.dtype)
            return TorchBackend.apply(out, x, factors, mode)
        from tflow_kernels.triton_lora import lora_apply_

        flat = x.dim() == 2
        x3, out3 = (x.unsqueeze(1), out.unsqueeze(1)) if flat else (x, out)
        lora_apply_(out3, x3, *factors, mode=mode)
        return out


class AutoBackend:
    """`backend: auto`: Triton for CUDA tensors, the fused C++ op for CPU tensors (decided from the
    factors' device at prepare time, recorded in the handle)."""

    name = "auto"

    @staticmethod
    def _pick(device: torch.device):
        from tflow_kernels.cpu_fused import CpuFusedBackend

        return TritonBackend if device.type == "cuda" else CpuFusedBackend

    @staticmethod
    def prepare(a: torch.Tensor, b: torch.Tensor, mode: str, dtype: torch.dtype = torch.float32) -> tuple:
        backend = AutoBackend._pick(a.device)
        return (backend, backend.prepare(a, b, mode, dtype))

    @staticmethod
    def bind(handle: tuple, mode: str):
        backend, inner = handle
        return getattr(backend, "bind", lambda *_: None)(inner, mode)

    @staticmethod
    def apply(out: torch.Tensor, x: torch.Tensor, handle: tuple, mode: str) -> torch.Tensor:
        backend, inner = handle
        return backend.apply(out, x, inner, mode)
