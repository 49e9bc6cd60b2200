"""Statistics of the paper tables, computed from per-problem outcomes.

The unit of analysis is the per-problem outcome (``correct`` for one task_id, one seed). Choices:

* Spread over seeds: mean and sample std (ddof=1) of the per-seed accuracies; the std is NaN for one seed.
* Confidence intervals: percentile bootstrap that resamples PROBLEMS (the columns of a [seeds, problems]
  matrix); the statistic is the mean over seeds and problems. Seeds are not resampled: with about five
  seeds the seed-level distribution is too coarse, while the problem set is the real sampling unit.
  Deltas use the paired bootstrap: the same resampled problems for the method and its baseline.
* Tests against the baseline: a two-sided sign-flip permutation test over problems on the per-problem
  differences (method minus baseline, averaged over seeds). A Wilcoxon test over 5 seed-level
  accuracies cannot reject anything at 0.05: its smallest two-sided p-value with 5 pairs is
  2/2**5 = 0.0625. Per seed the exact McNemar test (binomial test on the discordant pairs) is reported too.
* Multiplicity: Holm step-down over the non-baseline rows of one table/figure family (a family is one
  claim being tested, e.g. "ablation_rank"); families are not pooled, being separate questions.
* Comparisons use the intersection of seeds and task_ids shared by a method and its baseline.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import binomtest

from tflow.accounting import PHASES

REQUIRED_COLUMNS = ("family", "task", "method", "cell", "seed", "task_id", "correct", "processed_tokens", "seconds")
PHASE_COLUMNS = tuple(f"s_{phase}" for phase in PHASES)  # per-problem seconds of each phase (tflow.accounting)
GROUP_KEYS = ["family", "task", "method", "cell"]
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
    missing = [c for c in REQUIRED_COLUMNS if c not in records.columns]
    if missing:
        raise ValueError(f"records frame lacks required columns {missing}; has {list(records.columns)}")
    if records.empty:
        raise ValueError("records frame is empty")
    if records["correct"].isna().any():
        raise ValueError("records column 'correct' contains missing values")
    dup = records.duplicated(GROUP_KEYS + ["seed", "task_id"])
    if dup.any():
        first = records.loc[dup, GROUP_KEYS + ["seed", "task_id"]].iloc[0].to_dict()
        raise ValueError(f"duplicate (family, task, method, cell, seed, task_id) records, e.g. {first}")
    out = records.copy()
    out["correct"] = out["correct"].astype(bool).astype(float)
    return out


def _matrix(group: pd.DataFrame, column: str = "correct") -> pd.DataFrame:
    """[seeds, task_ids] matrix of ``column`` (NaN where a seed lacks a problem)."""
    return group.pivot(index="seed", columns="task_id", values=column).astype(float)


def per_seed(records: pd.DataFrame) -> pd.DataFrame:
    """One row per (family, task, method, cell, seed): n_problems, accuracy, tokens_mean, seconds_mean."""
    r = _validate(records)
    return (r.groupby(GROUP_KEYS + ["seed"], sort=True)
            .agg(n_problems=("task_id", "nunique"), accuracy=("correct", "mean"),
                 tokens_mean=("processed_tokens", "mean"), seconds_mean=("seconds", "mean"))
            .reset_index())


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
              level: float = 0.95, rng_seed: int = 0, n_perm: int = 10_000) -> pd.DataFrame:
    """One row per (family, task, method, cell): accuracy with seed std and problem bootstrap CI, cost
    means, and the comparison against the family's baseline: the baseline method in the same task and cell,
    or (``{"cell": c}``) the same method and task in cell c. Paired on the shared seeds and task_ids; Holm
    over the non-baseline rows of each family, applied to p_perm; ``is_baseline`` marks the reference rows."""
    r = _validate(records)
    phases = [c for c in PHASE_COLUMNS if c in r.columns]
    groups = {key: g for key, g in r.groupby(GROUP_KEYS, sort=True)}
    rows = []
    for (family, task, method, cell), g in groups.items():
        base_key, base = _baseline_key(baselines, (family, task, method, cell), groups)
        is_baseline = base_key == (family, task, method, cell)
        seed_acc = g.groupby("seed")["correct"].mean()
        acc_mean, acc_std = mean_std(seed_acc.to_numpy())
        lo, hi = bootstrap_ci(_matrix(g).to_numpy(), n_boot, level, rng_seed)
        row: dict[str, Any] = dict(family=family, task=task, method=method, cell=cell,
                                   n_problems=g["task_id"].nunique(), n_seeds=seed_acc.size,
                                   acc_mean=acc_mean, acc_std=acc_std, acc_ci_low=lo, acc_ci_high=hi,
                                   tokens_mean=float(g["processed_tokens"].mean()),
                                   seconds_mean=float(g["seconds"].mean()))
        if "cell_params" in g.columns:  # the swept run-config values of an ablation cell (JSON)
            row["cell_params"] = g["cell_params"].iloc[0]
        with np.errstate(all="ignore"):
            for c in phases:
                row[f"{c}_mean"] = float(np.nanmean(g[c].to_numpy(dtype=float))) if g[c].notna().any() else np.nan
        if "base_correct" in g.columns:
            bc = g.dropna(subset=["base_correct"])
            row["base_acc_mean"] = (float(bc.assign(b=bc["base_correct"].astype(bool).astype(float))
                                          .groupby("seed")["b"].mean().mean()) if len(bc) else np.nan)
        row.update(baseline=base, is_baseline=is_baseline, n_paired_problems=np.nan, n_paired_seeds=np.nan,
                   delta=np.nan,
                   delta_ci_low=np.nan, delta_ci_high=np.nan, p_mcnemar="", p_mcnemar_max=np.nan,
                   p_perm=np.nan)
        if not is_baseline:
            where = f"family={family!r} task={task!r} method={method!r} cell={cell!r}"
            if base_key not in groups:
                raise ValueError(f"baseline {base!r} (method {base_key[2]!r}, cell {base_key[3]!r}) missing for {where}")
            b = groups[base_key]
            joined = g.merge(b, on=["seed", "task_id"], suffixes=("", "_base"))
            if joined.empty:
                raise ValueError(f"{where} shares no (seed, task_id) with baseline {base!r}")
            ma = _matrix(joined, "correct")
            mb = _matrix(joined, "correct_base")
            d = _problem_means(ma.to_numpy()) - _problem_means(mb.to_numpy())
            dlo, dhi = paired_bootstrap_ci(ma.to_numpy(), mb.to_numpy(), n_boot, level, rng_seed)
            pm = [mcnemar_exact(s["correct"].to_numpy(), s["correct_base"].to_numpy())
                  for _, s in joined.groupby("seed", sort=True)]
            row.update(n_paired_problems=ma.shape[1], n_paired_seeds=ma.shape[0],
                       delta=float(np.nanmean(d)),
                       delta_ci_low=dlo, delta_ci_high=dhi, p_mcnemar=";".join(f"{p:.4g}" for p in pm),
                       p_mcnemar_max=max(pm), p_perm=sign_flip_test(d, n_perm, rng_seed))
        rows.append(row)
    out = pd.DataFrame(rows)
    out["p_holm"] = np.nan
    for _, idx in out.groupby("family").groups.items():
        mask = out.index.isin(idx) & ~out["is_baseline"].astype(bool)
        out.loc[mask, "p_holm"] = holm(out.loc[mask, "p_perm"].to_numpy())
    return out
