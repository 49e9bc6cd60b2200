"""The power calculation behind the medium run's sizes (tflow.power)."""
import pytest

from tflow.power import problems_needed, simulated_power


def test_problems_needed_matches_the_simulated_exact_test():
    n = problems_needed(0.10, 0.25, alpha=0.05, power=0.8, comparisons=1)
    assert 180 <= n <= 220  # Connor's formula
    assert simulated_power(n, 0.10, 0.25, reps=800) == pytest.approx(0.8, abs=0.06)
    assert problems_needed(0.10, 0.25, comparisons=3) > n  # Holm's smallest comparison needs more
    with pytest.raises(ValueError):
        problems_needed(0.3, 0.2)
