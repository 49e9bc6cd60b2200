"""tflow.stats against scipy references and hand-worked values."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from tflow.stats import (bootstrap_ci, holm, mcnemar_exact, mean_std, paired_bootstrap_ci, per_seed, sign_flip_test,
                         summarize)

P = 200


@pytest.fixture(scope="module")
def vectors():
    rng = np.random.default_rng(123)
    a = (rng.random(P) < 0.6).astype(float)
    b = np.where(rng.random(P) < 0.9, a, 1 - a)  # correlated with a, so pairing matters
    return a, b


def test_mean_std():
    assert mean_std([0.5, 0.7, 0.9]) == pytest.approx((0.7, 0.2))
    m, s = mean_std([0.4])
    assert m == 0.4 and np.isnan(s)


def test_bootstrap_ci_matches_scipy(vectors):
    a, _ = vectors
    lo, hi = bootstrap_ci(a[None, :], n_boot=20_000, rng_seed=1)
    ref = sps.bootstrap((a,), np.mean, method="percentile", n_resamples=20_000, rng=2).confidence_interval
    assert lo == pytest.approx(ref.low, abs=0.01) and hi == pytest.approx(ref.high, abs=0.01)
    assert lo < a.mean() < hi


def test_bootstrap_ci_resamples_problems_with_seed_mean():
    rng = np.random.default_rng(5)
    x = (rng.random((3, P)) < 0.4).astype(float)
    lo, hi = bootstrap_ci(x, n_boot=20_000, rng_seed=3)
    ref = sps.bootstrap((x.mean(axis=0),), np.mean, method="percentile", n_resamples=20_000,
                        rng=4).confidence_interval
    assert lo == pytest.approx(ref.low, abs=0.01) and hi == pytest.approx(ref.high, abs=0.01)
    lo90, hi90 = bootstrap_ci(x, n_boot=20_000, level=0.90, rng_seed=3)
    assert lo < lo90 < hi90 < hi


def test_paired_bootstrap_ci_matches_scipy(vectors):
    a, b = vectors
    lo, hi = paired_bootstrap_ci(a[None, :], b[None, :], n_boot=20_000, rng_seed=1)
    ref = sps.bootstrap((a, b), lambda x, y, axis: x.mean(axis=axis) - y.mean(axis=axis), paired=True,
                        vectorized=True, method="percentile", n_resamples=20_000, rng=2).confidence_interval
    assert lo == pytest.approx(ref.low, abs=0.01) and hi == pytest.approx(ref.high, abs=0.01)
    unpaired = sps.bootstrap((a, b), lambda x, y, axis: x.mean(axis=axis) - y.mean(axis=axis),
                             vectorized=True, method="percentile", n_resamples=20_000, rng=2).confidence_interval
    assert (hi - lo) < 0.8 * (unpaired.high - unpaired.low)  # pairing narrows the interval here
    with pytest.raises(ValueError):
        paired_bootstrap_ci(a[None, :], b[None, :-1])


def test_mcnemar_exact():
    a = np.array([1] * 10 + [0] * 3 + [1] * 20 + [0] * 7, dtype=bool)
    b = np.array([0] * 10 + [1] * 3 + [1] * 20 + [0] * 7, dtype=bool)
    p = mcnemar_exact(a, b)
    assert p == pytest.approx(sps.binomtest(10, 13, 0.5).pvalue, rel=1e-12)
    assert p == pytest.approx(756 / 8192, rel=1e-12)  # 2 * (C(13,10)+C(13,11)+C(13,12)+C(13,13)) / 2**13
    assert mcnemar_exact(b, a) == pytest.approx(p)
    assert mcnemar_exact(a, a) == 1.0
    assert mcnemar_exact(np.zeros(5, bool), np.zeros(5, bool)) == 1.0


def _explicit_sign_flip(d: np.ndarray) -> float:
    obs = abs(d.mean())
    null = [abs(np.mean(np.array(s) * d)) for s in itertools.product([-1, 1], repeat=d.size)]
    return float(np.mean(np.array(null) >= obs - 1e-12))


def test_sign_flip_exact_matches_scipy_and_enumeration():
    d = np.array([1, 2 / 3, 1 / 3, 0, 1, -1 / 3, 0, 2 / 3, 1, -2 / 3])
    p = sign_flip_test(d)
    ref = sps.permutation_test((d,), lambda x, axis: np.mean(x, axis=axis), permutation_type="samples",
                               vectorized=True, n_resamples=np.inf, alternative="two-sided").pvalue
    assert p == pytest.approx(ref, rel=1e-12)
    assert p == pytest.approx(_explicit_sign_flip(d), rel=1e-12)
    assert 0.05 < p < 0.2  # 32 of the 2**8 sign patterns of the 8 non-zero differences
    assert sign_flip_test(np.concatenate([d, np.zeros(15)])) == pytest.approx(p, rel=1e-12)
    assert sign_flip_test(-d) == pytest.approx(p, rel=1e-12)
    assert sign_flip_test(np.zeros(8)) == 1.0
    assert sign_flip_test(np.array([1.0, -1.0])) == 1.0


def test_sign_flip_monte_carlo():
    rng = np.random.default_rng(7)
    d = rng.choice([-1.0, -0.5, 0.0, 0.5, 1.0], size=60, p=[0.2, 0.15, 0.2, 0.2, 0.25])
    p = sign_flip_test(d, n_perm=20_000, rng_seed=1)
    ref = sps.permutation_test((d,), lambda x, axis: np.mean(x, axis=axis), permutation_type="samples",
                               vectorized=True, n_resamples=20_000, alternative="two-sided", rng=2).pvalue
    assert 0.01 < ref < 0.9
    assert p == pytest.approx(ref, abs=0.02)
    # (count + 1) / (n_perm + 1): never zero, even when no random flip reaches the observed sum
    assert sign_flip_test(np.ones(60), n_perm=999) == pytest.approx(1 / 1000)


def test_holm_hand_worked():
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.4, 0.9, 0.7]), [1.0, 1.0, 1.0])
    out = holm([0.01, np.nan, 0.04])
    assert np.isnan(out[1])
    np.testing.assert_allclose(out[[0, 2]], [0.02, 0.04])
    assert np.isnan(holm([np.nan, np.nan])).all()


def test_holm_monotone():
    p = np.random.default_rng(0).random(25) ** 3
    adj = holm(p)
    order = np.argsort(p)
    assert np.all(np.diff(adj[order]) >= 0)
    assert np.all(adj >= p) and np.all(adj <= 1)


# --- summarize / per_seed on a synthetic records frame --------------------------------------------

SEEDS, N = [0, 1, 2], 30
CELLS = {"main": ["default"], "ablation": ["rank~4", "rank~8"]}


def _records() -> tuple[pd.DataFrame, dict]:
    rng = np.random.default_rng(11)
    rows, truth = [], {}
    for family, cells in CELLS.items():
        for task in ["gsm8k", "mbpp"]:
            for cell in cells:
                for seed in SEEDS:
                    base = rng.random(N) < 0.4
                    outcomes = {"base": base, "good": base | (rng.random(N) < 0.9), "same": rng.random(N) < 0.4}
                    for method, corr in outcomes.items():
                        truth[(family, task, method, cell, seed)] = corr
                        for i in range(N):
                            rows.append(dict(family=family, task=task, method=method, cell=cell, seed=seed,
                                             task_id=f"{task}/{i}", correct=bool(corr[i]),
                                             processed_tokens=100 + i + 10 * seed, seconds=0.1 * (i + 1),
                                             s_decode=0.05 if i % 2 else np.nan, base_correct=bool(i % 3 == 0)))
    return pd.DataFrame(rows), truth


@pytest.fixture(scope="module")
def records():
    return _records()


@pytest.fixture(scope="module")
def summary(records):
    return summarize(records[0], {"main": "base", "ablation": "base"}, n_boot=2000, n_perm=2000)


def test_summarize_accuracy(records, summary):
    _, truth = records
    assert len(summary) == 2 * 3 + 2 * 3 * 2
    for _, row in summary.iterrows():
        accs = [truth[(row.family, row.task, row.method, row.cell, s)].mean() for s in SEEDS]
        assert row.score_mean == pytest.approx(np.mean(accs)) and row.metric == "accuracy"
        assert row.score_std == pytest.approx(np.std(accs, ddof=1))
        assert row.score_ci_low <= row.score_mean <= row.score_ci_high
        assert (row.n_problems, row.n_seeds) == (N, 3)
        assert row.tokens_mean == pytest.approx(np.mean([100 + i + 10 * s for i in range(N) for s in SEEDS]))
        assert row.seconds_mean == pytest.approx(0.1 * np.mean(np.arange(1, N + 1)))
        assert row.s_decode_mean == pytest.approx(0.05)
        assert row.base_correct_mean == pytest.approx(np.mean(np.arange(N) % 3 == 0))


def test_summarize_comparison(records, summary):
    _, truth = records
    base_rows = summary[summary.method == "base"]
    assert base_rows[["delta", "delta_ci_low", "p_perm", "p_holm", "p_mcnemar_max"]].isna().all().all()
    other = summary[summary.method != "base"]
    assert other[["delta", "p_perm", "p_holm"]].notna().all().all()
    assert (other.p_holm >= other.p_perm - 1e-15).all() and (other.p_holm <= 1).all()
    for _, row in other.iterrows():
        base_acc = np.mean([truth[(row.family, row.task, "base", row.cell, s)].mean() for s in SEEDS])
        assert row.delta == pytest.approx(row.score_mean - base_acc)
        assert row.delta_ci_low <= row.delta <= row.delta_ci_high
        assert len(row.p_mcnemar.split(";")) == 3 and row.n_paired_problems == N
    good = other[other.method == "good"]
    assert (good.p_perm < 0.001).all() and (good.delta_ci_low > 0).all() and (good.p_mcnemar_max < 0.01).all()


def test_summarize_holm_per_family(summary):
    pooled = holm(summary.loc[summary.method != "base", "p_perm"].to_numpy())
    pooled = pd.Series(pooled, index=summary.index[summary.method != "base"])
    for family in CELLS:
        sub = summary[(summary.family == family) & (summary.method != "base")]
        np.testing.assert_allclose(sub.p_holm.to_numpy(), holm(sub.p_perm.to_numpy()))
    assert not np.allclose(summary.loc[pooled.index, "p_holm"], pooled)  # not pooled across families


def test_summarize_aligns_on_intersection(records):
    df = records[0]
    keep = ~((df.method == "base") & df.task_id.isin(["gsm8k/0", "gsm8k/1"])) & (df.family == "main")
    out = summarize(df[keep], "base", n_boot=200, n_perm=200)
    row = out[(out.task == "gsm8k") & (out.method == "good")].iloc[0]
    assert row.n_problems == N and row.n_paired_problems == N - 2
    other_seeds = df[(df.family == "main") & ~((df.method == "base") & (df.seed == 0))
                     & ~((df.method == "good") & (df.seed != 0))]  # pairs on problems, each side over its seeds
    row = summarize(other_seeds, "base", n_boot=200, n_perm=200).query("task == 'mbpp' and method == 'good'").iloc[0]
    assert row.n_paired_problems == N and row.p_mcnemar == ""
    no_overlap = df[(df.family == "main") & ~((df.method == "base") & (df.task == "mbpp") & (df.task_id < "mbpp/5"))
                    & ~((df.method == "good") & (df.task == "mbpp") & (df.task_id >= "mbpp/5"))]
    with pytest.raises(ValueError, match="shares no"):
        summarize(no_overlap, "base", n_boot=200, n_perm=200)


def test_summarize_errors(records):
    df = records[0]
    with pytest.raises(ValueError, match="'control'"):
        summarize(df, "control")
    with pytest.raises(ValueError, match="task_id"):
        summarize(df.drop(columns="task_id"), "base")
    with pytest.raises(ValueError, match="outcome"):
        summarize(df.drop(columns="correct"), "base")
    with pytest.raises(ValueError, match="ablation"):
        summarize(df, {"main": "base"})
    with pytest.raises(ValueError, match="duplicate"):
        summarize(pd.concat([df, df.iloc[:1]]), "base")


def test_per_seed(records):
    df, truth = records
    ps = per_seed(df)
    assert len(ps) == (2 * 3 + 2 * 3 * 2) * 3
    assert list(ps.columns) == ["family", "task", "method", "cell", "seed", "metric", "n_problems", "score",
                                "tokens_mean", "seconds_mean"]
    for _, row in ps.sample(10, random_state=0).iterrows():
        assert row.score == pytest.approx(truth[(row.family, row.task, row.method, row.cell, row.seed)].mean())
        assert row.tokens_mean == pytest.approx(100 + 14.5 + 10 * row.seed)


def test_summarize_cell_baseline(records):
    """Ablation families compare each cell of a method against the main cell of the same method."""
    df, truth = records
    abl = df[df.family == "ablation"]
    out = summarize(abl, {"ablation": {"cell": "rank~4"}}, n_boot=500, n_perm=500)
    assert len(out) == 2 * 3 * 2
    assert (out.baseline == "rank~4").all()
    np.testing.assert_array_equal(out.is_baseline, out.cell == "rank~4")
    ref = out[out.is_baseline]
    assert ref[["delta", "p_perm", "p_holm"]].isna().all().all()
    other = out[~out.is_baseline]
    assert other[["delta", "p_perm", "p_holm"]].notna().all().all()
    for _, row in other.iterrows():  # rank~8 vs rank~4 for the same method, paired on problems
        a = np.mean([truth[("ablation", row.task, row.method, "rank~8", s)].mean() for s in SEEDS])
        b = np.mean([truth[("ablation", row.task, row.method, "rank~4", s)].mean() for s in SEEDS])
        assert row.delta == pytest.approx(a - b)
    np.testing.assert_allclose(other.p_holm, holm(other.p_perm.to_numpy()))
    with pytest.raises(ValueError, match="rank~16"):
        summarize(abl, {"ablation": {"cell": "rank~16"}}, n_boot=100, n_perm=100)
    with pytest.raises(ValueError, match="method name or"):
        summarize(abl, {"ablation": {"method": "base"}}, n_boot=100, n_perm=100)


# --- training seeds, held-out CE, power, non-inferiority, verdicts ----------------------------------

def test_two_level_bootstrap_widens_the_ci_when_seeds_disagree():
    """A trained method's seeds are a second source of variation: resampling them widens its CI when the
    seeds disagree, and changes nothing when they agree."""
    from tflow.stats import two_level_means

    rng = np.random.default_rng(0)
    base = rng.random(40) < 0.5
    x = np.stack([base, base, base]).astype(float)  # identical seeds
    y = np.stack([base & (rng.random(40) < 0.3), base | (rng.random(40) < 0.7), base]).astype(float)
    for m, wider in ((x, False), (y, True)):
        two = two_level_means(m, 4000, np.random.default_rng(1), resample_seeds=True)
        one = two_level_means(m, 4000, np.random.default_rng(1), resample_seeds=False)
        assert bool(np.std(two) > 1.2 * np.std(one)) is wider
        assert np.mean(two) == pytest.approx(m.mean(), abs=0.02)


def test_min_p_and_testable():
    from tflow.stats import min_p

    assert min_p(4) == 0.125 and min_p(10) == pytest.approx(2 ** -9) and min_p(30, 10_000) == pytest.approx(1 / 10_001)
    rows = []
    for n in (4, 12):  # 4 problems: no test can reject; 12: it can
        for i in range(n):
            for method, c in (("base", False), ("good", True)):
                rows.append(dict(family=f"f{n}", task="t", method=method, cell="none", seed=0, task_id=f"t/{i}",
                                 correct=c, processed_tokens=1, seconds=1.0))
    out = summarize(pd.DataFrame(rows), "base", n_boot=500, n_perm=10_000).set_index("family")
    assert out.loc["f4"].query("method == 'good'").p_min.iloc[0] == 0.125
    assert not out.loc["f4"].query("method == 'good'").testable.iloc[0]
    assert out.loc["f4"].query("method == 'good'").verdict.iloc[0] == "not distinguishable"  # all 4 better: p = 0.125
    assert out.loc["f12"].query("method == 'good'").testable.iloc[0]
    assert out.loc["f12"].query("method == 'good'").verdict.iloc[0] == "higher"


def test_heldout_ce_records_untrained_baseline_with_one_seed_and_noninferiority():
    """CE outcomes (lower is better); a trained method with 3 seeds against an untrained baseline run once
    (greedy runs): paired on problems, not seeds; non-inferiority by the margin in CE's direction."""
    rng = np.random.default_rng(3)
    rows = []
    ce_base = 1.0 + 0.1 * rng.random(60)
    for i in range(60):
        rows.append(dict(family="h", task="t", method="base", cell="none", seed=0, task_id=f"t/{i}", ce=ce_base[i],
                         trained=False))
        for s in range(3):
            rows.append(dict(family="h", task="t", method="better", cell="main", seed=s, task_id=f"t/{i}",
                             ce=ce_base[i] - 0.2 + 0.01 * s, trained=True))
            rows.append(dict(family="h", task="t", method="close", cell="main", seed=s, task_id=f"t/{i}",
                             ce=ce_base[i] + 0.01 * (s - 1) + 0.002 * rng.standard_normal(), trained=True))
    out = summarize(pd.DataFrame(rows), "base", n_boot=2000, n_perm=2000, margin=0.05).set_index("method")
    assert (out.metric == "ce").all() and out.loc["better", "n_seeds"] == 3 and out.loc["base", "n_seeds"] == 1
    assert out.loc["better", "delta"] == pytest.approx(-0.19, abs=1e-9) and out.loc["better", "verdict"] == "lower"
    assert out.loc["better", "delta_ci_high"] < 0 and out.loc["better", "noninferior"]
    assert out.loc["close", "verdict"] == "not distinguishable" and out.loc["close", "noninferior"]
    assert out.loc["better", "p_mcnemar"] == ""  # seeds differ: no per-seed McNemar
