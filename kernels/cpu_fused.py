"""Fused CPU backend: one C++ op per Linear call for sum-type fusions in inference.

The eager reference needs four ops per hooked Linear (cast, shrink, expand, add); on a CPU each
eager op costs microseconds of dispatch, which dominates the arithmetic of a rank-8 delta at
decode. `lora_add_` (csrc/lora_add_cpu.cpp) does the whole update in one call with fp32
accumulation. It is compiled once per machine with torch's C++ extension loader (needs a C++ compiler
and `ninja`; cached under ~/.cache/torch_extensions, or TORCH_EXTENSIONS_DIR, per Python and torch
version).

Loading never waits on a lock once the op is built: a finished build leaves `<name>.stamp` beside the
library (sha256 of the source, flags and torch version, and the library's size and mtime), and a
process that finds a matching stamp imports the library directly. Only a build takes a lock: our own
`tflow_build.lock` (fcntl.flock, so the kernel releases it the moment its holder dies, however it dies;
the holder's PID inside), waited for at most BUILD_WAIT_S and then an error naming the file and the
holder. While holding it, the build removes torch's own `lock` baton (torch waits on it forever, and a
killed build leaves it behind) before calling torch's loader, which resumes the build with ninja.

Factors are stored as fp32 (default) or bf16 (`lora.factor_dtype`; half the bytes a decode step
reads for them, accumulation still fp32). Where the op does not apply it calls the reference
explicitly (same mathematics): when autograd is on (training), for `max` fusion, and for tensors
not on the CPU.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import itertools
import json
import logging
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import torch

from tflow_kernels.reference import TorchBackend

FACTOR_DTYPES = (torch.float32, torch.bfloat16)  # storage the C++ op reads (it accumulates in fp32)
BUILD_WAIT_S = 900.0  # the longest a load waits for another process's build (~40 s on 2 cores)
BUILD_LOCK = "tflow_build.lock"
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


def _stamp(name: str, flags: list[str], lib: Path) -> str:
    """What a finished build of `lib` records: the inputs' hash and the library's size and mtime."""
    inputs = hashlib.sha256(_SOURCE.read_bytes() + json.dumps([name, flags, torch.__version__]).encode())
    st = lib.stat()
    return f"{inputs.hexdigest()} {st.st_size} {st.st_mtime_ns}"


def _built(build: Path, name: str, flags: list[str]) -> Path | None:
    """The library of a finished build for this source, flags and torch version, or None."""
    lib = build / f"{name}.so"
    try:
        return lib if (build / f"{name}.stamp").read_text() == _stamp(name, flags, lib) else None
    except OSError:
        return None


@contextlib.contextmanager
def build_lock(build: Path, wait_s: float = BUILD_WAIT_S) -> Iterator[None]:
    """Hold `build/tflow_build.lock` for the block, waiting at most `wait_s` for a live holder (a dead
    holder's lock is already released by the kernel); a TimeoutError names the file and the holder's PID."""
    path = build / BUILD_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        for attempt in itertools.count():
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"waited {wait_s:.0f} s for {path}, held by PID {holder} building the "
                                       "cpu_fused op; if that process is stuck, end it (its lock goes with it) "
                                       "or choose backend=torch") from None
                if attempt == 0:
                    log.warning("waiting (at most %.0f s) for %s: PID %s is building the cpu_fused op", wait_s, path,
                                holder)
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def load_op(build: Path, name: str, flags: list[str], wait_s: float = BUILD_WAIT_S) -> ModuleType:
    """The compiled op in `build`: imported directly, with no lock, when a finished build is there; else
    built (or its interrupted build resumed) under the build lock, then stamped."""
    lib = _built(build, name, flags)
    if lib is None:
        build.mkdir(parents=True, exist_ok=True)
        with build_lock(build, wait_s):
            if _built(build, name, flags) is None:  # nobody finished it while we waited
                from torch.utils.cpp_extension import load

                log.info("building the cpu_fused LoRA op (once per machine, ~40 s)")
                (build / f"{name}.stamp").unlink(missing_ok=True)
                (build / "lock").unlink(missing_ok=True)  # torch's baton, left by a killed build: we hold the build
                module = load(name=name, sources=[str(_SOURCE)], extra_cflags=["-O3", "-fopenmp", *flags],
                              extra_ldflags=["-fopenmp"], build_directory=str(build), verbose=False)
                tmp = build / f".{name}.stamp.{os.getpid()}"
                tmp.write_text(_stamp(name, flags, Path(module.__file__)))
                os.replace(tmp, build / f"{name}.stamp")
                return module
            lib = build / f"{name}.so"
    spec = importlib.util.spec_from_file_location(name, lib)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def extension() -> Any:
    """Build (once per machine) and load the C++ extension."""
    global _EXTENSION
    if _EXTENSION is None:
        flags = _cpu_flags()
        name = "tflow_lora_cpu_" + ("avx2" if flags else "generic")
        try:
            _EXTENSION = load_op(build_directory(name), name, flags)
        except TimeoutError:
            raise
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
