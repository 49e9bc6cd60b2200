"""Transient LoRA: add per-row generated deltas to the receiver's Linears only inside a `with`.

On entry the context manager wraps each targeted Linear's `forward` (an instance attribute over the
class method, or over whatever instance-level forward was there, e.g. accelerate's); on exit (also
on an exception) it restores exactly what it found, in reverse order. A wrapper rather than a
forward hook: a hook sends every call through nn.Module's slower hook-dispatch path, 210 times per
decode step on SmolLM2. Weights are never merged (low-precision merge/unmerge is not exact). Every
call of a wrapped Linear, in prefill and in each decode step, gets `out + delta(x)` with row b of
the batch using row b's delta.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from tflow.fusion import LoraDelta
from tflow.registry import BACKENDS

_MISSING = object()
_MARK = "_tflow_transient"  # attribute set on our wrappers


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
        self.linears, self.delta, self.backend = linears, delta, BACKENDS.load(backend)
        self.factor_dtype = factor_dtype
        self.patched: list[tuple[nn.Module, Any]] = []  # (module, its instance-level forward before, or _MISSING)

    def __enter__(self) -> "TransientLoRA":
        if self.patched:
            raise RuntimeError("TransientLoRA is not re-entrant")
        prepared = {n: self.backend.prepare(d.a, d.b, self.delta.mode, self.factor_dtype)
                    for n, d in self.delta.modules.items()}
        try:
            for name, factors in prepared.items():
                module = self.linears[name]
                self.patched.append((module, module.__dict__.get("forward", _MISSING)))
                module.forward = self._wrap(name, module.forward, factors)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        for module, before in reversed(self.patched):
            if before is _MISSING:
                del module.forward
            else:
                module.forward = before
        self.patched.clear()

    def _wrap(self, name: str, forward: Callable, factors: Any) -> Callable:
        """`forward` followed by `out + delta(x)`: the backend's bound op where it has one (it checks batch
        and autograd itself, in one call), else the backend's `apply` behind a batch check."""
        add = getattr(self.backend, "bind", lambda *_: None)(factors, self.delta.mode)
        if add is None:
            batch, mode, apply = self.delta.batch, self.delta.mode, self.backend.apply

            def add(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
                if x.shape[0] != batch:
                    raise RuntimeError(f"{name}: input batch {x.shape[0]} != {batch} rows of generated deltas "
                                       "(beam search / num_return_sequences>1 are not supported)")
                return apply(out, x, factors, mode)

        def wrapped(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return add(forward(x, *args, **kwargs), x)

        setattr(wrapped, _MARK, True)
        return wrapped


def active_transient_count(linears: dict[str, nn.Linear]) -> int:
    """Number of the given modules whose forward a TransientLoRA currently wraps (for tests and checks)."""
    return sum(bool(getattr(m.__dict__.get("forward"), _MARK, False)) for m in linears.values())
