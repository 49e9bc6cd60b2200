"""Minerva Math (the release's "MATH"): 4-shot prompt, Minerva normalisation, the release's scoring order,
and its sources (hub; an offline file of your own) on a fixture."""
import json

import pytest

from tflow.errors import DataError
from tflow.tasks import get_task
from tflow.tasks.minerva_math import EXEMPLARS, normalize_final_answer

FIXTURE = [{"problem": "What is $2+2$?", "solution": "We add: $2+2=\\boxed{4}$."},
           {"problem": "Half of 1?", "solution": "It is $\\boxed{\\frac{1}{2}}$."},
           {"problem": "Speed of the car in km/h?", "solution": "So $\\boxed{60\\text{ km}}$."}]


@pytest.fixture
def task_and_problems(tmp_path):
    (tmp_path / "minerva_math").mkdir()
    (tmp_path / "minerva_math" / "minerva_math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in FIXTURE))
    task = get_task("minerva_math")
    return task, *task.load(tmp_path)


def test_fixture_loads_with_normalised_gold_and_a_four_shot_prompt(task_and_problems):
    task, problems, info = task_and_problems
    assert [p.gold for p in problems] == ["4", "\\frac{1}{2}", "60"] and info["count"] == 3
    prompt = task.prompt(problems[0])
    assert prompt.count("Problem:") == 5 and prompt.count("I hope it is correct.\n\nProblem:") == 4 and len(EXEMPLARS) == 4
    assert prompt.rstrip().endswith("Problem:\nWhat is $2+2$?\n\nSolution:")
    assert task.sender_view(problems[0]) == "What is $2+2$?"  # the exemplars are the same for every problem


@pytest.mark.parametrize("output, i, ok", [
    ("2+2 is \\boxed{4}.\nFinal Answer: The final answer is $4$. I hope it is correct.", 0, True),
    ("Final Answer: The final answer is $0.5$. I hope it is correct.", 1, True),  # symbolic equivalence
    ("It is \\boxed{60 km}", 2, True),  # units removed by the normalisation
    ("\\boxed{5}\n\nProblem:\nnext \\boxed{4}", 0, False),  # a continuation after "Problem:" is cut
    ("I do not know.", 0, False),
])
def test_scoring_follows_the_release(task_and_problems, output, i, ok, tmp_path):
    task, problems, _ = task_and_problems
    assert task.score([problems[i]], [output], tmp_path)[0].correct is ok


def test_normalisation_and_missing_offline_copy(tmp_path):
    assert normalize_final_answer("x = \\frac12") == "\\frac{1}{2}" and normalize_final_answer("1,000") == "1000"
    with pytest.raises(DataError, match="eval.source=hub"):
        get_task("minerva_math").load(tmp_path)
