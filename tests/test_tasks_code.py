"""Code tasks: offline loading, code extraction, evalplus scoring, and the sandbox against hostile samples."""
from __future__ import annotations

import platform
import socket
import stat
import sys
import time

import psutil
import pytest

from tflow.errors import DataError
from tflow.tasks.code import Sandbox, extract_code, load_records
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
    assert len(list(workdir.rglob("*.pkl"))) == 6


SAMPLE = ("def truncate_number(number: float) -> float:\n    import ctypes, io, os, signal, socket\n"
          "    libc = ctypes.CDLL(None, use_errno=True)\n{}\n    return number % 1.0\n")
ATTACKS = {  # each attack, when it works, leaves the answer right: only the sandbox makes it fail
    "overwrite": "    with io.open({sentinel!r}, 'w') as f:\n        f.write('pwned')",
    "chmod": "    assert libc.chmod({sentinel!r}.encode(), 0o777) == 0",
    "delete": "    assert libc.unlink({sentinel!r}.encode()) == 0",
    "socket": "    socket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'pwned')",
    "exec": "    os.execv('/bin/sh', ['sh', '-c', 'rm -f {sentinel}'])",
    "spawn": "    os.posix_spawn('/bin/sh', ['sh', '-c', 'rm -f {sentinel}'], {{}})",
    "kill_parent": "    assert libc.kill(os.getppid(), 9) == 0",
    "fork_bomb": ("    libc.prctl(15, b'tflowbomb', 0, 0, 0)\n    for _ in range(6):  # at most 64 processes\n"
                  "        assert libc.fork() >= 0\n    libc.sleep(10)"),
    "memory_10gb": "    buf = bytearray(10 * 2**30)",
    "loop": "    while True:\n        pass",
    "loop_ignoring_alarm": "    signal.signal(signal.SIGALRM, signal.SIG_IGN)\n    while True:\n        pass",
}


@pytest.fixture
def target(tmp_path):
    """A sentinel file outside every sandbox folder and a listening socket on 127.0.0.1."""
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("keep me")
    sentinel.chmod(0o644)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.setblocking(False)
    yield sentinel, srv
    srv.close()


def run_attacks(he, workdir, target, names, box):
    sentinel, srv = target
    fill = {"sentinel": str(sentinel), "port": srv.getsockname()[1]}
    outs = [f"```python\n{SAMPLE.format(ATTACKS[n].format(**fill))}```" for n in names]
    outs.append("```python\ndef truncate_number(number):\n    return number % 1.0\n```")  # after all of them
    t0 = time.perf_counter()
    scores = HumanEvalPlusTask(sandbox=box).score(pick(he[0], *["HumanEval/2"] * len(outs)), outs, workdir)
    return scores, time.perf_counter() - t0


def intact(sentinel) -> bool:
    return sentinel.is_file() and sentinel.read_text() == "keep me" and stat.S_IMODE(sentinel.stat().st_mode) == 0o644


def connected(srv) -> bool:
    try:
        srv.accept()[0].close()
        return True
    except BlockingIOError:
        return False


def live_bombs(wait_s: float = 3.0) -> int:
    """Fork-bomb processes still alive (SIGKILLed ones may take a moment to become zombies)."""
    deadline = time.monotonic() + wait_s
    while True:
        procs = psutil.process_iter(["name", "status"])
        n = sum(p.info["name"] == "tflowbomb" and p.info["status"] != psutil.STATUS_ZOMBIE for p in procs)
        if n == 0 or time.monotonic() > deadline:
            return n
        time.sleep(0.1)


@needs_sandbox
@pytest.mark.slow
@pytest.mark.parametrize("box", [Sandbox(wall_timeout_s=120), Sandbox(drop_user=False, wall_timeout_s=120)],
                         ids=["default", "seccomp_only"])  # seccomp_only: what a non-root harness gets
def test_hostile_samples_fail_and_the_host_is_intact(he, workdir, target, box):
    names = list(ATTACKS) if box.drop_user else [n for n in ATTACKS if not n.startswith("loop")]
    scores, seconds = run_attacks(he, workdir, target, names, box)
    print(f"{len(names)} hostile samples + 1 canonical: {seconds:.1f}s")
    failed = {n: s.detail for n, s in zip(names, scores) if s.correct}
    assert not failed, failed
    assert scores[-1].correct, scores[-1].detail  # the sandbox outlived every attack
    assert intact(target[0]) and not connected(target[1])
    assert live_bombs() == 0
    assert seconds < 60
    if box.drop_user:  # evalplus's own time limits: a per-input alarm, then terminate on the join timeout
        timed = dict(zip(names, scores))
        assert timed["loop"].detail["base"] == "fail" and timed["loop_ignoring_alarm"].detail["base"] == "timeout"


@needs_sandbox
def test_attacks_are_real_without_the_added_layers(he, workdir, target):
    """Positive control: under evalplus's reliability_guard alone the attacks work (so the tests above test the
    added layers), and the harness's process-group kill still ends the (bounded) fork bomb."""
    names = ["socket", "chmod", "spawn", "fork_bomb"]  # (the fork bomb's check times out: its forks sleep)
    scores, _ = run_attacks(he, workdir, target, names, Sandbox(drop_user=False, seccomp=False))
    assert [s.detail["base"] for s in scores] == ["pass", "pass", "pass", "fail", "pass"]
    assert connected(target[1]) and not intact(target[0])
    assert live_bombs() == 0


@needs_sandbox
def test_wall_clock_budget_kills_the_batch(he, workdir, target):
    scores, seconds = run_attacks(he, workdir, target, ["loop_ignoring_alarm"], Sandbox(wall_timeout_s=4))
    assert seconds < 10 and all(s.detail["base"] == "timeout" and not s.correct for s in scores)
    assert "budget" in scores[0].detail["error"]
