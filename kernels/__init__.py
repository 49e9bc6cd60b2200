"""LoRA-apply kernels for TFlow's transient, per-row, multi-sender LoRA (import name `tflow_kernels`).

`reference` holds the PyTorch implementation: the ground truth for every other backend and the CPU
path. `BACKENDS` maps a config name (`backend:` in the run config) to an implementation.
"""
from tflow_kernels.reference import TorchBackend, lora_delta_max, lora_delta_sum

BACKENDS = {"torch": TorchBackend}

__all__ = ["BACKENDS", "TorchBackend", "lora_delta_sum", "lora_delta_max"]
