"""LoRA-apply kernels for TFlow's transient, per-row, multi-sender LoRA (import name `tflow_kernels`).

`reference` holds the PyTorch implementation: the ground truth for every other backend and the
portable path. `cpu_fused` is a one-op-per-Linear C++ path for CPU inference, `triton_lora` the
GPU kernels (one launch per Linear; sum-type and max fusion). The config names of the backends
(`backend:` in the run config) are registered in `tflow.registry.BACKENDS`.

A backend: prepare(a, b, mode, dtype) -> handle, once per query batch;
           apply(out, x, handle, mode) -> out + delta(x), at every hooked Linear call.
`auto` picks triton for CUDA tensors and cpu_fused for CPU tensors.
"""
from tflow_kernels.cpu_fused import CpuFusedBackend
from tflow_kernels.reference import TorchBackend, lora_delta_max, lora_delta_sum
from tflow_kernels.triton_backend import AutoBackend, TritonBackend

__all__ = ["AutoBackend", "CpuFusedBackend", "TorchBackend", "TritonBackend", "lora_delta_sum", "lora_delta_max"]
