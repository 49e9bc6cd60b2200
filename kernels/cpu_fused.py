"""Fused CPU backend: one C++ op per Linear call for sum-type fusions in inference.

The eager reference needs four ops per hooked Linear (cast, shrink, expand, add); on a CPU each
eager op costs microseconds of dispatch, which dominates the arithmetic of a rank-8 delta at
decode. `lora_add_` (csrc/lora_add_cpu.cpp) does the whole update in one call with fp32
accumulation. It is compiled on first use with torch's C++ extension loader (needs a C++ compiler
and `ninja`; cached under ~/.cache/torch_extensions, or TORCH_EXTENSIONS_DIR, per Python and torch
version). A lock left by a build killed midway is removed after 10 minutes (torch would wait on it
forever).

Factors are stored as fp32 (default) or bf16 (`lora.factor_dtype`; half the bytes a decode step
reads for them, accumulation still fp32). Where the op does not apply it calls the reference
explicitly (same mathematics): when autograd is on (training), for `max` fusion, and for tensors
not on the CPU.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tflow_kernels.reference import TorchBackend

FACTOR_DTYPES = (torch.float32, torch.bfloat16)  # storage the C++ op reads (it accumulates in fp32)
STALE_LOCK_S = 600.0  # a build takes ~40 s on 2 cores; a lock this old was left by a killed build
log = logging.getLogger(__name__)
_SOURCE = Path(__file__).parent / "csrc" / "lora_add_cpu.cpp"
_EXTENSION: Any = None


def _cpu_flags() -> list[str]:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return ["-mavx2", "-mfma"] if (" avx2" in info and " fma" in info) else []


def build_directory(name: str) -> Path:
    """Where the op is compiled: $TORCH_EXTENSIONS_DIR (else torch's default root)/py3X_torchV/name."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return Path(root) / f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}" / name


def clear_stale_lock(build: Path, max_age_s: float = STALE_LOCK_S) -> None:
    """torch's loader waits, silently and forever, on `build/lock` while another process compiles; a build
    killed midway (Ctrl-C) leaves the lock behind. Remove a lock older than any build takes, saying so;
    warn about a young one (another build running, or a fresh stale lock to delete by hand)."""
    lock = build / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > max_age_s:
        log.warning("removing %s, left %.0f s ago by an interrupted cpu_fused build", lock, age)
        lock.unlink(missing_ok=True)
    else:
        log.warning("waiting for another cpu_fused build to release %s (if no build is running, delete it)", lock)


def extension() -> Any:
    """Build (once per machine) and load the C++ extension."""
    global _EXTENSION
    if _EXTENSION is None:
        from torch.utils.cpp_extension import load

        log.info("loading the cpu_fused LoRA op (compiled once per machine, ~40 s)")
        flags = _cpu_flags()
        name = "tflow_lora_cpu_" + ("avx2" if flags else "generic")
        build = build_directory(name)
        try:
            build.mkdir(parents=True, exist_ok=True)
            clear_stale_lock(build)
            _EXTENSION = load(name=name, sources=[str(_SOURCE)], extra_cflags=["-O3", "-fopenmp", *flags],
                              extra_ldflags=["-fopenmp"], build_directory=str(build), verbose=False)
        except Exception as err:  # compiler or ninja missing, or a build error
            raise RuntimeError(
                f"backend 'cpu_fused' could not build its C++ op ({type(err).__name__}: {err}). It needs a C++ "
                "compiler and ninja (pip install ninja); or choose backend=torch (eager reference).") from err
    return _EXTENSION


class CpuFusedBackend:
    name = "cpu_fused"

    @staticmethod
    def prepare(a: torch.Tensor, b: torch.Tensor, mode: str, dtype: torch.dtype = torch.float32) -> tuple:
        if mode != "sum" or torch.is_grad_enabled() or a.device.type != "cpu" or dtype not in FACTOR_DTYPES:
            return ("reference", TorchBackend.prepare(a, b, mode, dtype))
        extension()
        return ("fused", (a.to(dtype).contiguous(), b.transpose(-1, -2).to(dtype).contiguous()))  # [B,R,d_in], [B,R,d_out]

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
                factors = TorchBackend.prepare(a, bt.transpose(1, 2), mode, a.dtype)
            return TorchBackend.apply(out, x, factors, mode)
        return extension().lora_add_(out, x, *factors)
