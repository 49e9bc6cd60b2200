"""LoRA-apply kernels for TFlow's transient, per-row, multi-sender LoRA (import name `tflow_kernels`).

`reference` holds the PyTorch implementation: the ground truth for every other backend and the
portable path. `cpu_fused` is a one-op-per-Linear C++ path for CPU inference. `BACKENDS` maps a
config name (`backend:` in the run config) to an implementation.
"""
from tflow_kernels.cpu_fused import CpuFusedBackend
from tflow_kernels.reference import TorchBackend, lora_delta_max, lora_delta_sum

# A backend: prepare(a, b, mode, dtype) -> handle, once per query batch;
#            apply(out, x, handle, mode) -> out + delta(x), at every hooked Linear call.
BACKENDS = {"torch": TorchBackend, "cpu_fused": CpuFusedBackend}

__all__ = ["BACKENDS", "TorchBackend", "CpuFusedBackend", "lora_delta_sum", "lora_delta_max"]
