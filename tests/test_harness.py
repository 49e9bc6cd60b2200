"""The evaluation harness end to end on a tiny random model saved to disk (source=path): every
method runs, accounting invariants hold, interrupted runs resume without redoing or duplicating."""
import json
from pathlib import Path

import pytest
import torch

from conftest import TINY_OVERRIDES, save_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama + tokenizer as a transformers folder, loadable with model.receiver.source=path."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", tiny_tokenizer)


def _overrides(tiny_dir, data_dir, out, method, **extra):
    base = TINY_OVERRIDES + ["model.receiver.source=path", f"model.receiver.name={tiny_dir}",
                             "model.receiver.dtype=float32", f"data.data_dir={data_dir}", "eval.task=gsm8k",
                             "eval.n=5", "eval.batch_size=2", "eval.max_new_tokens=6", f"eval.method={method}",
                             f"eval.out_dir={out}", "backend=torch"]
    return base + [f"{k}={v}" for k, v in extra.items()]


def _run(overrides):
    from tflow.config import load_config
    from tflow.evaluate import evaluate

    return evaluate(load_config([], overrides), [], overrides)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_dir):
    """A generator checkpoint for the tiny receiver (non-zero B heads, so the delta is not zero)."""
    from tflow.config import load_config
    from tflow.models import load_backbones
    from tflow.pipeline import build_tflow, save_generator

    cfg = load_config([], TINY_OVERRIDES + ["model.receiver.source=path", f"model.receiver.name={tiny_dir}",
                                            "model.receiver.dtype=float32"])
    receiver, sender = load_backbones(cfg)
    tflow = build_tflow(cfg, receiver, sender)
    torch.manual_seed(0)
    for head in tflow.generator.heads.values():
        torch.nn.init.normal_(head.weight, std=0.3)
    path = tmp_path_factory.mktemp("ckpt") / "generator.pt"
    save_generator(path, tflow, cfg, receiver, sender, step=1)
    return path


@pytest.mark.parametrize("method, extra", [
    ("single", {}),
    ("textmas", {"eval.textmas_preset": "short48"}),
    ("textmas", {"eval.textmas_preset": "long", "eval.message_tokens": 5}),
    ("tflow", {}), ("tflow_zero_delta", {}), ("tflow_shuffled", {}),
])
def test_every_method_runs_and_accounts_every_agent(tiny_dir, data_dir, tmp_path, checkpoint, method, extra):
    if method.startswith("tflow"):
        extra = {**extra, "eval.checkpoint": checkpoint}
    m = _run(_overrides(tiny_dir, data_dir, tmp_path / "out", method, **extra))
    recs = [json.loads(x) for x in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    assert m["n"] == len(recs) == 5 and len({r["task_id"] for r in recs}) == 5
    senders = ["sender:strategist", "sender:knowledge_extractor"]
    for r in recs:
        assert r["processed_tokens"] == sum(t["prompt"] + t["generated"] for t in r["tokens"].values())
        assert r["tokens"]["receiver"]["generated"] == r["generated_tokens"] <= 6
        assert isinstance(r["correct"], bool) and r["gold"]
        if method == "single":
            assert set(r["tokens"]) == {"receiver"}
        else:  # senders' prefills (tflow) or prompts + messages (textmas) count too
            assert set(r["tokens"]) == {"receiver", *senders}
            assert all(r["tokens"][s]["prompt"] > 0 for s in senders)
        if method == "textmas" and extra["eval.textmas_preset"] == "short48":
            assert all(r["tokens"][s]["generated"] == 48 for s in senders)
            assert set(r["messages"]) == {"strategist", "knowledge_extractor"}
        if method == "textmas" and extra["eval.textmas_preset"] == "long":
            assert all(r["tokens"][s]["generated"] <= 5 for s in senders)
        if method.startswith("tflow"):
            assert r["tokens"]["sender:strategist"]["generated"] == 0
            assert {"sender_prefill", "generator", "receiver_prefill", "decode"} <= set(r["seconds"])
    total = m["processed_tokens"]["total"]
    assert total == sum(r["processed_tokens"] for r in recs)
    assert total == sum(t["prompt"] + t["generated"] for t in m["tokens_per_agent"]["total"].values())
    assert m["data"]["subset_size"] == 5 and m["config"]["eval"]["method"] == method
    assert m["provenance"]["packages"]["torch"]


def test_interrupted_run_resumes_without_redoing_or_duplicating(tiny_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    ov = _overrides(tiny_dir, data_dir, out, "single")
    first = _run(ov)
    path = out / "records.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]) + lines[2][:17])  # killed while writing the third record
    again = _run(ov)
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["task_id"] for r in recs][:2] == [json.loads(x)["task_id"] for x in lines[:2]]
    assert len(recs) == 5 and len({r["task_id"] for r in recs}) == 5
    assert again["resumed_from"] == 2 and again["n"] == 5
    assert again["accuracy"] == first["accuracy"]  # greedy: the redone problems give the same answers
    assert _run(ov)["resumed_from"] == 5  # a finished run does nothing


def test_other_config_in_the_same_folder_is_an_error(tiny_dir, data_dir, tmp_path):
    from tflow.errors import ConfigError

    _run(_overrides(tiny_dir, data_dir, tmp_path / "out", "single"))
    with pytest.raises(ConfigError, match="another config"):
        _run(_overrides(tiny_dir, data_dir, tmp_path / "out", "single", **{"eval.max_new_tokens": 7}))


def test_tflow_without_checkpoint_is_a_clear_error(tiny_dir, data_dir, tmp_path):
    from tflow.errors import CheckpointError

    with pytest.raises(CheckpointError, match="eval.checkpoint"):
        _run(_overrides(tiny_dir, data_dir, tmp_path / "out", "tflow"))
    with pytest.raises(CheckpointError, match="not found"):
        _run(_overrides(tiny_dir, data_dir, tmp_path / "out", "tflow", **{"eval.checkpoint": tmp_path / "no.pt"}))


def test_shuffled_condition_is_a_derangement():
    from tflow.methods.base import derangement

    for n in (2, 3, 10, 64):
        perm = derangement(n, seed=n)
        assert sorted(perm) == list(range(n)) and all(i != j for i, j in enumerate(perm))
    assert derangement(10, 1) != derangement(10, 2)


def test_eval_config_typos_fail_naming_the_key():
    from tflow.config import load_config
    from tflow.errors import ConfigError

    for bad, key in [("eval.method=tflow_magic", "eval.method"), ("eval.task=gsm9k", "eval.task"),
                     ("eval.textmas_preset=medium", "eval.textmas_preset"), ("eval.nn=3", "eval.nn")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config([], [bad])


def test_static_lora_control_trains_on_the_same_budget_and_evaluates(tiny_dir, data_dir, tmp_path):
    """Same footing as the generator; the learning rate is chosen on the validation problems from the grid
    (recorded); the adapter reproduces the training-time transient hooks when PEFT loads it; a rerun of a
    finished training does nothing; evaluation refuses a folder without a finished training."""
    from tflow.config import load_config
    from tflow.errors import CheckpointError
    from tflow.methods.static_lora import StaticTrainee, train_static
    from tflow.models import load_backbones

    ov = TINY_OVERRIDES + ["model.receiver.source=path", f"model.receiver.name={tiny_dir}", "model.receiver.dtype=float32",
                           f"data.data_dir={data_dir}", "data.mix=[{source: gsm8k}]", "data.per_source_limit=40",
                           "data.validation_size=4", "train.steps=3", "train.batch_size=2", "train.ckpt_every=2",
                           "train.log_every=1", "train.lr_grid=[0.5, 2.0]", f"train.out_dir={tmp_path / 'static'}",
                           f"model.cache_dir={tmp_path / 'cache'}"]
    cfg = load_config([], ov)
    out = train_static(cfg, progress=False)
    summary = json.loads((out / "train_summary.json").read_text())
    assert [g["lr"] for g in summary["lr_grid"]] == [0.5 * cfg.train.lr, 2.0 * cfg.train.lr]
    best = min(summary["lr_grid"], key=lambda g: g["validation_ce"])
    assert summary["chosen_lr"] == best["lr"] and json.loads((out / "trained.json").read_text())["chosen_lr"] == best["lr"]
    assert summary["trainable_parameters"] == sum(2 * cfg.lora.rank * (l.in_features + l.out_features)
                                                  for l in StaticTrainee(cfg, *load_backbones(cfg)).linears.values())
    log = [json.loads(x) for x in (Path(best["folder"]) / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2] and all(r["grad_norm"] > 0 and "l2" in r for r in log)
    assert train_static(cfg, progress=False) == out  # finished: nothing to redo
    m = _run(_overrides(tiny_dir, data_dir, tmp_path / "out", "static_lora", **{"eval.checkpoint": out}))
    assert m["n"] == 5 and m["method"] == "static_lora"
    recs = [json.loads(x) for x in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    assert all(set(r["tokens"]) == {"receiver"} for r in recs)
    with pytest.raises(CheckpointError, match="static_lora needs eval.checkpoint"):
        _run(_overrides(tiny_dir, data_dir, tmp_path / "out2", "static_lora", **{"eval.checkpoint": tmp_path}))


@pytest.mark.parametrize("task", ["gsm8k", "math500", "mmlu_redux", "humanevalplus", "mbppplus"])
def test_every_task_runs_through_the_harness(tiny_dir, data_dir, tmp_path, task):
    """Load, prompt, generate, score and record on each benchmark (tiny model: answers are noise)."""
    out = tmp_path / "out"
    m = _run(_overrides(tiny_dir, data_dir, out, "single", **{"eval.task": task, "eval.n": 2}))
    recs = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    assert m["n"] == len(recs) == 2 and m["data"]["source"] == "offline" and m["data"]["version"]
    assert all(isinstance(r["correct"], bool) and r["detail"] is not None for r in recs)
    if task in ("humanevalplus", "mbppplus"):  # evalplus base and plus status per problem
        assert all(r["detail"]["base"] in ("pass", "fail", "timeout", "error") for r in recs)
        assert set(m["pass@1"]) == {"base", "plus"}


def test_runs_sharing_a_process_match_runs_alone(tiny_dir, data_dir, tmp_path, checkpoint, capsys):
    """--each: seeds run one after another in one process give what each gives alone (sampled, tflow hooks)."""
    from tflow.evaluate import main

    shared = [o for o in _overrides(tiny_dir, data_dir, "unused", "tflow", **{"eval.checkpoint": checkpoint,
              "eval.do_sample": "true"}) if not o.startswith("eval.out_dir=")]
    main([*shared, "--each", f"eval.seed=3 eval.out_dir={tmp_path / 'a'}",
          "--each", f"eval.seed=4 eval.out_dir='{tmp_path / 'b b'}'"])
    main([*shared, "eval.seed=4", f"eval.out_dir={tmp_path / 'alone'}"])

    def answers(folder):
        return [(r["task_id"], r["prediction"], r["tokens"]) for r in
                map(json.loads, (tmp_path / folder / "records.jsonl").read_text().splitlines())]

    assert answers("b b") == answers("alone")
    assert answers("a") != answers("alone")  # the seed reached the sampler
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["config"]["eval"]["seed"] == 3
    with pytest.raises(SystemExit):
        main([*shared, "--each", f"eval.seed=1 eval.out_dir={tmp_path / 'c'}",
              "--each", f"eval.seed=2 eval.out_dir={tmp_path / 'c'}"])
    assert "share an eval.out_dir" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_shared_backbones_are_reused_and_refuse_a_model_left_modified(tiny_dir):
    from tflow.config import load_config
    from tflow.models import load_backbones, shared_backbones

    cfg = load_config([], TINY_OVERRIDES + ["model.receiver.source=path", f"model.receiver.name={tiny_dir}",
                                            "model.receiver.dtype=float32"])
    with shared_backbones():
        first, _ = load_backbones(cfg)
        assert load_backbones(cfg)[0] is first
        handle = first.model.get_submodule("model.layers.0.mlp.up_proj").register_forward_hook(lambda *a: None)
        with pytest.raises(RuntimeError, match="left hooks"):
            load_backbones(cfg)
        handle.remove()
        assert load_backbones(cfg)[0] is first
    assert load_backbones(cfg)[0] is not first  # outside the context every call loads anew
