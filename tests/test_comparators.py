"""Activation communication and KV-cache communication (kv after the senders' messages, prompt-only kv_prompt)
against their definitions (tiny models)."""
import pytest
import torch

from conftest import TINY_OVERRIDES, make_backbone

PROBLEMS = [("a", "What is 3 plus 4?"), ("b", "Natalia sold clips to 48 of her friends in April, and then she sold half")]
PROMPTS = ["Compute 3 + 4 = ?", "How many clips did Natalia sell altogether in April and May? Think step by step."]


@pytest.fixture
def setup(tiny_tokenizer):
    from tflow.config import load_config
    from tflow.tasks.base import EvalProblem

    bb = make_backbone(tiny_tokenizer, init_range=0.5)
    cfg = load_config([], TINY_OVERRIDES + ["eval.max_new_tokens=8"])
    return bb, cfg, [EvalProblem(i, q, "") for i, q in PROBLEMS]


def test_kv_prompt_batched_layout_equals_each_row_alone(setup):
    """Senders' contexts + receiver prompt with padding in the middle == the row's full text, unpadded: the
    prompt-only variant is a longer prompt."""
    from tflow.methods.latent import KVPromptCommunication
    from tflow.methods.base import decode_rows

    bb, cfg, problems = setup
    kv = KVPromptCommunication(cfg, bb, bb)
    with torch.no_grad():
        outs = kv.answer(problems, PROMPTS)
        ids, mask, _, counts = kv.layout(problems, PROMPTS)
        for i, o in enumerate(outs):
            row = ids[i][mask[i].bool()].unsqueeze(0)
            ref = bb.model.generate(input_ids=row, attention_mask=torch.ones_like(row), max_new_tokens=8,
                                    do_sample=False, pad_token_id=bb.tokenizer.pad_token_id)
            assert o.text == decode_rows(bb.tokenizer, ref[:, row.shape[1]:])[0][0]
            assert {a: t["prompt"] for a, t in o.accounting.tokens.items()} == counts[i]
            assert sum(counts[i].values()) == row.shape[1]  # every context token is accounted once


def _chat_ids(tok, role, text):
    from tflow.prompts import chat_text

    return tok(chat_text(tok, role, text), add_special_tokens=False)["input_ids"]


def test_kv_sends_the_senders_messages_one_sender_equals_prompt_plus_message(setup):
    """With one sender, kv == the receiver reading [sender prompt, its message, receiver prompt] as one text
    (batched, left-padded, the last message token's KV included), and that differs from the prompt-only text:
    what the sender wrote reaches the receiver."""
    from tflow.config import load_config
    from tflow.methods.latent import KVCommunication

    bb, _, problems = setup
    cfg = load_config([], TINY_OVERRIDES + ["eval.max_new_tokens=6", "kv.message_tokens=5", "agents.senders=[strategist]"])
    kv = KVCommunication(cfg, bb, bb)
    outs = kv.answer(problems, PROMPTS)
    tok = bb.tokenizer
    for p, q, o in zip(problems, PROMPTS, outs):
        sender = _chat_ids(tok, "strategist", p.sender_view)
        with torch.no_grad():
            msg = bb.model.generate(input_ids=torch.tensor([sender]), max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                    pad_token_id=tok.pad_token_id)[0, len(sender):].tolist()
        receiver = _chat_ids(tok, "solver", q)
        full = torch.tensor([sender + msg + receiver])
        with torch.no_grad():
            ref = bb.model.generate(input_ids=full, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
            with_msg = bb.model(input_ids=full).logits[0, -1]
            without = bb.model(input_ids=torch.tensor([sender + receiver])).logits[0, -1]
        assert o.text == tok.decode(ref[0, full.shape[1]:], skip_special_tokens=True).split("<|im_end|>")[0]
        assert not torch.allclose(with_msg, without, atol=1e-3)  # the message changes the receiver's logits
        t = o.accounting.tokens
        assert t["sender:strategist"] == {"prompt": len(sender), "generated": 5}
        assert t["receiver"]["prompt"] == len(receiver)
        assert {"sender_prefill", "sender_decode", "transform", "receiver_prefill", "decode"} <= set(o.accounting.seconds)


def test_kv_moves_each_senders_keys_to_the_receivers_positions(setup):
    """Caches computed apart are joined by moving keys: rotary undone at the sender's positions and applied at
    the receiver's is an exact position shift; the receiver numbers the real tokens on across senders."""
    from tflow.methods.latent import positions, rotary, rotate, unrotate

    bb, _, _ = setup
    k = torch.randn(2, 2, 7, 8)  # [B, H, T, d]
    src = torch.arange(7).expand(2, 7)
    shifted = rotate(unrotate(rotate(k, rotary(bb, src)), rotary(bb, src)), rotary(bb, src + 5))
    torch.testing.assert_close(shifted, rotate(k, rotary(bb, src + 5)), atol=1e-5, rtol=1e-5)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert positions(torch.cat([mask, mask], 1)).tolist() == [[0, 0, 1, 2, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6, 7]]


def test_kv_two_senders_account_every_agent(setup):
    from tflow.config import load_config
    from tflow.methods.latent import KVCommunication

    bb, _, problems = setup
    cfg = load_config([], TINY_OVERRIDES + ["eval.max_new_tokens=4", "kv.message_tokens=3"])
    for o in KVCommunication(cfg, bb, bb).answer(problems, PROMPTS):
        t = o.accounting.tokens
        assert set(t) == {"receiver", "sender:strategist", "sender:knowledge_extractor"}
        assert t["sender:strategist"]["generated"] == t["sender:knowledge_extractor"]["generated"] == 3
        assert o.accounting.processed_tokens == sum(x["prompt"] + x["generated"] for x in t.values())


@pytest.mark.parametrize("name", ["kv", "kv_prompt"])
def test_kv_refuses_heterogeneous_senders(setup, tiny_tokenizer, name):
    from tflow.methods.latent import KVCommunication, KVPromptCommunication
    from tflow.errors import ConfigError

    bb, cfg, _ = setup
    cls = KVCommunication if name == "kv" else KVPromptCommunication
    with pytest.raises(ConfigError, match="homogeneous"):
        cls(cfg, bb, make_backbone(tiny_tokenizer, seed=1))


def test_ac_replaces_the_last_token_state_at_layer_j_during_prefill_only(setup):
    from tflow.methods.latent import ActivationCommunication, patch_last_token, resolve_layer
    from tflow.models import decoder_layers

    bb, cfg, problems = setup
    assert resolve_layer(None, 28) == 26 and resolve_layer(-1, 28) == 28
    layer = decoder_layers(bb.model)[0]
    x = torch.randn(2, 5, 32)
    state = torch.randn(2, 32)
    seen = []
    probe = decoder_layers(bb.model)[1].register_forward_pre_hook(
        lambda m, args, kw: seen.append(args[0] if args else kw["hidden_states"]), with_kwargs=True)
    try:
        with patch_last_token(layer, state, "replace"), torch.no_grad():
            bb.model(inputs_embeds=x)  # prefill: patched
            bb.model(inputs_embeds=x)  # a later call (decode step): untouched
    finally:
        probe.remove()
    torch.testing.assert_close(seen[0][:, -1], state)
    assert not torch.allclose(seen[1][:, -1], state)
    assert not decoder_layers(bb.model)[0]._forward_hooks  # removed

    ac = ActivationCommunication(cfg, bb, bb)
    outs = ac.answer(problems, PROMPTS)
    for o in outs:
        assert set(o.accounting.tokens) == {"receiver", "sender:strategist", "sender:knowledge_extractor"}
        assert o.accounting.processed_tokens == sum(t["prompt"] + t["generated"] for t in o.accounting.tokens.values())


@pytest.mark.parametrize("op", ["sum", "mean", "replace"])
def test_ac_ops_match_their_formulas(op):
    from tflow.methods.latent import patch_last_token

    lin = torch.nn.Identity()
    h = torch.randn(2, 3, 4)
    a = torch.randn(2, 4)
    with patch_last_token(lin, a, op):
        out = lin(h)
    want = {"sum": h[:, -1] + a, "mean": (h[:, -1] + a) / 2, "replace": a}[op]
    torch.testing.assert_close(out[:, -1], want)
    torch.testing.assert_close(out[:, :-1], h[:, :-1])
