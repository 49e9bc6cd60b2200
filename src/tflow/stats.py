"""Statistics of the paper tables, computed from per-problem outcomes.

The unit of analysis is the per-problem outcome of one seed: `correct` (accuracy families) or `ce`, the
receiver's teacher-forced cross-entropy on a reference solution (the held-out family; lower is better).
Choices:

* Spread over seeds: mean and sample std (ddof=1) of the per-seed scores; the std is NaN for one seed.
* Confidence intervals (95%, percentile bootstrap). Problems are always resampled (the columns of a
  [seeds, problems] matrix). For a method that trains (a generator or its own module; records column
  `trained`) the seeds are training seeds, a second source of variation: they are resampled too (a
  two-level bootstrap, seeds x problems). Differences use the paired bootstrap: the same resampled
  problems for a method and its baseline, each side's seeds resampled when it trains.
* Tests against the baseline: a two-sided sign-flip permutation test over problems on the per-problem
  differences (each side averaged over its own seeds). Its smallest reachable p-value with n paired
  problems is 2/2**n (`p_min`; 4 problems: 0.125), and Holm over m comparisons multiplies the smallest
  by m: a family whose m * p_min is not below alpha cannot reject anything (`testable`). A Wilcoxon
  test over 5 seed-level accuracies could not reject anything at 0.05 either (its smallest two-sided p
  is 0.0625). Where a method and its baseline share seeds, the exact McNemar test per seed is reported
  too (accuracy).
* Non-inferiority ("competitive with"): one-sided bootstrap p-value that the difference is worse than
  the margin (accuracy: delta <= -margin; CE: delta >= +margin), Holm-corrected like the tests.
* Verdict: "higher" / "lower" (the score's direction: for CE, lower is better) when p_Holm < alpha, else
  "not distinguishable"; `noninferior` when the non-inferiority p_Holm < alpha.
* Multiplicity: Holm step-down over the non-baseline rows of one table/figure family (a family is one
  claim being tested, e.g. "ablation_rank"); families are not pooled, being separate questions.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import binomtest

from tflow.accounting import PHASES

REQUIRED_COLUMNS = ("family", "task", "method", "cell", "seed", "task_id")
PHASE_COLUMNS = tuple(f"s_{phase}" for phase in PHASES)  # per-problem seconds of each phase (tflow.accounting)
GROUP_KEYS = ["family", "task", "method", "cell"]
LOWER_IS_BETTER = {"ce"}
_CHUNK = 2048


def mean_std(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and sample std (ddof=1) of per-seed values; std is NaN with fewer than two values."""
    x = np.asarray(values, dtype=float).ravel()
    if x.size == 0:
        return float("nan"), float("nan")
    std = float(x.std(ddof=1)) if x.size > 1 else float("nan")
    return float(x.mean()), std


def _problem_means(x: np.ndarray) -> np.ndarray:
    """[seeds, problems] (or [problems]) -> per-problem mean over the seeds present (NaN = missing)."""
    x = np.asarray(x, dtype=float)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"expected a non-empty [seeds, problems] array, got shape {x.shape}")
    with np.errstate(all="ignore"):
        return np.nanmean(x, axis=0)


def _bootstrap_means(m: np.ndarray, n_boot: int, rng_seed: int) -> np.ndarray:
    """Means of n_boot resamples (with replacement) of the per-problem values ``m``."""
    rng = np.random.default_rng(rng_seed)
    out = np.empty(n_boot)
    for start in range(0, n_boot, _CHUNK):
        k = min(_CHUNK, n_boot - start)
        out[start:start + k] = m[rng.integers(0, m.size, size=(k, m.size))].mean(axis=1)
    return out


def _percentile(stats: np.ndarray, level: float) -> tuple[float, float]:
    alpha = 1.0 - level
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def bootstrap_ci(correct: np.ndarray, n_boot: int = 10_000, level: float = 0.95,
                 rng_seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean over seeds and problems, resampling problems (columns)."""
    return _percentile(_bootstrap_means(_problem_means(correct), n_boot, rng_seed), level)


def paired_bootstrap_ci(a: np.ndarray, b: np.ndarray, n_boot: int = 10_000, level: float = 0.95,
                        rng_seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of mean(a) - mean(b); a and b are [seeds, problems] on the same problems,
    and every resample uses the same problem indices for both."""
    ma, mb = _problem_means(a), _problem_means(b)
    if ma.shape != mb.shape:
        raise ValueError(f"a and b must cover the same problems, got {ma.size} and {mb.size}")
    return _percentile(_bootstrap_means(ma - mb, n_boot, rng_seed), level)


def median_ci(values: Sequence[float], level: float = 0.95, n_boot: int = 2000,
              rng_seed: int = 0) -> tuple[float, float, float]:
    """Median and its percentile-bootstrap CI (scipy), e.g. of paired timing ratios in the benchmarks."""
    from scipy.stats import bootstrap

    res = bootstrap((list(values),), np.median, n_resamples=n_boot, confidence_level=level, method="percentile",
                    random_state=rng_seed, vectorized=False)
    return float(np.median(values)), float(res.confidence_interval.low), float(res.confidence_interval.high)


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> float:
    """Exact two-sided McNemar p-value: binomial test (p=0.5) on the discordant pairs; 1.0 if none."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"a and b must be aligned, got shapes {a.shape} and {b.shape}")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5, alternative="two-sided").pvalue)


def sign_flip_test(diffs: np.ndarray, n_perm: int = 10_000, rng_seed: int = 0) -> float:
    """Two-sided sign-flip permutation test of mean(diffs) = 0; p = P(|sum(s*d)| >= |sum(d)|).

    Zero differences are dropped first: flipping a zero changes nothing, so the exact p-value is the
    same with or without them (and scipy.stats.permutation_test gives the same value); dropping them
    only makes exact enumeration reachable for more inputs. With n non-zero differences the test is
    exact (all 2**n sign vectors) when 2**n <= n_perm, else Monte Carlo with n_perm random sign vectors
    and p = (count + 1) / (n_perm + 1), which is never 0. All differences zero gives p = 1.
    """
    d = np.asarray(diffs, dtype=float).ravel()
    if np.isnan(d).any():
        raise ValueError("diffs contains NaN")
    d = d[d != 0]
    if d.size == 0:
        return 1.0
    observed = abs(d.sum())
    tol = 1e-9 * np.abs(d).sum()  # sums of multiples of 1/seeds: absorb float rounding only
    if 2.0 ** d.size <= n_perm:
        total, count = 2 ** d.size, 0
        bits = np.arange(d.size)
        for start in range(0, total, _CHUNK):
            codes = np.arange(start, min(start + _CHUNK, total))[:, None]
            signs = 1.0 - 2.0 * ((codes >> bits) & 1)
            count += int(np.sum(np.abs(signs @ d) >= observed - tol))
        return count / total
    rng = np.random.default_rng(rng_seed)
    count = 0
    for start in range(0, n_perm, _CHUNK):
        signs = rng.choice(np.array([-1.0, 1.0]), size=(min(_CHUNK, n_perm - start), d.size))
        count += int(np.sum(np.abs(signs @ d) >= observed - tol))
    return (count + 1) / (n_perm + 1)


def holm(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values (monotone in the raw p, capped at 1); NaNs stay NaN and do not
    count towards the number of tests."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    if ok.size == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    m = order.size
    adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out[order] = np.minimum(adjusted, 1.0)
    return out


def _validate(records: pd.DataFrame) -> pd.DataFrame:
    """The records with `metric` ("accuracy" or "ce"), `y` (the outcome), `trained` filled in."""
    missing = [c for c in REQUIRED_COLUMNS if c not in records.columns]
    if missing:
        raise ValueError(f"records frame lacks required columns {missing}; has {list(records.columns)}")
    if records.empty:
        raise ValueError("records frame is empty")
    out = records.copy()
    for col in ("correct", "ce", "processed_tokens", "seconds"):
        if col not in out.columns:
            out[col] = np.nan
    has_ce = out["ce"].notna()
    if (out["correct"].isna() & ~has_ce).any():
        raise ValueError("records lack an outcome (column 'correct', or 'ce' for held-out records)")
    out["metric"] = np.where(has_ce, "ce", "accuracy")
    out["y"] = np.where(has_ce, out["ce"], out["correct"].astype(float))
    out["trained"] = out["trained"].fillna(False).astype(bool) if "trained" in out.columns else False
    dup = out.duplicated(GROUP_KEYS + ["seed", "task_id"])
    if dup.any():
        first = out.loc[dup, GROUP_KEYS + ["seed", "task_id"]].iloc[0].to_dict()
        raise ValueError(f"duplicate (family, task, method, cell, seed, task_id) records, e.g. {first}")
    return out


def _matrix(group: pd.DataFrame, column: str = "y") -> pd.DataFrame:
    """[seeds, task_ids] matrix of ``column`` (NaN where a seed lacks a problem)."""
    return group.pivot(index="seed", columns="task_id", values=column).astype(float)


def per_seed(records: pd.DataFrame) -> pd.DataFrame:
    """One row per (family, task, method, cell, seed): n_problems, score (accuracy or CE), tokens, seconds."""
    r = _validate(records)
    return (r.groupby(GROUP_KEYS + ["seed"], sort=True)
            .agg(metric=("metric", "first"), n_problems=("task_id", "nunique"), score=("y", "mean"),
                 tokens_mean=("processed_tokens", "mean"), seconds_mean=("seconds", "mean"))
            .reset_index())


def _filled(x: np.ndarray) -> np.ndarray:
    """[seeds, problems] with a missing cell replaced by its problem's mean over the other seeds."""
    x = np.asarray(x, dtype=float)
    if np.isnan(x).any():
        with np.errstate(all="ignore"):
            x = np.where(np.isnan(x), np.nanmean(x, axis=0, keepdims=True), x)
    return x


def two_level_means(x: np.ndarray, n_boot: int, rng: np.random.Generator, problems: np.ndarray | None = None,
                    resample_seeds: bool = True) -> np.ndarray:
    """Bootstrap means of a [seeds, problems] matrix: seeds (when `resample_seeds` and there are several)
    and problems resampled with replacement; `problems` [n_boot, n] gives the problem counts to share with
    a paired side. Returns [n_boot]."""
    x = _filled(x)
    S, n = x.shape
    out = np.empty(n_boot)
    for start in range(0, n_boot, _CHUNK):
        k = min(_CHUNK, n_boot - start)
        if resample_seeds and S > 1:
            seeds = rng.multinomial(S, np.full(S, 1.0 / S), size=k)  # [k, S] counts
            cols = seeds @ x / S  # [k, n] per-problem means over the resampled seeds
        else:
            cols = np.broadcast_to(x.mean(0), (k, n))
        counts = problems[start:start + k] if problems is not None else rng.multinomial(n, np.full(n, 1.0 / n), size=k)
        out[start:start + k] = (counts * cols).sum(1) / n
    return out


def min_p(n_paired: int, n_perm: int = 10_000) -> float:
    """The smallest two-sided p the sign-flip test can return with n paired problems."""
    exact = 2.0 ** (1 - n_paired) if n_paired > 0 else 1.0
    return exact if 2.0 ** n_paired <= n_perm else max(exact, 1.0 / (n_perm + 1))


Baseline = str | Mapping[str, str]
"""A family's baseline: a method name (compare methods within one cell) or {"cell": <cell>} (compare the
cells of one method against that cell, as in the ablation families)."""


def _baseline_key(baselines: Mapping[str, Baseline] | str, key: tuple[str, str, str, str],
                  groups: Mapping[tuple[str, str, str, str], Any]) -> tuple[tuple[str, str, str, str], str]:
    """The (family, task, method, cell) group a row is compared against, and the baseline's label: the same
    method in the baseline cell, or the baseline method in the row's cell, else in the one cell it has in
    the family (a method family holds each method in one cell: the main cell, or none when cell-free)."""
    family, task, method, cell = key
    base = baselines if isinstance(baselines, str) else baselines.get(family)
    if base is None:
        raise ValueError(f"no baseline given for family {family!r} (baselines: {dict(baselines)})")
    if isinstance(base, Mapping):
        if set(base) != {"cell"}:
            raise ValueError(f"baseline of family {family!r} must be a method name or {{'cell': ...}}, got {base}")
        return (family, task, method, str(base["cell"])), str(base["cell"])
    if (family, task, str(base), cell) in groups:
        return (family, task, str(base), cell), str(base)
    found = [k for k in groups if k[:3] == (family, task, str(base))]
    if len(found) > 1:
        raise ValueError(f"baseline {base!r} of family {family!r} has several cells on {task!r}: {[k[3] for k in found]}")
    return (found[0] if found else (family, task, str(base), cell)), str(base)


def summarize(records: pd.DataFrame, baselines: Mapping[str, Baseline] | str, n_boot: int = 10_000,
              level: float = 0.95, rng_seed: int = 0, n_perm: int = 10_000, margin: float = 0.05,
              alpha: float = 0.05) -> pd.DataFrame:
    """One row per (family, task, method, cell): the score (accuracy or CE) with its seed std and bootstrap
    CI, cost means, and the comparison against the family's baseline (the baseline method in the same task,
    or, with ``{"cell": c}``, the same method and task in cell c), paired on the shared task_ids: delta, its
    CI, p_perm, p_min, p_holm, the non-inferiority p and the verdict. Holm within each family."""
    r = _validate(records)
    phases = [c for c in PHASE_COLUMNS if c in r.columns]
    groups = {key: g for key, g in r.groupby(GROUP_KEYS, sort=True)}
    rows = []
    for i, ((family, task, method, cell), g) in enumerate(groups.items()):
        rng = np.random.default_rng([rng_seed, i])
        base_key, base = _baseline_key(baselines, (family, task, method, cell), groups)
        is_baseline = base_key == (family, task, method, cell)
        metric, trained = g["metric"].iloc[0], bool(g["trained"].iloc[0])
        seed_score = g.groupby("seed")["y"].mean()
        mean, std = mean_std(seed_score.to_numpy())
        boots = two_level_means(_matrix(g).to_numpy(), n_boot, rng, resample_seeds=trained)
        lo, hi = _percentile(boots, level)
        row: dict[str, Any] = dict(family=family, task=task, method=method, cell=cell, metric=metric,
                                   trained=trained, n_problems=g["task_id"].nunique(), n_seeds=seed_score.size,
                                   score_mean=mean, score_std=std, score_ci_low=lo, score_ci_high=hi,
                                   tokens_mean=float(g["processed_tokens"].mean()),
                                   seconds_mean=float(g["seconds"].mean()),
                                   truncated_rate=float(g["truncated"].mean()) if "truncated" in g else np.nan)
        if "cell_params" in g.columns:  # the swept run-config values of an ablation cell (JSON)
            row["cell_params"] = g["cell_params"].iloc[0]
        for col in ("receiver_tokens", "base_correct"):
            if col in g.columns:
                row[f"{col}_mean"] = float(g[col].astype(float).mean()) if g[col].notna().any() else np.nan
        with np.errstate(all="ignore"):
            for c in phases:
                row[f"{c}_mean"] = float(np.nanmean(g[c].to_numpy(dtype=float))) if g[c].notna().any() else np.nan
        row.update(baseline=base, is_baseline=is_baseline, n_paired_problems=np.nan, delta=np.nan,
                   delta_ci_low=np.nan, delta_ci_high=np.nan, p_mcnemar="", p_mcnemar_max=np.nan, p_perm=np.nan,
                   p_min=np.nan, p_noninf=np.nan)
        if not is_baseline:
            where = f"family={family!r} task={task!r} method={method!r} cell={cell!r}"
            if base_key not in groups:
                raise ValueError(f"baseline {base!r} (method {base_key[2]!r}, cell {base_key[3]!r}) missing for {where}")
            b = groups[base_key]
            shared = sorted(set(g["task_id"]) & set(b["task_id"]))
            if not shared:
                raise ValueError(f"{where} shares no task_id with baseline {base!r}")
            ma, mb = _matrix(g)[shared].to_numpy(), _matrix(b)[shared].to_numpy()
            d = _problem_means(ma) - _problem_means(mb)
            counts = rng.multinomial(len(shared), np.full(len(shared), 1.0 / len(shared)), size=n_boot)
            deltas = (two_level_means(ma, n_boot, rng, counts, trained)
                      - two_level_means(mb, n_boot, rng, counts, bool(b["trained"].iloc[0])))
            dlo, dhi = _percentile(deltas, level)
            worse = deltas >= margin if metric in LOWER_IS_BETTER else deltas <= -margin
            row.update(n_paired_problems=len(shared), delta=float(np.mean(d)), delta_ci_low=dlo, delta_ci_high=dhi,
                       p_perm=sign_flip_test(d, n_perm, rng_seed), p_min=min_p(len(shared), n_perm),
                       p_noninf=float((worse.sum() + 1) / (n_boot + 1)))
            joined = g.merge(b, on=["seed", "task_id"], suffixes=("", "_base"))
            if metric == "accuracy" and not joined.empty and set(g["seed"]) == set(b["seed"]):
                pm = [mcnemar_exact(s["correct"].to_numpy(), s["correct_base"].to_numpy())
                      for _, s in joined.groupby("seed", sort=True)]
                row.update(p_mcnemar=";".join(f"{p:.4g}" for p in pm), p_mcnemar_max=max(pm))
        rows.append(row)
    out = pd.DataFrame(rows)
    out["p_holm"], out["p_noninf_holm"], out["testable"] = np.nan, np.nan, False
    for _, idx in out.groupby("family").groups.items():
        mask = out.index.isin(idx) & ~out["is_baseline"].astype(bool)
        out.loc[mask, "p_holm"] = holm(out.loc[mask, "p_perm"].to_numpy())
        out.loc[mask, "p_noninf_holm"] = holm(out.loc[mask, "p_noninf"].to_numpy())
        out.loc[mask, "testable"] = (out.loc[mask, "p_min"] * int(mask.sum())) < alpha
    out["verdict"] = np.where(out["is_baseline"].astype(bool), "",  # the direction of the score, not "better"
                              np.where(out["p_holm"] < alpha, np.where(out["delta"] > 0, "higher", "lower"),
                                       "not distinguishable"))
    out["noninferior"] = ~out["is_baseline"].astype(bool) & (out["p_noninf_holm"] < alpha)
    return out
