"""kv_hetero: the learned cache transformation between models of different widths, layer and head counts
(tiny random Llama sender -> tiny random Qwen2 receiver sharing a tokenizer), its two training phases, the
two evaluation settings and the accounting; a slow smoke test on the real Qwen2.5-Coder 0.5B -> 1.5B pair."""
import json

import pytest
import torch

from conftest import TINY_OVERRIDES, make_backbone

PROBLEMS = [("gsm8k/test/1", "What is 3 plus 4?"), ("gsm8k/test/2", "Natalia sold clips to 48 of her friends in April.")]


def qwen2_backbone(tokenizer, seed: int = 1):
    """A tiny Qwen2 (k/v biases): 3 layers, hidden 48, 4 heads of 12, 1 KV head (the Llama sender: 2 layers,
    hidden 32, 4 heads of 8, 2 KV heads)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tflow.models import Backbone

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, initializer_range=0.3)
    return Backbone(Qwen2ForCausalLM(cfg).eval().requires_grad_(False), tokenizer, "tiny:qwen2")


@pytest.fixture
def pair(tiny_tokenizer):
    from tflow.config import load_config
    from tflow.methods.kv_hetero import KVHeteroTrainee

    cfg = load_config([], TINY_OVERRIDES + ["train.steps=4", "eval.max_new_tokens=4", "data.max_solution_tokens=16"])
    sender, receiver = make_backbone(tiny_tokenizer, init_range=0.3), qwen2_backbone(tiny_tokenizer)
    return cfg, receiver, sender, KVHeteroTrainee(cfg, receiver, sender)


def _training_problems():
    from tflow.data import Problem

    return [Problem("a", q, "Add them: 3 + 4 = 7. The answer is 7.", "7") for _, q in PROBLEMS]


def _eval_problems():
    from tflow.tasks.base import EvalProblem

    return [EvalProblem(i, q, "7") for i, q in PROBLEMS]


def test_mapping_shapes_and_rotary_consistency(pair):
    """Receiver-shaped cache [Lr, B, Hr, P, dr]; the sender's positions are undone (the same tokens prefilled at
    other sender positions map to the same receiver cache), the receiver's applied (shift = rotation)."""
    from tflow.methods.kv_hetero import prefill_kv, sender_blocks
    from tflow.methods.latent import positions, rotary, rotate, unrotate

    cfg, receiver, sender, link = pair
    blocks = sender_blocks(sender.tokenizer, cfg.agents.senders, [q for _, q in PROBLEMS])
    keys, values = prefill_kv(sender, blocks)
    P = sum(ids.shape[1] for ids, _ in blocks)
    assert keys.shape == (2, 2, 2, P, 8)  # sender: [Ls, B, Hs, P, ds]
    with torch.no_grad():
        k, v = link.transfer(blocks, keys, values)
        assert k.shape == v.shape == (3, 2, 1, P, 12)  # receiver: [Lr, B, Hr, P, dr]
        src = torch.cat([positions(m) for _, m in blocks], 1)
        moved = []  # the same blocks prefilled 7 positions later, with the sender positions said so
        for ids, mask in blocks:
            cache = sender.model.model(input_ids=ids, attention_mask=mask, position_ids=positions(mask) + 7).past_key_values
            moved.append(torch.stack([layer.keys for layer in cache.layers]))
        k7 = link.transform(torch.cat(moved, 3), values, rotary(sender, src + 7),
                            rotary(receiver, positions(torch.cat([m for _, m in blocks], 1))))[0]
        torch.testing.assert_close(k7, k, atol=1e-4, rtol=1e-4)
        dst = positions(torch.cat([m for _, m in blocks], 1))
        shifted = link.transfer(blocks, keys, values, dst=dst + 3)[0]
        torch.testing.assert_close(shifted, rotate(unrotate(k, rotary(receiver, dst)), rotary(receiver, dst + 3)),
                                   atol=1e-4, rtol=1e-4)
    n = sum(p.numel() for p in link.parameters())
    assert n == 2 * (3 * 2 + 3 * 16 * 12 + 3 * 12)  # layer mixes, head/width maps, biases (K and V)


def test_identity_transform_between_identical_models_is_a_longer_prompt(tiny_tokenizer):
    """Sender = receiver and the transformation set to the identity: the receiver's loss after the transferred
    cache equals reading [sender prompt, receiver prompt, solution] as one text (batched, left-padded blocks)."""
    from tflow.config import load_config
    from tflow.methods.base import row_nll
    from tflow.methods.kv_hetero import KVHeteroTrainee
    from tflow.methods.latent import left_pad
    from tflow.mix import receiver_prompt, sender_view
    from tflow.prompts import chat_text

    bb = make_backbone(tiny_tokenizer, init_range=0.3)
    cfg = load_config([], TINY_OVERRIDES + ["agents.senders=[strategist]", "data.max_solution_tokens=16"])
    link = KVHeteroTrainee(cfg, bb, bb)
    with torch.no_grad():
        link.transform.mix.copy_(torch.eye(2).expand(2, 2, 2) * 100.0)
    problems = _training_problems()
    problems[1].question = "How many clips did Natalia sell altogether in April and May? Think step by step."
    with torch.no_grad():
        out, labels = link.scored(problems, "aware")
        got = row_nll(out.logits, labels)
        tok = bb.tokenizer
        enc = lambda role, text: tok(chat_text(tok, role, text), add_special_tokens=False)["input_ids"]  # noqa: E731
        for i, p in enumerate(problems):
            sol = tok(p.solution, add_special_tokens=False)["input_ids"][:16] + [tok.eos_token_id]
            prompt = enc("strategist", sender_view(p)) + enc("solver", receiver_prompt(p))
            ids, _ = left_pad([prompt + sol], tok.pad_token_id)
            lab = torch.full_like(ids, -100)
            lab[0, len(prompt):] = torch.tensor(sol)
            want = row_nll(bb.model(input_ids=ids).logits, lab)
            assert got[1][i] == want[1][0] and got[0][i] == pytest.approx(want[0][0], rel=1e-4)


def test_reconstruction_starts_from_least_squares_and_decreases(pair):
    """Phase 1 (steps before kv.reconstruction_fraction x steps): step 0 fits the maps by ridge least squares
    (below the identity start), later steps lower the normalised MSE further; phase 2 is the CE."""
    cfg, receiver, sender, link = pair
    problems = _training_problems()
    assert link.reconstruction_steps == 2
    with torch.no_grad():
        start = link.loss(problems, 1)[0].item()  # the identity start (no fit at step 1)
    loss0, logs0 = link.loss(problems, 0)
    assert logs0["phase"] == 1 and loss0.item() < 0.7 * start
    opt = torch.optim.Adam(link.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        loss, _ = link.loss(problems, 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    ce, logs = link.loss(problems, 2)
    assert logs["phase"] == 2 and ce.requires_grad and logs["ce"] > 0


def test_context_aware_and_unaware_prompts():
    """aware: the task prompt; unaware: only its answer-format part (the problem text removed, for every task
    layout: question first, options, a code block)."""
    from tflow.methods.kv_hetero import answer_format
    from tflow.tasks import get_task
    from tflow.tasks.base import EvalProblem

    gsm = EvalProblem("g", "Tom has 3 apples. How many?", "3")
    assert answer_format(get_task("gsm8k").prompt(gsm), [gsm.sender_view, gsm.question]) == \
        "Solve step by step and put the final answer (a number) in \\boxed{}."
    mmlu = EvalProblem("m", "Which is largest?", "B", meta={"choices": ["1", "2", "3", "4"]})
    task = get_task("mmlu_redux")
    got = answer_format(task.prompt(mmlu), [task.sender_view(mmlu), mmlu.question])
    assert got.startswith("Answer with the letter") and "largest" not in got and "2" not in got.split("(B)")[0][:20]
    code = EvalProblem("c", "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n", "")
    got = answer_format(get_task("humanevalplus").prompt(code), [code.sender_view, code.question])
    assert "def add" not in got and "```python\n\n```" not in got and "python code block" in got
    with pytest.raises(ValueError, match="no problem text"):
        answer_format("Solve it.", ["Tom has 3 apples."])


def test_settings_and_accounting_of_an_answer(pair):
    """Every agent's tokens (sender prompts, receiver prompt and answer) and the transform phase; the unaware
    receiver reads fewer prompt tokens (no question) and answers differently from the aware one."""
    from tflow.methods.kv_hetero import KVHetero

    cfg, receiver, sender, link = pair
    outs = {}
    for ctx in ("aware", "unaware"):
        cfg.eval.kv_context = ctx
        outs[ctx] = KVHetero(cfg, link).answer(_eval_problems(), [f"{q}\n\nSolve step by step and put the final answer "
                                                                  "(a number) in \\boxed{}." for _, q in PROBLEMS])
    for a, u in zip(outs["aware"], outs["unaware"]):
        for o in (a, u):
            assert set(o.accounting.tokens) == {"sender:strategist", "sender:knowledge_extractor", "receiver"}
            assert o.accounting.tokens["sender:strategist"]["prompt"] > 0 == o.accounting.tokens["sender:strategist"]["generated"]
            assert set(o.accounting.seconds) == {"sender_prefill", "transform", "receiver_prefill", "decode"}
            assert o.accounting.processed_tokens == sum(t["prompt"] + t["generated"] for t in o.accounting.tokens.values())
        assert a.accounting.tokens["sender:strategist"] == u.accounting.tokens["sender:strategist"]
        assert a.accounting.tokens["receiver"]["prompt"] > u.accounting.tokens["receiver"]["prompt"]
    nll = KVHetero(cfg, link).reference_nll(_training_problems())
    assert len(nll) == 2 and all(s > 0 and n > 0 for s, n in nll)


def test_trains_with_the_shared_loop_and_evaluation_reads_it(tmp_path, tiny_tokenizer, data_dir):
    """python -m tflow.methods.kv_hetero's loop (train_module) with kv.sender a different model: trained.json,
    the log of both phases; evaluation loads it and refuses a folder trained for another sender."""
    from tflow.config import load_config
    from tflow.errors import CheckpointError
    from tflow.methods.kv_hetero import KVHetero, KVHeteroTrainee
    from tflow.methods.trainer import train_module

    for name, bb in (("receiver", qwen2_backbone(tiny_tokenizer)), ("sender", make_backbone(tiny_tokenizer))):
        bb.model.save_pretrained(tmp_path / name)
        tiny_tokenizer.save_pretrained(tmp_path / name)
    path = lambda name: ["source=path", f"name={tmp_path / name}", "dtype=float32"]  # noqa: E731
    ov = TINY_OVERRIDES + [f"model.receiver.{kv}" for kv in path("receiver")] + [f"kv.sender.{kv}" for kv in path("sender")] + [
        f"data.data_dir={data_dir}", "data.mix=[{source: gsm8k}]", "data.per_source_limit=20", "data.validation_size=2",
        "data.max_solution_tokens=16", "train.steps=2", "train.batch_size=2", "train.log_every=1", "train.warmup_steps=1",
        f"train.out_dir={tmp_path / 'kvh'}", f"model.cache_dir={tmp_path / 'cache'}"]
    cfg = load_config([], ov)
    out = train_module(cfg, "kv_hetero", KVHeteroTrainee, progress=False)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in log] == [1, 2] and "reconstruction" in log[0] and "ce" in log[1]
    info = json.loads((out / "trained.json").read_text())
    assert info["method"] == "kv_hetero" and info["trainable_parameters"] == 2 * (3 * 2 + 3 * 16 * 12 + 3 * 12)
    ev = load_config([], ov + ["eval.method=kv_hetero", f"eval.checkpoint={out}", "eval.max_new_tokens=3"])
    method, _ = KVHetero.build(ev)
    torch.testing.assert_close(method.link.transform.weight,
                               torch.load(out / "module" / "transform.pt", weights_only=True)["state"]["weight"])
    assert len(method.answer(_eval_problems(), [q for _, q in PROBLEMS])) == 2
    other = load_config([], ov + ["eval.method=kv_hetero", f"eval.checkpoint={out}", "kv.sender=null"])
    with pytest.raises(CheckpointError, match="maps sender"):
        KVHetero.build(other)


def test_config_keys_are_checked():
    from tflow.config import load_config
    from tflow.errors import ConfigError

    for bad, key in [("eval.kv_context=half", "eval.kv_context"), ("kv.train_context=both", "kv.train_context"),
                     ("kv.reconstruction_fraction=1.5", "kv.reconstruction_fraction"), ("kv.message_tokens=0", "kv.message_tokens")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config([], [bad])


@pytest.mark.slow
def test_real_qwen_pair_smoke():
    """Qwen2.5-Coder-0.5B-Instruct senders -> 1.5B receiver (offline assets): the transformation's size, one
    reconstruction and one generation step, an answer in both settings. Runs only where both assets are
    already converted (~1 min then); the test never converts them (minutes, 10 GB), so CI, without the
    asset packages, skips it."""
    from pathlib import Path

    from tflow.config import load_config
    from tflow.methods.kv_hetero import KVHetero, KVHeteroTrainee
    from tflow.models import load_backbones

    root = Path(__file__).resolve().parents[1]
    cfg = load_config([root / "config/run/cpu.yaml", root / "config/run/qwen_pair.yaml"],
                      ["model.threads=1", "train.steps=2", "data.max_solution_tokens=16", "eval.max_new_tokens=4"])
    for b in (cfg.model.receiver, cfg.model.sender):
        if not (Path(cfg.model.cache_dir).expanduser() / "models" / b.name / "tflow_asset.json").is_file():
            pytest.skip(f"offline asset {b.name} not converted (python -m tflow.methods.kv_hetero --config "
                        "config/run/cpu.yaml --config config/run/qwen_pair.yaml converts it, given its packages)")
    receiver, sender = load_backbones(cfg)
    link = KVHeteroTrainee(cfg, receiver, sender)
    assert sum(p.numel() for p in link.parameters()) == 2 * (28 * 24 + 28 * 128 * 256 + 28 * 256)  # 1,850,688
    problems = _training_problems()[:1]
    assert link.loss(problems, 0)[1]["reconstruction"] < 1.0
    ce, logs = link.loss(problems, 1)
    ce.backward()
    assert logs["phase"] == 2 and all(p.grad is not None for p in link.parameters())
    for ctx in ("aware", "unaware"):
        cfg.eval.kv_context = ctx
        out = KVHetero(cfg, link).answer(_eval_problems()[:1], ["What is 3 plus 4? Put the answer in \\boxed{}."])[0]
        assert out.generated_tokens > 0 and out.accounting.tokens["receiver"]["generated"] == out.generated_tokens
