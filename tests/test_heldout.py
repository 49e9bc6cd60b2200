"""Controls that answer their questions, and the held-out family (tflow.heldout): delta-W = 0 with the
single agent's prompt is the single agent exactly (answers and reference CE); the prompt arm changes only the
prompt; held-out CE per problem for every method that scores references, resumable and refused for a task
without references."""
import json

import pytest

from test_harness import _overrides, _run, checkpoint, tiny_dir  # noqa: F401 (module fixtures)


def _heldout(overrides):
    from tflow.config import load_config
    from tflow.heldout import heldout

    return heldout(load_config([], overrides), [], overrides)


def _records(folder):
    return [json.loads(x) for x in (folder / "records.jsonl").read_text().splitlines()]


def test_zero_update_with_the_single_prompt_is_the_single_agent_exactly(tiny_dir, data_dir, tmp_path, checkpoint):
    """Greedy answers identical token for token (the hooks add exact zeros), and the prompt arm differs."""
    single = _run(_overrides(tiny_dir, data_dir, tmp_path / "s", "single"))
    zero = _run(_overrides(tiny_dir, data_dir, tmp_path / "z", "tflow_zero_delta", **{"eval.checkpoint": checkpoint}))
    arm = _run(_overrides(tiny_dir, data_dir, tmp_path / "e", "tflow_zero_delta",
                          **{"eval.checkpoint": checkpoint, "eval.receiver_role": "executor"}))
    assert single["n"] == zero["n"] == arm["n"] == 5
    s, z, e = (_records(tmp_path / k) for k in "sze")
    assert [r["prediction"] for r in s] == [r["prediction"] for r in z]
    assert [r["tokens"]["receiver"] for r in s] == [r["tokens"]["receiver"] for r in z]
    assert all(a["tokens"]["receiver"]["prompt"] != b["tokens"]["receiver"]["prompt"] for a, b in zip(s, e))


@pytest.mark.parametrize("task", ["gsm8k", "humanevalplus"])
def test_heldout_ce_per_problem_for_every_method(tiny_dir, data_dir, tmp_path, checkpoint, task):
    ce = {}
    for method, extra in [("single", {}), ("tflow", {"eval.checkpoint": checkpoint}),
                          ("tflow_zero_delta", {"eval.checkpoint": checkpoint}),
                          ("tflow_shuffled", {"eval.checkpoint": checkpoint})]:
        out = tmp_path / method
        m = _heldout(_overrides(tiny_dir, data_dir, out, method, **{"eval.task": task, "eval.n": 4, **extra}))
        recs = _records(out)
        assert m["n"] == 4 and m["kind"] == "heldout" and [r["task_id"] for r in recs] == m["data"]["task_ids"]
        assert all(r["tokens_scored"] > 0 and r["ce"] == pytest.approx(r["nll"] / r["tokens_scored"]) for r in recs)
        ce[method] = [r["ce"] for r in recs]
    assert ce["tflow_zero_delta"] == pytest.approx(ce["single"], rel=1e-5)  # the receiver alone, same prompt
    assert ce["tflow"] != pytest.approx(ce["single"], rel=1e-3)  # a non-zero update changes the loss
    assert ce["tflow_shuffled"] != pytest.approx(ce["tflow"], rel=1e-4)  # another problem's senders
    again = _heldout(_overrides(tiny_dir, data_dir, tmp_path / "tflow", "tflow",
                                **{"eval.task": task, "eval.n": 4, "eval.checkpoint": checkpoint}))
    assert again["resumed_from"] == 4 and [r["ce"] for r in _records(tmp_path / "tflow")] == ce["tflow"]


def test_heldout_refuses_a_task_without_references(tiny_dir, data_dir, tmp_path):
    from tflow.errors import ConfigError

    with pytest.raises(ConfigError, match="no reference solutions"):
        _heldout(_overrides(tiny_dir, data_dir, tmp_path / "m", "single", **{"eval.task": "mmlu_redux", "eval.n": 2}))
