"""Run configuration: defaults validate; typos and wrong types fail before compute, naming the key."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tflow.config import load_config
from tflow.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_validate():
    cfg = load_config()
    assert cfg.lora.rank == 4 and cfg.fusion.name == "mean" and len(cfg.lora.targets) == 7


@pytest.mark.parametrize("override, key", [
    ("lora.rnak=8", "lora.rnak"),           # typo of a key
    ("lora.rank=eight", "lora.rank"),       # wrong type
    ("fusion.name=sum", "fusion.name"),     # not in the registry
    ("lora.targets=[q_proj,qq_proj]", "lora.targets"),
    ("agents.senders=[strategist,oracle]", "agents.senders"),
    ("backend=cuda_magic", "backend"),
    ("lora.factor_dtype=float16", "lora.factor_dtype"),  # storage the fused backends do not read
    ("generator.width=30", "generator.width"),  # not divisible by heads
])
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=[override])


def test_typo_in_yaml_layer(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stpes: 10\n")
    with pytest.raises(ConfigError, match="stpes"):
        load_config([bad])


def test_missing_layer_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config(["no/such/file.yaml"])


@pytest.mark.parametrize("path", sorted((ROOT / "config" / "run").glob("*.yaml")), ids=lambda p: p.name)
def test_every_run_yaml_merges_into_the_schema(path):
    cfg = load_config([path])
    assert OmegaConf.to_container(cfg, resolve=True)
