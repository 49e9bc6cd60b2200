"""Fused CPU backend: one C++ op per Linear call for sum-type fusions in inference.

The eager reference needs four ops per hooked Linear (cast, shrink, expand, add); on a CPU each
eager op costs microseconds of dispatch, which dominates the arithmetic of a rank-8 delta at
decode. `lora_add_` (csrc/lora_add_cpu.cpp) does the whole update in one call with fp32
accumulation. It is compiled on first use with torch's C++ extension loader (needs a C++ compiler
and `ninja`; cached under ~/.cache/torch_extensions, or TORCH_EXTENSIONS_DIR).

Where it does not apply it calls the reference explicitly (same mathematics): when autograd is
on (training), for `max` fusion, and for tensors not on the CPU.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tflow_kernels.reference import TorchBackend

_SOURCE = Path(__file__).parent / "csrc" / "lora_add_cpu.cpp"
_EXTENSION: Any = None


def _cpu_flags() -> list[str]:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return ["-mavx2", "-mfma"] if (" avx2" in info and " fma" in info) else []


def extension() -> Any:
    """Build (once per machine) and load the C++ extension."""
    global _EXTENSION
    if _EXTENSION is None:
        import logging

        from torch.utils.cpp_extension import load

        logging.getLogger(__name__).info("loading the cpu_fused LoRA op (compiled once per machine, ~40 s)")
        flags = _cpu_flags()
        name = "tflow_lora_cpu_" + ("avx2" if flags else "generic")
        try:
            _EXTENSION = load(name=name, sources=[str(_SOURCE)], extra_cflags=["-O3", "-fopenmp", *flags],
                              extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as err:  # compiler or ninja missing, or a build error
            raise RuntimeError(
                f"backend 'cpu_fused' could not build its C++ op ({type(err).__name__}: {err}). It needs a C++ "
                "compiler and ninja (pip install ninja); or choose backend=torch (eager reference).") from err
    return _EXTENSION


class CpuFusedBackend:
    name = "cpu_fused"

    @staticmethod
    def prepare(a: torch.Tensor, b: torch.Tensor, mode: str, dtype: torch.dtype = torch.float32) -> tuple:
        if mode != "sum" or torch.is_grad_enabled() or a.device.type != "cpu" or dtype != torch.float32:
            return ("reference", TorchBackend.prepare(a, b, mode, dtype))
        extension()
        return ("fused", (a.float().contiguous(), b.transpose(-1, -2).float().contiguous()))  # [B,R,d_in], [B,R,d_out]

    @staticmethod
    def bind(handle: tuple, mode: str):
        """A direct `(out, x) -> out` for the hook (no per-call Python dispatch), or None."""
        kind, (a, bt) = handle
        if kind != "fused":
            return None
        op = extension().lora_add_
        return lambda out, x: op(out, x, a, bt)

    @staticmethod
    def apply(out: torch.Tensor, x: torch.Tensor, handle: tuple, mode: str) -> torch.Tensor:
        kind, factors = handle
        if kind == "reference" or torch.is_grad_enabled():
            if kind != "reference":  # prepared for inference, now called with autograd on
                a, bt = factors
                factors = (a.transpose(1, 2), bt)
            return TorchBackend.apply(out, x, factors, mode)
        return extension().lora_add_(out, x, *factors)
