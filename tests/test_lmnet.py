"""LMNet edges (tflow.methods.lmnet) on tiny random models whose sender and receiver widths differ: the soft-token
layout, parameter matching against TFlow's module, training through the shared trainer, evaluation, accounting,
the held-out NLL; and a slow smoke test on the real Qwen 0.5B -> 1.5B pair."""
import json
import os

import pytest
import torch

from conftest import TINY_OVERRIDES, make_backbone

VIEWS = ["What is 3 plus 4?", "Natalia sold clips to 48 of her friends in April, and then she sold half as many"]
PROMPTS = ["Compute 3 + 4 = ?", "How many clips did Natalia sell altogether in April and May? Think step by step."]


@pytest.fixture
def pair(tiny_tokenizer):
    """(receiver of width 48, sender of width 32)."""
    return (make_backbone(tiny_tokenizer, hidden=48, init_range=0.5, ident="tiny:r48"),
            make_backbone(tiny_tokenizer, seed=1, hidden=32, ident="tiny:s32"))


def _cfg(*extra):
    from tflow.config import load_config

    return load_config([], TINY_OVERRIDES + ["eval.max_new_tokens=6", "data.max_solution_tokens=12", *extra])


def _graph(cfg, receiver, sender, width=16):
    from tflow.methods.lmnet import LMNet, make_edges, receiver_rms

    torch.manual_seed(0)
    edges = make_edges(cfg.lmnet, len(cfg.agents.senders), sender.hidden_size, receiver.hidden_size, width,
                       receiver_rms(receiver))
    return LMNet(cfg, receiver, sender, edges.eval())


@pytest.mark.parametrize("edge", ["transformer", "mlp"])
def test_soft_tokens_shapes_padding_and_positions(pair, edge):
    """Each row gets one segment per sender (its question span) inside its prompt; padded batches (left for
    generation, right for training) give the same numbers as each row alone; the mlp edge is per token."""
    from tflow.agents import question_span
    from tflow.methods.base import decode_rows

    receiver, sender = pair
    cfg = _cfg(f"lmnet.edge={edge}")
    g = _graph(cfg, receiver, sender)
    with torch.no_grad():
        soft = g.soft_tokens(VIEWS)
        spans = [[question_span(sender.tokenizer, r, v, 64) for r in cfg.agents.senders] for v in VIEWS]
        for s, sp in zip(soft, spans):
            assert s.shape == (sum(x.end - x.start for x in sp), 48)
        for side in ("left", "right"):
            embeds, mask, labels, lengths = g.inputs(soft, PROMPTS, ["7", "72"] if side == "right" else None, side)
            assert embeds.shape[:2] == mask.shape and embeds.shape[2] == 48 and mask.sum(1).tolist() == lengths
            logits = receiver.model(inputs_embeds=embeds, attention_mask=mask,
                                    position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
            for b in range(2):
                real = mask[b].bool()
                alone = receiver.model(inputs_embeds=embeds[b:b + 1, real]).logits[0]
                torch.testing.assert_close(logits[b, real], alone, atol=1e-4, rtol=1e-4)
            if side == "right":  # each row's soft tokens sit where its user message starts, unscored
                for b, s in enumerate(soft):
                    k = question_span(receiver.tokenizer, cfg.agents.receiver, PROMPTS[b], 1 << 30).start
                    assert 0 < k and embeds[b, k:k + len(s)].equal(s)
                    assert (labels[b, :k + len(s)] == -100).all() and (labels[b] != -100).any()
        # generation from left-padded inputs_embeds (positions from the mask) == each row alone
        outs = g.answer([_problem(i, v) for i, v in enumerate(VIEWS)], PROMPTS)
        embeds, mask, _, _ = g.inputs(soft, PROMPTS, side="left")
        for b, o in enumerate(outs):
            row = embeds[b:b + 1, mask[b].bool()]
            ref = receiver.model.generate(inputs_embeds=row, attention_mask=torch.ones(row.shape[:2], dtype=torch.long),
                                          max_new_tokens=6, do_sample=False, pad_token_id=receiver.tokenizer.pad_token_id)
            assert o.text == decode_rows(receiver.tokenizer, ref)[0][0]
    if edge == "mlp":  # no attention across the sequence: a token's output ignores the other tokens
        e = g.edges[0]
        x = torch.randn(1, 5, 32)
        y = e(x, torch.ones(1, 5, dtype=torch.bool))
        x2 = x.clone()
        x2[0, 1:] = torch.randn(4, 32)
        torch.testing.assert_close(e(x2, torch.ones(1, 5, dtype=torch.bool))[0, 0], y[0, 0])
        assert not any(isinstance(m, torch.nn.MultiheadAttention) or type(m).__name__ == "Attention" for m in e.modules())


def test_nll_on_the_scored_tail_equals_row_nll_on_full_logits(pair):
    """Left padding + logits for the solution tail only == tflow.methods.base.row_nll on full right-padded logits."""
    from tflow.methods.base import row_nll

    receiver, sender = pair
    g = _graph(_cfg(), receiver, sender)
    solutions = ["7", "Natalia sold 48 / 2 = 24 clips in May, 72 in all."]
    with torch.no_grad():
        soft = g.soft_tokens(VIEWS)
        nll, n = g.nll(soft, PROMPTS, solutions)
        embeds, mask, labels, _ = g.inputs(soft, PROMPTS, solutions, side="right")
        ref_nll, ref_n = row_nll(receiver.model(inputs_embeds=embeds, attention_mask=mask).logits, labels)
    assert nll.tolist() == pytest.approx(ref_nll, rel=1e-4) and n.tolist() == ref_n and ref_n[0] < ref_n[1]


def _problem(i, view):
    from tflow.tasks.base import EvalProblem

    return EvalProblem(f"p{i}", view, "", view=view)


def test_answer_accounts_every_agent_and_the_transform_phase(pair):
    receiver, sender = pair
    cfg = _cfg()
    g = _graph(cfg, receiver, sender)
    outs = g.answer([_problem(i, v) for i, v in enumerate(VIEWS)], PROMPTS)
    with torch.no_grad():
        soft = g.soft_tokens(VIEWS)
    _, _, _, lengths = g.inputs(soft, PROMPTS, side="left")
    from tflow.agents import question_span
    for b, o in enumerate(outs):
        t = o.accounting.tokens
        assert set(t) == {"receiver", "sender:strategist", "sender:knowledge_extractor"}
        for r in cfg.agents.senders:  # each sender's whole prompt is its prefill
            assert t[f"sender:{r}"] == {"prompt": len(question_span(sender.tokenizer, r, VIEWS[b], 64).input_ids),
                                        "generated": 0}
        assert t["receiver"] == {"prompt": lengths[b], "generated": o.generated_tokens}  # soft tokens + its prompt
        assert set(o.accounting.seconds) == {"sender_prefill", "transform", "receiver_prefill", "decode"}
        assert o.accounting.processed_tokens == sum(x["prompt"] + x["generated"] for x in t.values())


def test_parameters_match_tflows_module_for_different_widths(tiny_tokenizer):
    """The matched edges' total is within the tolerance of TFlow's trainable module (built for real, not on the
    meta device), for both edge kinds and two backbone widths; an unreachable target is a ConfigError."""
    from tflow.errors import ConfigError
    from tflow.methods.lmnet import LMNetTrainee, matched_width
    from tflow.pipeline import build_tflow

    for d_r, d_s in [(48, 32), (32, 64)]:
        receiver = make_backbone(tiny_tokenizer, hidden=d_r, ident=f"tiny:{d_r}")
        sender = make_backbone(tiny_tokenizer, seed=1, hidden=d_s, ident=f"tiny:s{d_s}")
        target = sum(p.numel() for p in build_tflow(_cfg(), receiver, sender).parameters())
        for edge in ("transformer", "mlp"):
            t = LMNetTrainee(_cfg(f"lmnet.edge={edge}"), receiver, sender)
            n = sum(p.numel() for p in t.parameters())
            assert t.info["tflow_parameters"] == target and t.info["lmnet_parameters"] == n
            assert abs(n / target - 1) <= 0.1 and t.info["matched"]
            assert edge == "mlp" or t.info["width"] % 4 == 0
        fixed = LMNetTrainee(_cfg("lmnet.width=8"), receiver, sender)
        assert fixed.info["width"] == 8 and not fixed.info["matched"] and fixed.info["parameter_ratio"] < 0.5
    with pytest.raises(ConfigError, match="lmnet.width"):
        matched_width(_cfg().lmnet, 2, 32, 48, target=100)


def _save(folder, tokenizer, hidden, seed):
    make_backbone(tokenizer, seed=seed, hidden=hidden, init_range=0.5).model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_tokenizer, data_dir):
    """Both edge kinds trained 3 steps through tflow.methods.trainer on a width-48 receiver and width-32 senders."""
    from tflow.config import load_config
    from tflow.methods.lmnet import train_lmnet

    work = tmp_path_factory.mktemp("lmnet")
    rec, snd = _save(work / "r48", tiny_tokenizer, 48, 0), _save(work / "s32", tiny_tokenizer, 32, 1)
    base = TINY_OVERRIDES + [
        "model.receiver.source=path", f"model.receiver.name={rec}", "model.receiver.dtype=float32",
        "model.sender.source=path", f"model.sender.name={snd}", "model.sender.dtype=float32", "model.threads=1",
        f"model.cache_dir={work / 'cache'}", f"data.data_dir={data_dir}", "data.mix=[{source: gsm8k}]",
        "data.per_source_limit=40", "data.validation_size=4", "data.max_solution_tokens=12", "train.steps=3",
        "train.batch_size=2", "train.ckpt_every=2", "train.log_every=1", "backend=torch"]
    out = {}
    for edge in ("transformer", "mlp"):
        cfg = load_config([], base + [f"lmnet.edge={edge}", f"train.out_dir={work / edge}"])
        out[edge] = train_lmnet(cfg, progress=False)
    return base, out


def test_training_writes_both_counts_and_evaluation_reads_them(trained, tmp_path):
    from tflow.config import load_config
    from tflow.errors import CheckpointError
    from tflow.evaluate import evaluate

    base, folders = trained
    for edge, folder in folders.items():
        marker = json.loads((folder / "trained.json").read_text())
        summary = json.loads((folder / "train_summary.json").read_text())
        assert marker["method"] == "lmnet" and marker["lmnet"]["edge"] == edge
        assert marker["trainable_parameters"] == marker["lmnet"]["lmnet_parameters"] == summary["lmnet"]["lmnet_parameters"]
        assert abs(marker["lmnet"]["parameter_ratio"] - 1) <= 0.1 and summary["steps"] == 3
        log = [json.loads(x) for x in (folder / "train_log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == [0, 1, 2] and all(r["grad_norm"] > 0 for r in log)
        ov = base + [f"lmnet.edge={edge}", "eval.method=lmnet", "eval.task=gsm8k", "eval.n=3", "eval.batch_size=2",
                     "eval.max_new_tokens=4", f"eval.checkpoint={folder}", f"eval.out_dir={tmp_path / edge}"]
        m = evaluate(load_config([], ov), [], ov)
        recs = [json.loads(x) for x in (tmp_path / edge / "records.jsonl").read_text().splitlines()]
        assert m["n"] == 3 and all(set(r["tokens"]) == {"receiver", "sender:strategist", "sender:knowledge_extractor"}
                                   for r in recs)
    ov = base + ["lmnet.edge=mlp", "eval.method=lmnet", f"eval.checkpoint={folders['transformer']}",
                 f"eval.out_dir={tmp_path / 'wrong'}"]
    with pytest.raises(CheckpointError, match="edge: trained 'transformer' vs run 'mlp'"):
        evaluate(load_config([], ov), [], ov)


def test_reference_nll_is_the_training_loss_per_problem(trained):
    """Summed over problems, the held-out NLL per scored token is the trainee's batch cross-entropy."""
    from tflow.config import load_config
    from tflow.data import heldout_gsm8k
    from tflow.methods.lmnet import LMNet, LMNetTrainee
    from tflow.models import load_backbones

    base, folders = trained
    cfg = load_config([], base + ["eval.method=lmnet", f"eval.checkpoint={folders['transformer']}", "eval.batch_size=2"])
    method, _ = LMNet.build(cfg)
    problems = heldout_gsm8k(cfg.data.data_dir, 3)
    pairs = method.reference_nll(problems)
    assert len(pairs) == 3 and all(n > 0 and c > 0 for n, c in pairs)
    trainee = LMNetTrainee(cfg, *load_backbones(cfg))
    trainee.edges.load_state_dict(method.edges.state_dict())
    with torch.no_grad():
        ce = trainee.loss(problems, 0)[1]["ce"]
    assert sum(n for n, _ in pairs) / sum(c for _, c in pairs) == pytest.approx(ce, rel=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("TFLOW_REAL_PAIR"), reason="loads the 0.5B and 1.5B Qwen assets (minutes on "
                    "2 cores): set TFLOW_REAL_PAIR=1 to run it")
def test_real_qwen_pair_smoke(tmp_path):
    """Qwen2.5-Coder 0.5B senders -> 1.5B receiver (the offline assets, converted once): matched edges, one
    training step, a held-out NLL and a short answer. Opt-in (TFLOW_REAL_PAIR=1), so the default suite stays
    CI-sized; skipped when the assets are not installed."""
    from tflow.config import load_config
    from tflow.data import heldout_gsm8k
    from tflow.errors import AssetError
    from tflow.methods.lmnet import LMNet, train_lmnet

    cfg = load_config(["config/run/cpu.yaml", "config/run/qwen_pair.yaml"], [
        "train.steps=1", "train.batch_size=1", "data.max_solution_tokens=16", "data.mix=[{source: gsm8k}]",
        "data.per_source_limit=40", "data.validation_size=2", f"train.out_dir={tmp_path / 'lmnet'}",
        "eval.method=lmnet", f"eval.checkpoint={tmp_path / 'lmnet'}", "eval.max_new_tokens=4"])
    try:
        out = train_lmnet(cfg, progress=False)
    except AssetError as err:
        pytest.skip(f"offline Qwen assets not installed: {err}")
    info = json.loads((out / "trained.json").read_text())["lmnet"]
    assert (info["d_sender"], info["d_receiver"]) == (896, 1536) and abs(info["parameter_ratio"] - 1) <= 0.1
    method, _ = LMNet.build(cfg)
    (nll, n), = method.reference_nll(heldout_gsm8k(cfg.data.data_dir, 1))
    assert n > 0 and 0 < nll / n < 20
    o, = method.answer([_problem(0, VIEWS[1])], [PROMPTS[1]])
    assert o.generated_tokens > 0 and o.accounting.tokens["receiver"]["prompt"] > 0
