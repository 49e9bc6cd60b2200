"""The Triton LoRA-apply kernels against the PyTorch reference.

Without a GPU they run under TRITON_INTERPRET=1 (fp32 and fp16 only: the interpreter's bf16 dot
is wrong). `out` and `x` are strided views into NaN-poisoned buffers: an element the kernel
forgets to write keeps its old value (wrong, since every delta is non-zero), and a write outside
the view would overwrite the poison.

Relative error bounds, max |got - want| / max |want|: fp32 1e-5 (IEEE fp32 dots, another
summation order); fp16 2e-3 and bf16 1e-2 (one rounding of the updated output).
"""
import itertools

import pytest
import torch

from tflow_kernels.reference import lora_delta_max, lora_delta_sum

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def _poisoned_view(shape, dtype, g, pad=3):
    """A strided [B, T, d] view inside a NaN buffer, filled with random values."""
    B, T, d = shape
    buf = torch.full((B, T + pad, d + 2 * pad), float("nan"), dtype=dtype, device=DEVICE)
    view = buf[:, 1:T + 1, pad:pad + d]
    view.copy_(torch.randn(shape, generator=g).to(dtype))
    return buf, view


def _check(mode, B, T, K, N, R, S, dtype, seed=0, factor_dtype=torch.float32):
    """factor_dtype: the factors' storage; the reference gets the same (rounded) values in fp32."""
    from tflow_kernels.triton_lora import lora_apply_

    g = torch.Generator().manual_seed(seed)
    _, x = _poisoned_view((B, T, K), dtype, g)
    buf, out = _poisoned_view((B, T, N), dtype, g)
    nan_before = torch.isnan(buf).sum().item()
    if mode == "sum":  # S senders concatenated along the rank, different factors per row
        a = (torch.randn(B, S * R, K, generator=g) * 0.3).to(DEVICE, factor_dtype)
        b = (torch.randn(B, N, S * R, generator=g) * 0.3).to(DEVICE, factor_dtype)
        delta = lora_delta_sum(x, a.float().transpose(1, 2), b.float().transpose(1, 2))
    else:
        a = (torch.randn(B, S, R, K, generator=g) * 0.3).to(DEVICE, factor_dtype)
        b = (torch.randn(B, S, N, R, generator=g) * 0.3).to(DEVICE, factor_dtype)
        delta = lora_delta_max(x, a.float().transpose(-1, -2), b.float().transpose(-1, -2))
    want = (out.float() + delta).to(dtype)
    lora_apply_(out, x, a, b, mode=mode)
    err = ((out.float() - want.float()).abs().max() / want.float().abs().max()).item()
    assert err < TOL[dtype], (mode, B, T, K, N, R, S, dtype, err)
    assert torch.isnan(buf).sum().item() == nan_before  # nothing written outside the view


SHAPES = [(3, 1, 70, 45), (2, 23, 40, 33)]  # decode and prefill, d_in/d_out not multiples of any block


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", ["sum", "max"])
def test_kernel_matrix_against_reference(dtype, mode):
    """Ranks 4/8/16/32 x 1-3 senders x decode/prefill shapes."""
    for (B, T, K, N), R, S in itertools.product(SHAPES, [4, 8, 16, 32], [1, 2, 3]):
        _check(mode, B, T, K, N, R, S, dtype, seed=R * 10 + S)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", ["sum", "max"])
def test_kernel_bf16_factor_storage(dtype, mode):
    """lora.factor_dtype=bfloat16: bf16 factors are converted to fp32 on load (fp32 dots, fp32 intermediate),
    so the kernel must match the reference on the same rounded values at the fp32 / fp16 bounds."""
    for (B, T, K, N), R, S in itertools.product(SHAPES, [4, 16], [1, 2]):
        _check(mode, B, T, K, N, R, S, dtype, seed=R * 10 + S, factor_dtype=torch.bfloat16)


def test_kernel_rejects_other_factor_dtypes():
    from tflow_kernels.triton_lora import lora_apply_

    x, out = torch.randn(2, 1, 8, device=DEVICE), torch.randn(2, 1, 6, device=DEVICE)
    a, b = torch.randn(2, 4, 8, device=DEVICE), torch.randn(2, 6, 4, device=DEVICE)
    with pytest.raises(TypeError, match="float32 or both bfloat16"):
        lora_apply_(out, x, a.half(), b.half())
    with pytest.raises(TypeError, match="float32 or both bfloat16"):
        lora_apply_(out, x, a, b.bfloat16())


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["sum", "max"])
@pytest.mark.parametrize("K, N", [(2560, 4096), (2560, 1024), (4096, 2560), (2560, 9728), (9728, 2560)])
def test_gpu_bf16_qwen3_4b_shapes(mode, K, N):
    for T, R, S in [(1, 4, 2), (1, 32, 2), (257, 8, 3)]:
        _check(mode, 8, T, K, N, R, S, torch.bfloat16)
    _check(mode, 8, 1, K, N, 4, 2, torch.bfloat16, factor_dtype=torch.bfloat16)  # lora.factor_dtype=bfloat16
