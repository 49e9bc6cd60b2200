"""Training, resume, checkpoints and PEFT export on tiny random models."""
import json

import pytest
import torch
from peft import PeftModel

from tflow.agents import receiver_batch, sender_states
from tflow.config import load_config
from tflow.data import Problem
from tflow.errors import CheckpointError, TFlowError
from tflow.export import export_peft
from tflow.lora import TransientLoRA
from tflow.models import target_linears
from tflow.pipeline import build_tflow, delta_for, load_generator, read_checkpoint

from conftest import TINY_OVERRIDES, make_backbone

PROBLEMS = [Problem(f"t/{i}", f"What is {i} plus {i + 1}? Compute it.", f"The answer is {2 * i + 1}.", str(2 * i + 1))
            for i in range(8)]


def _cfg(tmp_path, *extra):
    return load_config(overrides=TINY_OVERRIDES + [f"model.cache_dir={tmp_path / 'cache'}",
                                                   f"train.out_dir={tmp_path / 'run'}", "train.log_every=1",
                                                   "train.warmup_steps=1", *extra])


def test_training_overfits_eight_examples(tiny_tokenizer, tmp_path):
    from tflow.train import train

    # a wider init lets the tiny model's logits get sharp (with 0.02 they stay within ~0.6 of uniform)
    bb = make_backbone(tiny_tokenizer, hidden=64, init_range=0.5)
    cfg = _cfg(tmp_path, "train.steps=200", "train.batch_size=8", "train.lr=1e-2", "train.l2_delta=0",
               "lora.rank=8", "generator.width=64", "generator.depth=2")
    final = train(cfg, progress=False, backbones=(bb, bb), problems=PROBLEMS)
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    first, last = log[0]["loss"], min(r["loss"] for r in log[-5:])
    uniform = torch.log(torch.tensor(float(len(tiny_tokenizer)))).item()
    assert last < first / 5 and last < uniform / 3, (first, last, uniform)  # memorised, not just flattened
    assert log[-1]["delta_w_norm_per_layer"]["0"] > 0
    ckpt = read_checkpoint(final)
    assert ckpt["trained_steps"] == 200 and ckpt["receiver"]["ident"] == "tiny:llama"


def _train_state(tmp_path, backbone, stop_after=None, resume=False):
    from tflow.train import train

    cfg = _cfg(tmp_path, "train.steps=6", "train.batch_size=2", "train.ckpt_every=100")
    return train(cfg, progress=False, stop_after=stop_after, backbones=(backbone, backbone), problems=PROBLEMS)


def test_resume_equals_uninterrupted_training(tiny_tokenizer, tmp_path):
    bb = make_backbone(tiny_tokenizer)
    straight = read_checkpoint(_train_state(tmp_path / "a", bb))
    assert _train_state(tmp_path / "b", bb, stop_after=4) is None  # interrupted after 4 of 6 steps
    assert (tmp_path / "b" / "run" / "ckpt" / "last.pt").is_file()
    resumed = read_checkpoint(_train_state(tmp_path / "b", bb))
    for k, v in straight["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "run" / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(6))  # no duplicated log lines after the resume


def test_resume_refuses_a_changed_config(tiny_tokenizer, tmp_path):
    from tflow.train import train

    bb = make_backbone(tiny_tokenizer)
    assert _train_state(tmp_path, bb, stop_after=2) is None
    cfg = _cfg(tmp_path, "train.steps=6", "train.batch_size=2", "train.ckpt_every=100", "train.lr=0.5")
    with pytest.raises(TFlowError, match="another config"):
        train(cfg, progress=False, backbones=(bb, bb), problems=PROBLEMS)
    assert _train_state(tmp_path, bb) is not None  # the original config resumes and finishes
    with pytest.raises(TFlowError, match="another config"):  # a finished run is not silently reused
        train(cfg, progress=False, backbones=(bb, bb), problems=PROBLEMS)


def test_checkpoint_mismatch_is_an_error(tiny_tokenizer, tmp_path):
    bb = make_backbone(tiny_tokenizer)
    final = _train_state(tmp_path, bb)
    good = _cfg(tmp_path)
    load_generator(final, good, bb, bb)  # fits
    with pytest.raises(CheckpointError, match="lora.rank"):
        load_generator(final, _cfg(tmp_path, "lora.rank=8"), bb, bb)
    other = make_backbone(tiny_tokenizer, hidden=48, ident="tiny:wider")
    with pytest.raises(CheckpointError, match="receiver.hidden_size"):
        load_generator(final, good, other, bb)
    with pytest.raises(CheckpointError, match="not found"):
        load_generator(tmp_path / "missing.pt", good, bb, bb)


def test_peft_export_reproduces_transient_logits(tiny_backbone, tiny_cfg, tmp_path):
    tflow = build_tflow(tiny_cfg, tiny_backbone, tiny_backbone)
    for name, head in tflow.generator.heads.items():
        torch.nn.init.normal_(head.weight, std=0.3)
    q = "What is 3 plus 4? Compute it."
    per = [[sender_states(tiny_backbone, r, [q], 64)[0][0] for r in tiny_cfg.agents.senders]]
    batch = receiver_batch(tiny_backbone.tokenizer, "solver", [q])
    delta, _ = delta_for(tflow, tiny_backbone, per, batch)
    linears = target_linears(tiny_backbone.model, list(tiny_cfg.lora.targets))
    with torch.no_grad():
        base = tiny_backbone.model(**batch).logits
        with TransientLoRA(linears, delta):
            transient = tiny_backbone.model(**batch).logits
        out = export_peft(delta, 0, tiny_backbone.model, linears, tmp_path / "adapter")
        peft_model = PeftModel.from_pretrained(tiny_backbone.model, out)
        exported = peft_model(**batch).logits
    assert (transient - base).abs().max() > 1e-3
    torch.testing.assert_close(exported, transient, rtol=1e-4, atol=1e-4)  # fp32, different op order


def test_max_fusion_cannot_be_exported(tiny_backbone, tmp_path):
    cfg = load_config(overrides=TINY_OVERRIDES + ["fusion.name=max"])
    tflow = build_tflow(cfg, tiny_backbone, tiny_backbone)
    q = "What is 3 plus 4?"
    per = [[sender_states(tiny_backbone, r, [q], 64)[0][0] for r in cfg.agents.senders]]
    delta, _ = delta_for(tflow, tiny_backbone, per, receiver_batch(tiny_backbone.tokenizer, "solver", [q]))
    linears = target_linears(tiny_backbone.model, list(cfg.lora.targets))
    with pytest.raises(TFlowError, match="max"):
        export_peft(delta, 0, tiny_backbone.model, linears, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_tflow_across_sizes_trains_and_answers(tiny_tokenizer, tmp_path, data_dir):
    """TFlow with senders of one width (32) and a receiver of another (48), as the 0.5B -> 1.5B pair
    (config/run/qwen_pair.yaml): the generator reads the senders' width and writes the receiver's LoRA shapes;
    it trains, its checkpoint records both models, and the evaluation entry point answers with it."""
    from tflow.evaluate import evaluate
    from tflow.models import load_backbones
    from tflow.train import train

    folders = {}
    for name, hidden, seed in (("r48", 48, 0), ("s32", 32, 1)):
        make_backbone(tiny_tokenizer, seed=seed, hidden=hidden, init_range=0.5).model.save_pretrained(tmp_path / name)
        tiny_tokenizer.save_pretrained(tmp_path / name)
        folders[name] = tmp_path / name
    models = ["model.receiver.source=path", f"model.receiver.name={folders['r48']}", "model.receiver.dtype=float32",
              "model.sender.source=path", f"model.sender.name={folders['s32']}", "model.sender.dtype=float32",
              f"data.data_dir={data_dir}"]
    cfg = _cfg(tmp_path, *models, "train.steps=3", "train.batch_size=2", "train.ckpt_every=100")
    receiver, sender = load_backbones(cfg)
    assert (receiver.model.config.hidden_size, sender.model.config.hidden_size) == (48, 32)
    tflow = build_tflow(cfg, receiver, sender)
    for head in tflow.generator.heads.values():
        torch.nn.init.normal_(head.weight, std=0.3)
    q = PROBLEMS[0].question
    per = [[sender_states(sender, r, [q], 64)[0][0] for r in cfg.agents.senders]]  # [L+1, T, 32] each
    batch = receiver_batch(receiver.tokenizer, "solver", [q])
    delta, _ = delta_for(tflow, receiver, per, batch)
    with torch.no_grad():  # the receiver's own Linear shapes take the update
        base = receiver.model(**batch).logits
        with TransientLoRA(target_linears(receiver.model, list(cfg.lora.targets)), delta):
            assert (receiver.model(**batch).logits - base).abs().max() > 1e-3
    final = train(cfg, progress=False, problems=PROBLEMS)
    ckpt = read_checkpoint(final)
    assert ckpt["trained_steps"] == 3 and ckpt["receiver"]["hidden_size"] == 48 and ckpt["sender"]["hidden_size"] == 32
    ev = load_config(overrides=TINY_OVERRIDES + models + [
        f"model.cache_dir={tmp_path / 'cache'}", "eval.task=gsm8k", "eval.n=2", "eval.max_new_tokens=3",
        "eval.method=tflow", f"eval.checkpoint={final}", f"eval.out_dir={tmp_path / 'eval'}"])
    metrics = evaluate(ev)
    assert metrics["n"] == 2 and metrics["method"] == "tflow"


def test_validation_curve_is_logged_resumes_and_chooses_steps(tiny_tokenizer, tmp_path):
    """train.validation_every logs the generator's CE on held-back problems before training, every N steps and
    after the last; an interrupted run resumes to the same records; tflow.curve reads, draws and chooses."""
    from tflow import curve
    from tflow.train import train

    bb = make_backbone(tiny_tokenizer)
    held = [Problem(f"v/{i}", f"What is {i} times 2?", f"The answer is {2 * i}.", str(2 * i)) for i in range(3)]

    def run(folder, stop_after=None):
        cfg = _cfg(folder, "train.steps=5", "train.batch_size=2", "train.ckpt_every=2", "train.validation_every=2")
        return train(cfg, progress=False, stop_after=stop_after, backbones=(bb, bb), problems=PROBLEMS,
                     validation=held)

    def curve_of(folder):
        return [r for r in map(json.loads, (folder / "run" / "train_log.jsonl").read_text().splitlines())
                if "validation_ce" in r]

    run(tmp_path / "a")
    straight = curve_of(tmp_path / "a")
    assert [r["steps_done"] for r in straight] == [0, 2, 4, 5] and all(r["validation_problems"] == 3 for r in straight)
    assert all(0 < r["validation_ce"] < 20 for r in straight)
    assert run(tmp_path / "b", stop_after=3) is None  # checkpoint after 3 steps, validation record of step 2 kept
    run(tmp_path / "b")
    assert curve_of(tmp_path / "b") == straight

    log = tmp_path / "a" / "run" / "train_log.jsonl"
    assert curve.read_curve(log) == [(r["steps_done"], r["validation_ce"]) for r in straight]
    curve.main([str(log), "--out-dir", str(tmp_path / "fig"), "--tolerance", "0.5"])
    out = json.loads((tmp_path / "fig" / "curve.json").read_text())["runs"][str(log.parent)]
    assert out["chosen_steps"] in (0, 2, 4, 5) and out["best_ce"] == min(r["validation_ce"] for r in straight)
    assert (tmp_path / "fig" / "curve.png").stat().st_size > 1000 and (tmp_path / "fig" / "curve.pdf").is_file()


def test_choose_steps_finds_the_plateau_and_says_when_there_is_none():
    from tflow.curve import choose_steps

    flat = choose_steps([(25, 1.30), (50, 1.10), (75, 1.004), (100, 1.0), (125, 1.003)], tolerance=0.01)
    assert flat["chosen_steps"] == 75 and flat["best_step"] == 100 and flat["plateaued"]
    falling = choose_steps([(25, 1.3), (50, 1.2), (75, 1.1)], tolerance=0.01)
    assert falling["chosen_steps"] == 75 and not falling["plateaued"]


def test_curve_without_validation_records_is_a_clear_error(tmp_path):
    from tflow.curve import read_curve

    log = tmp_path / "train_log.jsonl"
    log.write_text(json.dumps({"step": 0, "loss": 1.0}) + "\n")
    with pytest.raises(TFlowError, match="validation_every"):
        read_curve(log)
    with pytest.raises(TFlowError, match="no training log"):
        read_curve(tmp_path / "missing.jsonl")
