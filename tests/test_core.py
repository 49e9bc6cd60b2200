"""Core mechanics on tiny random models: identity at init, hooks, per-row deltas, fusion formulas."""
import pytest
import torch

from tflow.agents import ConditionCache, Conditions, question_span, receiver_batch, sender_states
from tflow.config import load_config
from tflow.fusion import fuse
from tflow.lora import TransientLoRA, active_transient_count
from tflow.models import target_linears
from tflow.registry import FUSIONS
from tflow.pipeline import build_tflow, delta_for, delta_sq_norms
from tflow_kernels import lora_delta_max, lora_delta_sum

from conftest import TINY_OVERRIDES

QUESTIONS = ["How many clips did Natalia sell in April and May?", "Compute 3 + 4 and say the answer."]


def _conds(bb, cfg, questions=QUESTIONS):
    per = [[sender_states(bb, r, [q], 64)[0][0] for r in cfg.agents.senders] for q in questions]
    return per


def _randomise_b_heads(tflow, std=0.5, seed=1):
    g = torch.Generator().manual_seed(seed)
    for name, head in tflow.generator.heads.items():
        if name.endswith("_B"):
            head.weight.data = torch.randn(head.weight.shape, generator=g) * std


def test_question_span_covers_exactly_the_question(tiny_tokenizer):
    q = QUESTIONS[0]
    sp = question_span(tiny_tokenizer, "strategist", q, 64)
    assert tiny_tokenizer.decode(sp.input_ids[sp.start:sp.end]).strip() == q
    short = question_span(tiny_tokenizer, "strategist", q, 3)
    assert short.truncated and short.end - short.start == 3


@pytest.mark.parametrize("fusion", sorted(FUSIONS))
def test_untrained_generator_is_exactly_the_identity(tiny_backbone, fusion):
    cfg = load_config(overrides=TINY_OVERRIDES + [f"fusion.name={fusion}"])
    tflow = build_tflow(cfg, tiny_backbone, tiny_backbone)
    batch = receiver_batch(tiny_backbone.tokenizer, "solver", QUESTIONS)
    delta, _ = delta_for(tflow, tiny_backbone, _conds(tiny_backbone, cfg), batch)
    linears = target_linears(tiny_backbone.model, list(cfg.lora.targets))
    with torch.no_grad():
        base = tiny_backbone.model(**batch).logits
        with TransientLoRA(linears, delta):
            adapted = tiny_backbone.model(**batch).logits
    assert torch.equal(base, adapted)


def test_trained_delta_changes_logits_and_wrappers_are_removed(tiny_backbone, tiny_cfg):
    tflow = build_tflow(tiny_cfg, tiny_backbone, tiny_backbone)
    _randomise_b_heads(tflow)
    batch = receiver_batch(tiny_backbone.tokenizer, "solver", QUESTIONS)
    delta, _ = delta_for(tflow, tiny_backbone, _conds(tiny_backbone, tiny_cfg), batch)
    linears = target_linears(tiny_backbone.model, list(tiny_cfg.lora.targets))
    q_proj = tiny_backbone.model.model.layers[0].self_attn.q_proj
    calls = []
    other = q_proj.register_forward_hook(lambda m, a, out: calls.append(out.clone()))  # a foreign hook
    foreign = linears[sorted(linears)[-1]]
    foreign.forward = foreign.forward  # a foreign instance-level forward (as accelerate sets)
    foreign_fwd = foreign.__dict__["forward"]
    with torch.no_grad():
        base = tiny_backbone.model(**batch).logits
        with TransientLoRA(linears, delta) as t:
            assert active_transient_count(linears) == len(linears) == len(t.patched)
            adapted = tiny_backbone.model(**batch).logits
        assert active_transient_count(linears) == 0
        assert "forward" not in q_proj.__dict__ and foreign.__dict__["forward"] is foreign_fwd  # restored as found
        assert len(q_proj._forward_hooks) == 1  # the foreign hook is left, and it saw the adapted output
        after = tiny_backbone.model(**batch).logits
    assert (adapted - base).abs().max() > 1e-3
    assert not torch.equal(calls[0], calls[1]) and torch.equal(calls[0], calls[2])
    assert torch.equal(base, after)  # nothing was merged into the weights
    other.remove()
    del foreign.forward


@pytest.mark.parametrize("backend", ["torch", "cpu_fused"])
def test_wrappers_removed_after_exception(tiny_backbone, tiny_cfg, backend):
    tflow = build_tflow(tiny_cfg, tiny_backbone, tiny_backbone)
    batch = receiver_batch(tiny_backbone.tokenizer, "solver", QUESTIONS)
    delta, _ = delta_for(tflow, tiny_backbone, _conds(tiny_backbone, tiny_cfg), batch)
    linears = target_linears(tiny_backbone.model, list(tiny_cfg.lora.targets))
    with pytest.raises(RuntimeError, match="batch"):
        with torch.no_grad(), TransientLoRA(linears, delta, backend=backend):
            tiny_backbone.model(input_ids=batch["input_ids"][:1])  # wrong batch size -> error in a hook
    assert active_transient_count(linears) == 0 and not any("forward" in m.__dict__ for m in linears.values())


def test_per_row_deltas_equal_a_per_example_loop(tiny_backbone, tiny_cfg):
    """A batch of two questions, each with its own delta, gives the same logits (at real tokens)
    as running each question alone with its own delta."""
    tflow = build_tflow(tiny_cfg, tiny_backbone, tiny_backbone)
    _randomise_b_heads(tflow)
    per = _conds(tiny_backbone, tiny_cfg)
    linears = target_linears(tiny_backbone.model, list(tiny_cfg.lora.targets))
    batch = receiver_batch(tiny_backbone.tokenizer, "solver", QUESTIONS, padding_side="right")
    delta, _ = delta_for(tflow, tiny_backbone, per, batch)
    with torch.no_grad(), TransientLoRA(linears, delta):
        batched = tiny_backbone.model(**batch).logits
    assert not torch.allclose(batched[0, :5], batched[1, :5])
    for i, q in enumerate(QUESTIONS):
        single = receiver_batch(tiny_backbone.tokenizer, "solver", [q])
        d1, _ = delta_for(tflow, tiny_backbone, [per[i]], single)
        with torch.no_grad(), TransientLoRA(linears, d1):
            alone = tiny_backbone.model(**single).logits[0]
        n = int(single["attention_mask"].sum())
        torch.testing.assert_close(batched[i, :n], alone[:n], rtol=1e-4, atol=1e-5)


def _random_factors(B=3, S=2, r=4, d_in=12, d_out=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"m": (torch.randn(B, S, r, d_in, generator=g), torch.randn(B, S, d_out, r, generator=g))}


@pytest.mark.parametrize("name", ["mean", "attention", "max"])
def test_fusion_operators_match_their_formulas(name):
    B, S, T, scale = 3, 2, 5, 2.0
    factors = _random_factors(B, S)
    a, b = factors["m"]
    x = torch.randn(B, T, 12)
    summary, receiver = torch.randn(B, S, 16), torch.randn(B, 24)
    fusion = FUSIONS.load(name)(16, 24, 8)
    if name == "attention":  # leave the uniform initialisation so the weights depend on the input
        torch.nn.init.normal_(fusion.query.weight)
    delta = fuse(factors, fusion, summary, receiver, scale)
    per_sender = torch.stack([scale * (x @ a[:, s].transpose(1, 2)) @ b[:, s].transpose(1, 2) for s in range(S)], 1)
    if name == "max":
        want = per_sender.amax(1)
        got = lora_delta_max(x, delta.modules["m"].a.transpose(-1, -2), delta.modules["m"].b.transpose(-1, -2))
    else:
        w = torch.full((B, S), 1 / S) if name == "mean" else fusion.sender_weights(summary, receiver)
        if name == "attention":
            assert torch.allclose(w.sum(1), torch.ones(B)) and not torch.allclose(w, torch.full((B, S), 0.5))
        want = (w[:, :, None, None] * per_sender).sum(1)  # sum_s w_s * scale * x A_s^T B_s^T
        m = delta.modules["m"]
        assert m.a.shape == (B, S * 4, 12) and m.b.shape == (B, 10, S * 4)  # one LoRA of rank S*r
        got = lora_delta_sum(x, m.a.transpose(1, 2), m.b.transpose(1, 2))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_attention_fusion_starts_as_mean():
    fusion = FUSIONS.load("attention")(16, 24, 8)
    w = fusion.sender_weights(torch.randn(4, 3, 16), torch.randn(4, 24))
    torch.testing.assert_close(w, torch.full((4, 3), 1 / 3))


def test_delta_norms_match_the_dense_product():
    a, b = _random_factors()["m"]
    sq = delta_sq_norms({"m": (a, b)}, 2.0)["m"]
    dense = torch.linalg.matrix_norm(2.0 * b @ a) ** 2  # [B, S]
    torch.testing.assert_close(sq, dense, rtol=1e-5, atol=1e-5)


def test_condition_cache_reuses_stored_states(tiny_backbone, tmp_path):
    cache = ConditionCache(tmp_path, tiny_backbone, 64)
    first = cache.get(tiny_backbone, "strategist", QUESTIONS)
    again = cache.get(None, "strategist", QUESTIONS)  # no sender needed: all cached
    for x, y in zip(first, again):
        assert torch.equal(x, y) and x.shape[0] == tiny_backbone.num_layers + 1
    with pytest.raises(FileNotFoundError):
        cache.get(None, "strategist", ["a question never seen"])


def test_collate_pads_and_masks():
    xs = [[torch.ones(3, 2, 4), torch.ones(3, 5, 4)], [torch.ones(3, 1, 4), torch.ones(3, 1, 4)]]
    c = Conditions.collate(xs)
    assert c.states.shape == (2, 2, 3, 5, 4)
    assert c.mask.sum().item() == 2 + 5 + 1 + 1
