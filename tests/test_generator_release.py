"""The released generator's architecture (tflow.generator_release): its parameter count at Qwen3-4B shapes
(the release reports ~64M), the tile layout of the generated factors, zero delta at initialisation, and
TFlow training through it."""
import torch

from conftest import TINY_OVERRIDES
from tflow.generator import ModuleSpec
from tflow.generator_release import ReleaseParameterGenerator, rotate, rotary_angles

QWEN3_4B = {"q_proj": (2560, 4096), "k_proj": (2560, 1024), "v_proj": (2560, 1024), "o_proj": (4096, 2560),
            "gate_proj": (2560, 9728), "up_proj": (2560, 9728), "down_proj": (9728, 2560)}


def _specs(dims, layers):
    return [ModuleSpec(f"layers.{i}.{p}", i, p, *dims[p]) for i in range(layers) for p in dims]


def test_parameter_count_at_qwen3_4b_matches_the_release():
    """63,964,672 in the release, of which cond_proj (1024^2 + 1024) is built but unused; ours omits it."""
    with torch.device("meta"):
        g = ReleaseParameterGenerator(_specs(QWEN3_4B, 36), 2560, 2, 4, width=1024, depth=2, heads=8, mlp_ratio=4,
                                      tile_size=256, accumulation=2)
    assert (g.tiles, g.tokens_per_layer) == (224, 448)
    assert sum(p.numel() for p in g.parameters()) == 63_964_672 - (1024 ** 2 + 1024)
    assert g.num_generated_values() == 36 * sum(4 * (a + b) for a, b in QWEN3_4B.values())


def test_tile_layout_row_major_chunks_and_zero_init():
    torch.manual_seed(0)
    dims = {"q_proj": (24, 40), "down_proj": (40, 24)}
    g = ReleaseParameterGenerator(_specs(dims, 2), 12, 2, 4, width=32, depth=1, heads=2, mlp_ratio=4, tile_size=16,
                                  accumulation=2, output_scale=1.0)
    pooled, mask = torch.randn(3, 2, 5, 12), torch.ones(3, 2, 5, dtype=torch.bool)
    factors, summary = g(pooled, mask)
    a, b = factors["layers.1.q_proj"]
    assert a.shape == (3, 2, 4, 24) and b.shape == (3, 2, 40, 4) and summary.shape == (3, 2, 32)
    assert torch.count_nonzero(b) == 0  # the B head starts at zero: delta-W = 0
    # B tiles: each head output is one tile row of 16 scalars of the row-major flattened B (d_out x r)
    with torch.no_grad():
        g.head_b.bias.copy_(torch.arange(16.0))
    b = g(pooled, mask)[0]["layers.0.down_proj"][1][0, 0]  # [24, 4]
    flat = b.reshape(-1)  # row-major: every 16-scalar chunk is one tile row (24 x 4 = 6 chunks)
    assert torch.equal(flat, torch.arange(16.0).repeat(6))
    # masked condition tokens change nothing
    pooled2 = pooled.clone()
    pooled2[:, :, -1] = 100.0
    mask2 = mask.clone()
    mask2[:, :, -1] = False
    out_a = g(pooled, mask2)[0]["layers.0.q_proj"][0]
    out_b = g(pooled2, mask2)[0]["layers.0.q_proj"][0]
    torch.testing.assert_close(out_a, out_b)


def test_rotary_is_a_rotation_of_adjacent_pairs():
    x = torch.randn(7, 8)
    ang = rotary_angles(torch.arange(7), 8)
    y = rotate(x, ang)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(rotate(x, torch.zeros_like(ang)), x)


def test_tflow_trains_through_the_release_variant(tiny_backbone):
    from tflow.agents import receiver_batch, sender_states
    from tflow.config import load_config
    from tflow.pipeline import build_tflow, delta_for

    cfg = load_config(overrides=TINY_OVERRIDES + ["generator.variant=release", "generator.sender_embedding=false",
                                                  "generator.mlp_ratio=4", "generator.heads=2"])
    tflow = build_tflow(cfg, tiny_backbone, tiny_backbone)
    qs = ["What is 3 plus 4?", "How many clips did Natalia sell?"]
    per = [[sender_states(tiny_backbone, r, [q], 64)[0][0] for r in cfg.agents.senders] for q in qs]
    batch = receiver_batch(tiny_backbone.tokenizer, "solver", qs)
    delta, sq = delta_for(tflow, tiny_backbone, per, batch)
    assert all(torch.count_nonzero(d.b) == 0 for d in delta.modules.values())  # untrained: delta-W = 0
    loss = sum(d.a.sum() for d in delta.modules.values()) + sum(v.sum() for v in sq.values())
    loss.backward()
    assert tflow.generator.head_a.weight.grad is not None and tflow.aggregator.logits.grad is not None
