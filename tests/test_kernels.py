"""LoRA-apply backends against the PyTorch reference."""
import pytest
import torch

from tflow.registry import BACKENDS
from tflow_kernels import CpuFusedBackend, lora_delta_sum
from tflow_kernels.reference import TorchBackend

# Relative error bounds (max |got - want| / max |want|): fp32 accumulates in a different order;
# bf16/fp16 round the updated output once (one ulp of the output's magnitude).
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _case(B, T, d_in, R, d_out, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, d_in, generator=g).to(dtype)
    out = torch.randn(B, T, d_out, generator=g).to(dtype)
    a = torch.randn(B, R, d_in, generator=g) * 0.2  # [B, R, d_in]
    b = torch.randn(B, d_out, R, generator=g) * 0.2  # [B, d_out, R]
    return x, out, a, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(8, 1, 576, 8, 1536), (5, 3, 200, 16, 300), (3, 17, 33, 5, 7), (2, 64, 96, 32, 80),
                                   (1, 1, 5, 4, 3)])  # decode-sized rows split over threads (odd split), tiny serial
def test_cpu_fused_matches_reference(dtype, shape):
    B, T, d_in, R, d_out = shape
    x, out, a, b = _case(B, T, d_in, R, d_out, dtype)
    want = (out.float() + lora_delta_sum(x, a.transpose(1, 2), b.transpose(1, 2))).to(dtype)
    fused = CpuFusedBackend
    with torch.no_grad():
        handle = fused.prepare(a, b, "sum")
        assert handle[0] == "fused"
        got = fused.apply(out.clone(), x, handle, "sum")
    err = (got.float() - want.float()).abs().max() / want.float().abs().max()
    assert err < TOL[dtype], err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(8, 1, 576, 8, 1536), (3, 17, 33, 5, 7)])
def test_cpu_fused_bf16_factor_storage(dtype, shape):
    """lora.factor_dtype=bfloat16: the op reads bf16 factors and accumulates in fp32, so it must match the
    reference on the same rounded factors as tightly as with fp32 storage; the handle holds bf16."""
    B, T, d_in, R, d_out = shape
    x, out, a, b = _case(B, T, d_in, R, d_out, dtype)
    fused = CpuFusedBackend
    with torch.no_grad():
        handle = fused.prepare(a, b, "sum", torch.bfloat16)
        assert handle[0] == "fused" and all(f.dtype == torch.bfloat16 for f in handle[1])
        got = fused.apply(out.clone(), x, handle, "sum")
        want = TorchBackend.apply(out.clone(), x, TorchBackend.prepare(a, b, "sum", torch.bfloat16), "sum")
    err = (got.float() - want.float()).abs().max() / want.float().abs().max()
    assert err < TOL[dtype], err
    # and the rounding is real: fp32 storage gives a different result at fp32 output
    if dtype == torch.float32:
        with torch.no_grad():
            full = TorchBackend.apply(out.clone(), x, TorchBackend.prepare(a, b, "sum"), "sum")
        assert (full - got).abs().max() > 0


def test_cpu_fused_rejects_mismatched_factor_dtypes():
    from tflow_kernels.cpu_fused import extension

    x, out, a, b = _case(2, 1, 8, 4, 6, torch.float32)
    with torch.no_grad(), pytest.raises(RuntimeError, match="float32 or both bfloat16"):
        extension().lora_add_(out, x, a.contiguous(), b.transpose(1, 2).contiguous().bfloat16())


def test_cpu_fused_strided_and_flat_inputs():
    x, out, a, b = _case(4, 6, 24, 8, 16, torch.float32)
    fused = CpuFusedBackend
    with torch.no_grad():
        handle = fused.prepare(a, b, "sum")
        wide = torch.randn(4, 6, 48)
        xs = wide[..., ::2]  # non-contiguous last dim
        xs.copy_(x)
        want = TorchBackend.apply(out.clone(), x, TorchBackend.prepare(a, b, "sum"), "sum")
        torch.testing.assert_close(fused.apply(out.clone(), xs, handle, "sum"), want)
        flat = fused.apply(out[:, 0].clone(), x[:, 0], handle, "sum")  # a Linear called on [B, d_in]
        torch.testing.assert_close(flat, want[:, 0])


def test_cpu_fused_uses_the_reference_for_autograd_and_max():
    x, out, a, b = _case(2, 3, 8, 4, 6, torch.float32)
    fused = CpuFusedBackend
    a.requires_grad_(True)
    handle = fused.prepare(a, b, "sum")  # grad enabled: reference path, differentiable
    assert handle[0] == "reference"
    fused.apply(out.clone(), x, handle, "sum").sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    with torch.no_grad():
        am, bm = torch.randn(2, 2, 4, 8), torch.randn(2, 2, 6, 4)
        assert fused.prepare(am, bm, "max")[0] == "reference"


def test_transient_lora_backends_agree_on_a_model(tiny_backbone, tiny_cfg):
    """Every backend inside TransientLoRA gives the reference's logits and generates (fp32 tiny model)."""
    from tflow.agents import receiver_batch, sender_states
    from tflow.lora import TransientLoRA
    from tflow.models import target_linears
    from tflow.pipeline import build_tflow, delta_for

    device = "cuda" if torch.cuda.is_available() else "cpu"  # triton runs natively on a GPU, interpreted on CPU
    tiny_backbone.model.to(device)
    tflow = build_tflow(tiny_cfg, tiny_backbone, tiny_backbone).to(device)
    for head in tflow.generator.heads.values():
        torch.nn.init.normal_(head.weight, std=0.3)
    qs = ["What is 3 plus 4?", "How many clips did Natalia sell?"]
    per = [[sender_states(tiny_backbone, r, [q], 64)[0][0] for r in tiny_cfg.agents.senders] for q in qs]
    batch = {k: v.to(device) for k, v in receiver_batch(tiny_backbone.tokenizer, "solver", qs).items()}
    linears = target_linears(tiny_backbone.model, list(tiny_cfg.lora.targets))
    with torch.no_grad():
        delta, _ = delta_for(tflow, tiny_backbone, per, batch)
        logits = {}
        for name in BACKENDS:
            with TransientLoRA(linears, delta, backend=name):
                logits[name] = tiny_backbone.model(**batch).logits
                gen = tiny_backbone.model.generate(**batch, max_new_tokens=4, do_sample=False,
                                                   pad_token_id=tiny_backbone.tokenizer.pad_token_id)
            assert gen.shape[1] > batch["input_ids"].shape[1]
    for name in BACKENDS:  # cpu_fused, triton (interpreter without a GPU) and auto against the reference
        torch.testing.assert_close(logits[name], logits["torch"], rtol=1e-5, atol=1e-5)
