"""Transient LoRA: add per-row generated deltas to the receiver's Linears only inside a `with`.

The context manager registers one forward hook per targeted Linear and keeps the handles; on exit
(also on an exception) it removes exactly those handles. Weights are never merged (low-precision
merge/unmerge is not exact). Every call of a hooked Linear, in prefill and in each decode step,
gets `out + delta(x)` with row b of the batch using row b's delta.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tflow.fusion import LoraDelta
from tflow_kernels import BACKENDS


class TransientLoRA:
    """`with TransientLoRA(linears, delta): model.generate(...)`.

    linears: {module name: nn.Linear} of the receiver (see `tflow.models.target_linears`).
    delta: per-row factors for those names (missing names are left untouched).
    """

    def __init__(self, linears: dict[str, nn.Linear], delta: LoraDelta, backend: str = "torch",
                 factor_dtype: torch.dtype = torch.float32):
        unknown = set(delta.modules) - set(linears)
        if unknown:
            raise KeyError(f"delta has modules the receiver lacks: {sorted(unknown)[:5]}")
        self.linears, self.delta, self.backend = linears, delta, BACKENDS[backend]
        self.factor_dtype = factor_dtype
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "TransientLoRA":
        if self.handles:
            raise RuntimeError("TransientLoRA is not re-entrant")
        prepared = {n: self.backend.prepare(d.a, d.b, self.delta.mode, self.factor_dtype)
                    for n, d in self.delta.modules.items()}
        try:
            for name, factors in prepared.items():
                self.handles.append(self.linears[name].register_forward_hook(self._hook(name, factors)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._remove()

    def _remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _hook(self, name: str, factors: Any):
        batch, mode, apply = self.delta.batch, self.delta.mode, self.backend.apply
        bound = getattr(self.backend, "bind", lambda *_: None)(factors, mode)
        if bound is not None:  # the backend checks batch and autograd itself, in one call
            return lambda module, args, out: bound(out, args[0])

        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            x = args[0]
            if x.shape[0] != batch:
                raise RuntimeError(f"{name}: input batch {x.shape[0]} != {batch} rows of generated deltas "
                                   "(beam search / num_return_sequences>1 are not supported)")
            return apply(out, x, factors, mode)

        return hook


def active_hook_count(linears: dict[str, nn.Linear]) -> int:
    """Number of forward hooks on the given modules (for tests and sanity checks)."""
    return sum(len(m._forward_hooks) for m in linears.values())
