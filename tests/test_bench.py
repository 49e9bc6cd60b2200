"""The benchmark scripts behind the reported overheads: they run, pair variants and count the right bytes."""
import csv

import pytest
import torch


def test_kernel_bench_rows_and_bf16_floor(tmp_path):
    from tflow_kernels.bench import main

    out = tmp_path / "k.csv"
    assert torch.is_grad_enabled()
    main(["--models", "smollm2-135m", "--batch", "2", "--prefill-tokens", "4", "--repeats", "1", "--out", str(out)])
    assert torch.is_grad_enabled()  # it once switched autograd off for the process (breaking later training tests)
    rows = list(csv.DictReader(out.open()))
    variants = {r["variant"] for r in rows}
    assert variants == {"no_lora", "loop", "bmm_hooks", "peft_lora", "cpu_fused", "cpu_fused_bf16"}
    assert len(rows) == 5 * 2 * len(variants)  # 5 distinct projections x decode/prefill
    for r in rows:
        assert float(r["us_per_call"]) > 0
    # the floor of a bf16-factor variant counts 2-byte factors: same extra time would be further from its floor
    one = [r for r in rows if r["proj"] == "q_proj" and r["phase"] == "decode"]
    by = {r["variant"]: r for r in one}
    for name in ("cpu_fused", "cpu_fused_bf16"):
        extra = float(by[name]["us_per_call"]) - float(by["no_lora"]["us_per_call"])
        assert float(by[name]["lora_us_over_floor"]) == pytest.approx(
            extra * 1e-6 * float(by[name]["copy_gbps"]) * 1e9 / _lora_bytes(2, 1, 576, 576, 8, 4 if name == "cpu_fused" else 2),
            rel=1e-6)


def _lora_bytes(B, T, d_in, d_out, R, factor_size):
    return B * T * d_in * 2 + B * R * (d_in + d_out) * factor_size + 2 * B * T * d_out * 2


def test_step_overheads_pairs_rounds_and_restores_the_cache(tiny_backbone):
    from tflow.bench_decode import lora_context, random_delta, step_overheads
    from tflow.lora import active_transient_count
    from tflow.models import target_linears
    from tflow.stats import median_ci

    model = tiny_backbone.model
    ids = torch.randint(5, 300, (2, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    linears = target_linears(model, ["q_proj", "down_proj"])
    delta = random_delta(linears, 2, 2, 4, "sum")
    f32 = torch.float32
    contexts = {"no_lora": lambda: lora_context(linears, None, "", f32),
                "mean/torch": lambda: lora_context(linears, delta, "torch", f32)}
    times = step_overheads(model, batch, contexts, steps=5, sync=lambda: None)
    assert set(times) == set(contexts) and all(len(t) == 5 and min(t) > 0 for t in times.values())
    assert active_transient_count(linears) == 0  # every context exited
    med, lo, hi = median_ci([0.01, 0.02, 0.03, 0.05, 0.04, 0.02, 0.03])
    assert lo <= med <= hi and med == 0.03

