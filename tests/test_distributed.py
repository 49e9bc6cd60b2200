"""Data-parallel training under torchrun: two CPU ranks (gloo) train the same generator as one process."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import TINY_OVERRIDES, write_tiny_layer
from tflow import distributed
from tflow.errors import ConfigError


def test_shard_and_world_from_environment(monkeypatch):
    assert distributed.setup(3, "cpu") == distributed.World()  # no torchrun: a single process
    w = distributed.World(rank=1, size=2)
    assert distributed.shard(list("abcd"), w) == ["b", "d"] and distributed.shard(list("abc"), distributed.World()) == list("abc")
    assert distributed.rank_device("cuda", distributed.World(1, 2, 1)) == "cuda:1"
    assert distributed.rank_device("cpu", distributed.World(1, 2, 1)) == "cpu"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="batch_size=3 must be a multiple"):
        distributed.setup(3, "cpu")


@pytest.mark.slow
def test_two_ranks_train_the_same_generator_as_one_process(tmp_path, tiny_tokenizer, data_dir):
    layer = write_tiny_layer(tmp_path, tiny_tokenizer, data_dir, steps=3, batch_size=4, warmup_steps=1, log_every=1,
                             ckpt_every=2)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    common = ["-m", "tflow.train", "--config", str(layer), "--no-progress", *TINY_OVERRIDES]
    runs = {"one": [sys.executable, *common],
            "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *common]}
    for name, cmd in runs.items():
        res = subprocess.run([*cmd, f"train.out_dir={tmp_path / name}"], capture_output=True, text=True,
                             timeout=600, env=env)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    one = torch.load(tmp_path / "one" / "generator.pt", weights_only=False)
    two = torch.load(tmp_path / "two" / "generator.pt", weights_only=False)
    assert two["state_dict"].keys() == one["state_dict"].keys()
    # Gradients agree to float rounding (losses and grad norms to ~1e-6 relative, below); Adam divides by
    # sqrt(v), so near-zero gradient entries amplify that rounding: allow 10% of one step (lr 1e-3).
    for k, v in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][k], v, rtol=0, atol=1e-4, msg=k)
    init = torch.load(tmp_path / "one" / "ckpt" / "last.pt", weights_only=False)["model"]  # after step 2 of 3
    moved = sum(not torch.equal(init[k], v) for k, v in one["state_dict"].items())
    assert moved > 0  # the last step changed the weights: the comparison is not between untrained generators
    logs = [[json.loads(line) for line in (tmp_path / n / "train_log.jsonl").read_text().splitlines()]
            for n in ("one", "two")]
    assert [r["step"] for r in logs[1]] == [0, 1, 2]
    for a, b in zip(*logs):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["l2"] == pytest.approx(a["l2"], rel=1e-5, abs=1e-9)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert json.loads((tmp_path / "two" / "train_summary.json").read_text())["ranks"] == 2
