"""Activation communication and KV-cache communication against their definitions (tiny models)."""
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


def test_kv_batched_layout_equals_each_row_alone(setup):
    """Senders' contexts + receiver prompt with padding in the middle == the row's full text, unpadded."""
    from tflow.methods.latent import KVCommunication
    from tflow.methods.base import decode_rows

    bb, cfg, problems = setup
    kv = KVCommunication(cfg, bb, bb)
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


def test_kv_refuses_heterogeneous_senders(setup, tiny_tokenizer):
    from tflow.methods.latent import KVCommunication
    from tflow.errors import ConfigError

    bb, cfg, _ = setup
    with pytest.raises(ConfigError, match="homogeneous"):
        KVCommunication(cfg, bb, make_backbone(tiny_tokenizer, seed=1))


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
