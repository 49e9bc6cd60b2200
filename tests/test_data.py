"""Training data: GSM8K cleaning, boxed extraction, decontamination, and the offline sources."""
import pytest

from tflow.data import Problem, decontaminate, gsm8k_solution, heldout_gsm8k, last_boxed, load_gsm8k, load_math_train, load_math500
from tflow.errors import DataError
from tflow.tasks.gsm8k import extract_answer, is_correct


def test_gsm8k_solution_strips_calculator_marks():
    sol, final = gsm8k_solution("Natalia sold 48/2 = <<48/2=24>>24 clips.\nTotal 48+24 = <<48+24=72>>72.\n#### 1,072")
    assert "<<" not in sol and final == "1072"
    assert sol.endswith("The final answer is $\\boxed{1072}$.")


@pytest.mark.parametrize("text, want", [
    ("so \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
    ("\\boxed{1} then \\boxed{x^{2}+\\sqrt{3}}", "x^{2}+\\sqrt{3}"),
    ("no box here", None),
    ("\\boxed{unclosed", None),
    ("\\fbox{7}", "7"),
])
def test_last_boxed(text, want):
    assert last_boxed(text) == want


@pytest.mark.parametrize("text, gold, ok", [
    ("The answer is \\boxed{1,234}.", "1234", True),
    ("so 3 apples, then 18 in total", "18", True),
    ("$\\boxed{\\$18.00}$", "18", True),
    ("\\boxed{\\frac{3}{4}}", "0.75", True),
    ("I am not sure.", "5", False),
    ("\\boxed{12} but later 13", "12", True),  # boxed wins over the last number
])
def test_gsm8k_extract_and_score(text, gold, ok):
    assert is_correct(extract_answer(text), gold) is ok


def test_decontamination_counts_exact_and_ngram():
    evals = ["Natalia sold clips to 48 of her friends in April and then she sold half as many clips in May"]
    probs = [Problem("a", "natalia sold clips to 48 of her friends in april, and then she sold half as many clips in may!", "", ""),
             Problem("b", "Yesterday Natalia sold clips to 48 of her friends in April and then she sold half as many pens", "", ""),
             Problem("c", "A completely different question about trains and speeds.", "", "")]
    kept, removed = decontaminate(probs, evals, n=8)
    assert [p.id for p in kept] == ["c"] and removed == {"exact": 1, "ngram": 1}


def test_offline_sources_have_the_documented_sizes(data_dir, tmp_path):
    train, info = load_gsm8k(data_dir, "train")
    test, _ = load_gsm8k(data_dir, "test")
    assert len(train) == 7473 and len(test) == 1319 and "grade-school-math@" in info["version"]
    assert len(load_math500()) == 500
    math_train, _ = load_math_train()
    assert len(math_train) == 4500  # MATH test (5000) minus MATH-500
    held = heldout_gsm8k(data_dir, 8)
    assert len(held) == 8 and held == heldout_gsm8k(data_dir, 8)  # fixed, seeded
    with pytest.raises(DataError, match="data_dir"):
        load_gsm8k(tmp_path, "train")
