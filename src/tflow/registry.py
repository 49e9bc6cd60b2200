"""Registries: names a config may use, each mapped to what implements it, imported only when used.

A `Registry` owns its name check (`check`, raising `ConfigError` naming the key and the choices), so
validating a config imports no implementation: no torch, no transformers. The registries without a
torch-free home of their own live here (fusions, LoRA-apply backends); tasks, methods and training data
sources keep theirs beside their modules (`tflow.tasks`, `tflow.methods`, `tflow.data`).
"""
from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any, Generic, TypeVar

from tflow.errors import ConfigError

V = TypeVar("V")


def load_object(target: str) -> Any:
    """'package.module:attribute' -> the attribute (importing the module)."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


class Registry(Mapping[str, V], Generic[V]):
    """An ordered, read-only name -> entry table of one kind (e.g. 'fusion') configured at `key`."""

    def __init__(self, kind: str, key: str, entries: Mapping[str, V]):
        self.kind, self.key, self._entries = kind, key, dict(entries)

    def __getitem__(self, name: str) -> V:
        return self._entries[self.check(name)]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def check(self, name: Any, key: str | None = None) -> str:
        """`name` if registered, else a ConfigError naming the config key and the choices."""
        if name not in self._entries:
            raise ConfigError(f"key '{key or self.key}': unknown {self.kind} {name!r}; choose from {list(self._entries)}")
        return name

    def load(self, name: str) -> Any:
        """The implementation behind `name` (entries are 'module:attribute' strings)."""
        return load_object(str(self[name]))


FUSIONS: Registry[str] = Registry("fusion", "fusion.name", {
    "mean": "tflow.fusion:MeanFusion",  # TFlow: mean of the senders' delta-W
    "max": "tflow.fusion:MaxFusion",
    "attention": "tflow.fusion:AttentionFusion",
})
BACKENDS: Registry[str] = Registry("LoRA-apply backend", "backend", {
    "auto": "tflow_kernels.triton_backend:AutoBackend",  # triton on CUDA, cpu_fused on CPU
    "torch": "tflow_kernels.reference:TorchBackend",
    "cpu_fused": "tflow_kernels.cpu_fused:CpuFusedBackend",
    "triton": "tflow_kernels.triton_backend:TritonBackend",
})
