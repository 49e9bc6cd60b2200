"""Training data: GSM8K cleaning, boxed extraction, decontamination, and the offline sources."""
import pytest

from tflow.data import (Problem, code_block, corpus_record, gsm8k_solution, heldout_gsm8k, last_boxed, load_basic_coding,
                        load_gsm8k, load_math500, load_math_train, load_mbpp, mbppplus_task_ids)
from tflow.errors import ConfigError, DataError
from tflow.mix import decontaminate, eval_texts, receiver_prompt, sender_view, training_set
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


def test_code_sources_are_outside_the_evaluation_sets(data_dir):
    mbpp, info = load_mbpp(data_dir)
    plus = mbppplus_task_ids(data_dir)
    assert len(mbpp) == 261 and not {int(p.id.split("/")[1]) for p in mbpp} & plus and "minus MBPP+" in info["version"]
    assert all(p.task == "mbppplus" and p.solution.startswith("```python\n") and "assert " in p.question for p in mbpp)
    coding, _ = load_basic_coding()
    assert len(coding) > 900 and all(p.task == "humanevalplus" and p.question.startswith("def ") for p in coding)
    assert code_block("def f():\r\n    return 1\r\n") == "```python\ndef f():\n    return 1\n```"


def test_reasoning_gym_gsm_symbolic_is_not_a_source():
    """gsm_symbolic rewrites GSM8K test problems (760 of 1,340 13-gram-clean samples still share an 8-gram
    with GSM8K test), so it was dropped: naming it fails before any data is read."""
    from tflow.config import load_config

    for name in ("reasoning_gym", "gsm_symbolic"):
        with pytest.raises(ConfigError, match="unknown training data source"):
            load_config([], [f"data.mix=[{{source: {name}}}]"])


@pytest.mark.parametrize("row, want", [
    ({"problem": "What is 1+1?", "deepseek_solution": "It is \\boxed{2}.", "deepseek_reasoning": "1+1=2", "domain": "math"},
     ("What is 1+1?", "<think>\n1+1=2\n</think>\n\nIt is \\boxed{2}.", "math500")),
    ({"conversations": [{"from": "user", "value": "Write f."}, {"from": "assistant", "value": "```python\ndef f(): pass\n```"}]},
     ("Write f.", "```python\ndef f(): pass\n```", "mbppplus")),
    ({"question": "Sum a list.", "solution": "def s(x):\n    return sum(x)"}, ("Sum a list.", "```python\ndef s(x):\n    return sum(x)\n```", "mbppplus")),
    ({"question": "no answer"}, None),
])
def test_hub_corpus_records_of_both_layouts(row, want):
    assert corpus_record(row, traces=True) == want


def test_decontamination_covers_every_evaluation_set(data_dir):
    from tflow.tasks import get_task

    texts = set(eval_texts(["gsm8k", "math500", "mmlu_redux", "humanevalplus", "mbppplus"], data_dir))
    for task in ("mmlu_redux", "humanevalplus", "mbppplus"):
        p = get_task(task).load(data_dir)[0][7]
        copy = Problem("x", p.question, "", "")
        assert decontaminate([copy], texts, 13)[0] == [], task  # an evaluation problem never survives


def test_training_mix_is_weighted_deterministic_cached_and_shown_as_its_task(data_dir, tmp_path):
    from tflow.config import load_config

    cfg = load_config([], [f"data.data_dir={data_dir}", "data.per_source_limit=200", "data.validation_size=5",
                           "data.mix=[{source: gsm8k, weight: 3}, {source: mbpp, weight: 1}]"])
    a = training_set(cfg.data, 0, 40, tmp_path)
    assert len(a.problems) == 40 and a.sources["gsm8k"]["drawn"] == 30 and a.sources["mbpp"]["drawn"] == 10
    assert {p.id for p in a.validation}.isdisjoint(p.id for p in a.problems) and len(a.validation) == 10
    b = training_set(cfg.data, 0, 40, tmp_path)  # from the cache
    assert [p.id for p in b.problems] == [p.id for p in a.problems] and b.sources == a.sources
    assert [p.id for p in training_set(cfg.data, 0, 40).problems] == [p.id for p in a.problems]  # same without it
    assert [p.id for p in training_set(cfg.data, 1, 40, tmp_path).problems] != [p.id for p in a.problems]
    gsm = next(p for p in a.problems if p.task == "gsm8k")
    assert receiver_prompt(gsm).endswith("put the final answer (a number) in \\boxed{}.") and gsm.question in receiver_prompt(gsm)
    assert sender_view(gsm) == gsm.question and "\\boxed{" in gsm.solution
    code = next(p for p in a.problems if p.task == "mbppplus")
    assert "```python" in receiver_prompt(code) and code.solution.startswith("```python")
