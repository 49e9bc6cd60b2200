"""The prepare-data stage: the manifest names the subset every evaluation draws, and bad data fails early."""
import json

import pytest

from tflow import prepare
from tflow.config import load_config
from tflow.tasks import get_task, subset


def test_manifest_records_the_evaluated_subset_and_training_counts(tmp_path, data_dir):
    out = tmp_path / "m.json"
    args = ["--tasks", "gsm8k", "mmlu_redux", "--seeds", "0", "--out", str(out), f"data.data_dir={data_dir}",
            "eval.n=5", "eval.subset_seed=3", "data.per_source_limit=50", f"model.cache_dir={tmp_path / 'cache'}"]
    prepare.main(args)
    m = json.loads(out.read_text())
    cfg = load_config([], [f"data.data_dir={data_dir}"])
    for name in ("gsm8k", "mmlu_redux"):
        every, _ = get_task(name).load(data_dir)
        assert m["tasks"][name]["task_ids"] == [p.task_id for p in subset(every, 5, 3)]
        assert m["tasks"][name]["set_size"] == len(every) and m["tasks"][name]["source"]["source"] == "offline"
    assert m["tasks"]["gsm8k"]["set_size"] == 1319 and len(m["tasks"]["gsm8k"]["subset_sha256"]) == 64
    train = m["training"]["0"]
    assert set(train["sources"]) == {e.source for e in cfg.data.mix}
    assert train["problems"] == cfg.train.steps * cfg.train.batch_size  # the run's whole training budget
    assert m["config"]["eval"]["n"] == 5 and m["provenance"]["git_commit"]


def test_missing_data_fails_naming_the_fix(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        prepare.main(["--tasks", "gsm8k", "--out", str(tmp_path / "m.json"), f"data.data_dir={tmp_path / 'nowhere'}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "TFLOW_DATA_DIR" in err
    assert not (tmp_path / "m.json").exists()
