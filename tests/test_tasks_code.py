"""Code tasks: offline loading, code extraction and evalplus scoring (the sandbox: tests/test_sandbox_*.py)."""
from __future__ import annotations

import platform
import sys
import time

import pytest

from tflow.errors import DataError
from tflow.tasks.code import extract_code, load_records
from tflow.tasks.humanevalplus import TASK as HE
from tflow.tasks.humanevalplus import HumanEvalPlusTask
from tflow.tasks.mbppplus import TASK as MB


needs_sandbox = pytest.mark.skipif(not (sys.platform == "linux" and platform.machine() == "x86_64"),
                                   reason="the code sandbox's seccomp filter is written for Linux x86_64")


@pytest.fixture(scope="module")
def he(data_dir):
    return HE.load(data_dir)


@pytest.fixture(scope="module")
def mb(data_dir):
    return MB.load(data_dir)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("code_work")  # shared: the ground-truth cache is computed once


def canonical(problem) -> str:
    rec = load_records(problem.meta["dataset"], problem.meta["data_path"])[problem.task_id]
    return f"Here you go:\n```python\n{rec['prompt']}{rec['canonical_solution']}\n```\n"


def pick(problems, *ids):
    by_id = {p.task_id: p for p in problems}
    return [by_id[i] for i in ids]


def test_both_sets_load_offline_with_pinned_counts(he, mb, data_dir):
    (hp, hinfo), (mp, minfo) = he, mb
    assert len(hp) == hinfo["count"] == 164 and hinfo["version"] == "HumanEval+ v0.1.10"
    assert len(mp) == minfo["count"] == 399 and minfo["version"] == "MBPP+ pre-release (Nov 2023)"
    for info in (hinfo, minfo):
        assert info["source"] == "offline" and len(info["source_commit"]) == 40 and "evalplus 0.3.1" in info["scorer"]
    assert hp[0].task_id == "HumanEval/0" and mp[0].task_id == "Mbpp/2" and hp[0].gold == ""
    assert "assert similar_elements(" in mp[0].question  # the example assertion names the function
    prompt = MB.prompt(mp[0])
    assert mp[0].question.strip() in prompt and "```python" in prompt and "markdown code block" in prompt
    mini, info = HumanEvalPlusTask(mini=True).load(data_dir)
    assert len(mini) == 164 and "Mini" in info["version"]


def test_missing_data_names_the_setting(tmp_path):
    for task in (HE, MB):
        with pytest.raises(DataError, match="TFLOW_DATA_DIR"):
            task.load(tmp_path)


PROMPT = 'def f(x):\n    """Add one."""\n'


@pytest.mark.parametrize("text, prompt, want", [
    ("Sure!\n```python\ndef f(x):\n    return x + 1\n```\nDone.", None, "def f(x):\n    return x + 1"),
    ("def f(x):\n    return x + 1\n\nprint(f(2))\nThat is all (really.", None, "def f(x):\n    return x + 1"),
    ("```python\ndef f(x):\n    return x\n```\nTests:\n```python\nassert f(2) == 3\n```\nFixed:\n```python\n"
     "import math\ndef f(x):\n    return math.floor(x) + 1\n```", None,
     "import math\ndef f(x):\n    return math.floor(x) + 1"),  # several blocks: the last one defining f
    ("```py\ndef g(y):\n    return y * 2\n\ndef f(x):\n    return g(x) + 1\n\ndef unused():\n    return 0\n", None,
     "def g(y):\n    return y * 2\ndef f(x):\n    return g(x) + 1"),  # unterminated fence, helper kept, unused dropped
    ("```python\n    return x + 1\n```", PROMPT, PROMPT + "    return x + 1"),  # body only: the prompt's def
    ("return x + 1", PROMPT, PROMPT + "    return x + 1"),
    ("I cannot solve this.", PROMPT, None),
    ("", None, None),
    ("```python\nassert f(1) == 2\n```", None, None),
    ("```\n)))(((\n```", None, None),
])
def test_extract_code(text, prompt, want):
    assert extract_code(text, "f", prompt) == want


@needs_sandbox
def test_canonical_pass_wrong_fail(he, mb, workdir):
    probs = pick(he[0], "HumanEval/0", "HumanEval/32", "HumanEval/53", "HumanEval/53", "HumanEval/32", "HumanEval/0",
                 "HumanEval/53")
    outs = [canonical(p) for p in probs[:3]] + [
        "```python\ndef add(x: int, y: int):\n    return x + y if x >= 0 and y >= 0 else 0\n```",  # base only
        "```python\ndef find_zero(xs):\n    return 0.0\n```", "", "Let me think... the answer is 42."]
    t0 = time.perf_counter()
    scores = HE.score(probs, outs, workdir)
    print(f"HumanEval+ batch of {len(probs)}: {time.perf_counter() - t0:.1f}s")  # includes ground truth
    assert [s.correct for s in scores] == [True, True, True, False, False, False, False]
    assert all(s.detail == {"base": "pass", "plus": "pass", "error": None} for s in scores[:3])  # HumanEval/32:
    assert scores[3].detail["base"] == "pass" and scores[3].detail["plus"] == "fail"  # evalplus 0.3.1 bug fixed
    assert scores[4].detail["base"] == "fail" and scores[5].extracted is None and scores[6].extracted is None
    mprobs = pick(mb[0], "Mbpp/2", "Mbpp/630", "Mbpp/3", "Mbpp/3")
    mouts = [canonical(p) for p in mprobs[:3]] + ["```python\ndef is_not_prime(n):\n    return n % 2 == 0\n```"]
    mscores = MB.score(mprobs, mouts, workdir)
    assert [s.correct for s in mscores] == [True, True, True, False]  # Mbpp/630: a generator helper is kept
    assert len(list(workdir.rglob("*.gt"))) == 6  # ground truth cached per task
