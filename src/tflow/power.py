"""Power of the paired comparisons: how many problems a run needs to detect a given accuracy difference.

The tables compare a method with its baseline on the same problems (a sign-flip permutation test on the
per-problem differences; with one seed and 0/1 outcomes it is McNemar's test). Its power depends on the
difference delta = p(method right, baseline wrong) - p(method wrong, baseline right) and on how often the
two disagree (the discordance psi = the sum of both). Connor's (1987) normal approximation gives the
problems needed, n = (z_{1-a/2} sqrt(psi) + z_{1-b} sqrt(psi - delta^2))^2 / delta^2, with a = alpha / m
for the smallest of m Holm-corrected comparisons. A simulation of the exact test checks the formula.

    python -m tflow.power --delta 0.10 --psi 0.25 0.30 --comparisons 3 --n 164 300
"""
from __future__ import annotations

import argparse
import math
from typing import Sequence

import numpy as np
from scipy.stats import binomtest, norm


def problems_needed(delta: float, psi: float, alpha: float = 0.05, power: float = 0.8, comparisons: int = 1) -> int:
    """Paired problems for a two-sided test at alpha/comparisons to detect `delta` with `power`."""
    if not 0 < delta < psi <= 1:
        raise ValueError("need 0 < delta < psi <= 1 (the difference cannot exceed the discordance)")
    za, zb = norm.ppf(1 - alpha / comparisons / 2), norm.ppf(power)
    return math.ceil((za * math.sqrt(psi) + zb * math.sqrt(psi - delta ** 2)) ** 2 / delta ** 2)


def simulated_power(n: int, delta: float, psi: float, alpha: float = 0.05, comparisons: int = 1,
                    reps: int = 2000, seed: int = 0) -> float:
    """Share of simulated runs in which the exact McNemar test rejects at alpha/comparisons."""
    rng = np.random.default_rng(seed)
    p10, p01 = (psi + delta) / 2, (psi - delta) / 2
    counts = rng.multinomial(n, [p10, p01, 1 - psi], size=reps)
    hits = 0
    for b, c, _ in counts:
        if b + c and binomtest(int(b), int(b + c), 0.5).pvalue < alpha / comparisons:
            hits += 1
    return hits / reps


def report(deltas: Sequence[float], psis: Sequence[float], ns: Sequence[int], alpha: float, power: float,
           comparisons: int) -> str:
    lines = [f"paired test, two-sided alpha {alpha} / {comparisons} comparisons (Holm's smallest), power {power}"]
    for delta in deltas:
        for psi in psis:
            need = problems_needed(delta, psi, alpha, power, comparisons)
            lines.append(f"  delta {delta:.2f}, discordance {psi:.2f}: {need} problems "
                         f"(simulated power at that n: {simulated_power(need, delta, psi, alpha, comparisons):.2f})")
            for n in ns:
                lines.append(f"    at n = {n}: simulated power {simulated_power(n, delta, psi, alpha, comparisons):.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--delta", type=float, nargs="+", default=[0.10])
    ap.add_argument("--psi", type=float, nargs="+", default=[0.25, 0.30], help="discordance (share of problems "
                    "on which the two methods disagree)")
    ap.add_argument("--n", type=int, nargs="*", default=[], help="also report the power at these sizes")
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--power", type=float, default=0.8)
    ap.add_argument("--comparisons", type=int, default=1, help="comparisons in the family (Holm)")
    a = ap.parse_args(argv)
    print(report(a.delta, a.psi, a.n, a.alpha, a.power, a.comparisons))


if __name__ == "__main__":
    main()
