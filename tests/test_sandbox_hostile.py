"""Hostile samples against the code sandbox and the trusted judge: one file per probe in fixtures/hostile.

Each probe's answer is right when its attack works, so only the sandbox or the judge can fail it. One batch
interleaves every probe with a canonical solution and is scored twice: as root (the default sandbox) and as
nobody (fixtures/nobody.py: the sandbox a normal user gets). Each probe has its own test on both batches.
"""
from __future__ import annotations

import json
import os
import platform
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from tflow.tasks.humanevalplus import HumanEvalPlusTask
from tflow.tasks.judge import (ENDED, JUDGE_LOST, MALFORMED, NOT_PLAIN, NOT_RUN, RAISED, REASONS, SLOW, STATUSES,
                               WALL, WRONG)
from tflow.tasks.sandbox import Runner, Sandbox

pytestmark = pytest.mark.skipif(not (sys.platform == "linux" and platform.machine() == "x86_64"),
                                reason="the code sandbox's seccomp filter is written for Linux x86_64")
FIXTURES = Path(__file__).parent / "fixtures"
PROBES = sorted(p.stem for p in (FIXTURES / "hostile").glob("*.py"))
CANONICAL = "```python\ndef truncate_number(number: float) -> float:\n    return number % 1.0\n```"
BOX = Sandbox(min_time_limit=0.2)  # evalplus's per-input floor is 1 s: shorter loops, same semantics
EXPECTED = {  # (base verdict, reason) per probe; every other probe: its attack raises in the sandbox
    "eq_always_true": ("fail", NOT_PLAIN), "frame_overwrite": ("fail", WRONG), "allclose_patch": ("fail", WRONG),
    "status_forge": ("timeout", ENDED), "channel_corruption": ("fail", MALFORMED), "infinite_loop": ("fail", SLOW),
    "loop_ignoring_alarm": ("timeout", WALL), "judge_crash": ("error", JUDGE_LOST),
    "judge_memory": ("fail", NOT_PLAIN)}


@pytest.fixture(scope="module")
def he(data_dir):
    return {p.task_id: p for p in HumanEvalPlusTask().load(data_dir)[0]}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("hostile_work")


def make_host(folder: Path) -> SimpleNamespace:
    """What the probes aim at: a sentinel file, a 0600 secret in a 0700 folder, a listening socket."""
    sentinel = folder / "sentinel.txt"
    sentinel.write_text("keep me")
    sentinel.chmod(0o644)
    private = folder / "private"
    private.mkdir(mode=0o700)
    token = secrets.token_hex(16)
    (private / "secret.txt").write_text(token)
    (private / "secret.txt").chmod(0o600)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.setblocking(False)
    return SimpleNamespace(sentinel=sentinel, secret=private / "secret.txt", token=token, srv=srv)


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    h = make_host(tmp_path_factory.mktemp("host"))
    yield h
    h.srv.close()


def outputs(host: SimpleNamespace, names: list[str]) -> list[str]:
    """Each probe (placeholders filled) followed by a canonical solution."""
    fill = {"__SENTINEL__": str(host.sentinel), "__SECRET__": str(host.secret),
            "__PORT__": str(host.srv.getsockname()[1])}
    outs = []
    for name in names:
        text = (FIXTURES / "hostile" / f"{name}.py").read_text()
        for key, value in fill.items():
            text = text.replace(key, value)
        outs += [f"```python\n{text}```", CANONICAL]
    return outs


def score_as_nobody(outs: list[str], data_dir: str, box: Sandbox) -> dict:
    work = tempfile.mkdtemp(prefix="tflow-nobody-")
    os.chown(work, 65534, 65534)
    job = {"task_ids": ["HumanEval/2"] * len(outs), "outputs": outs, "data_dir": data_dir, "workdir": work,
           "box": asdict(box)}
    env = {**os.environ, "HOME": work}
    try:
        proc = subprocess.run([sys.executable, str(FIXTURES / "nobody.py")], input=json.dumps(job), env=env,
                              capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.fixture(scope="module", params=["root", "nobody"])
def batch(request, he, host, workdir, data_dir):
    if request.param == "nobody" and os.geteuid() != 0:
        pytest.skip("the nobody batch starts as root")
    outs = outputs(host, PROBES)
    t0 = time.perf_counter()
    if request.param == "root":
        task = HumanEvalPlusTask(sandbox=BOX)
        scores = [[s.correct, s.detail] for s in task.score([he["HumanEval/2"]] * len(outs), outs, workdir)]
        runner = Runner(BOX)  # a runner like the batch's: its report
        runner.close()
        got = {"uid": os.geteuid(), "scores": scores, "hello": runner.hello}
    else:
        got = score_as_nobody(outs, data_dir, BOX)
    seconds = time.perf_counter() - t0
    print(f"{request.param}: {len(PROBES)} probes + {len(PROBES)} canonical solutions in {seconds:.1f}s")
    return {**got, "seconds": seconds, "who": request.param, "probes": dict(zip(PROBES, got["scores"][::2])),
            "canonical": got["scores"][1::2]}


@pytest.mark.parametrize("probe", PROBES)
def test_probe_fails_alone(batch, probe):
    """The probe does not pass, its verdict and reason are the expected fixed values, its canonical neighbour passes."""
    correct, detail = batch["probes"][probe]
    base, reason = EXPECTED.get(probe, ("fail", RAISED))
    assert not correct and detail == {"base": base, "plus": NOT_RUN, "error": reason}
    assert batch["canonical"][PROBES.index(probe)] == [True, {"base": "pass", "plus": "pass", "error": None}]


def test_host_intact_and_records_clean(batch, host):
    assert host.sentinel.read_text() == "keep me" and stat.S_IMODE(host.sentinel.stat().st_mode) == 0o644
    with pytest.raises(BlockingIOError):
        host.srv.accept()  # nothing connected
    assert live_bombs() == 0
    records = json.dumps(batch["scores"])
    assert host.token not in records and "TFLOW-LEAK" not in records
    assert all(d["base"] in STATUSES and (d["error"] is None or d["error"] in REASONS) for _, d in batch["scores"])
    assert batch["seconds"] < 90


def test_sandbox_reports_full_isolation(batch):
    hello = batch["hello"]
    assert hello["refused"] is None and hello["seccomp"] and hello["root"] == "minimal"
    assert set(hello["namespaces"]) == {"user", "mnt", "net", "pid", "ipc", "uts"}
    assert hello["uid"] == hello["gid"] == 65534 and hello["no_new_privs"] == 1
    assert not any(hello["caps"].values())
    assert batch["uid"] == (0 if batch["who"] == "root" else 65534)


def live_bombs(wait_s: float = 3.0) -> int:
    """Fork-bomb processes still alive (SIGKILLed ones may take a moment to become zombies)."""
    deadline = time.monotonic() + wait_s
    while True:
        procs = psutil.process_iter(["name", "status"])
        n = sum(p.info["name"] == "tflowbomb" and p.info["status"] != psutil.STATUS_ZOMBIE for p in procs)
        if n == 0 or time.monotonic() > deadline:
            return n
        time.sleep(0.1)


def test_attacks_are_real_without_the_sandbox(he, workdir, tmp_path):
    """Positive control: with the sandbox's layers off (evalplus's reliability_guard alone, as root) the read,
    network and process attacks work, while the scoring probes still fail (the comparison is in the judge) and
    the secret a probe read still reaches no record."""
    if os.geteuid() != 0:
        pytest.skip("needs root to show the reads working")
    host = make_host(tmp_path)
    works = ["read_shadow", "read_secret", "list_root", "network", "spawn_shell"]
    scoring = ["eq_always_true", "frame_overwrite", "allclose_patch", "status_forge", "channel_corruption"]
    try:
        outs = outputs(host, works + scoring)
        task = HumanEvalPlusTask(sandbox=Sandbox(isolate=False, seccomp=False, min_time_limit=0.2))
        scores = task.score([he["HumanEval/2"]] * len(outs), outs, workdir)
        assert [s.correct for s in scores[::2]] == [True] * len(works) + [False] * len(scoring)
        assert all(s.correct for s in scores[1::2])
        assert host.token not in json.dumps([s.detail for s in scores])
        assert not host.sentinel.exists()  # spawn_shell removed it
        host.srv.accept()[0].close()  # network connected
    finally:
        host.srv.close()


def test_wall_clock_budget_kills_the_batch(he, workdir, host):
    outs = outputs(host, ["loop_ignoring_alarm"])
    t0 = time.perf_counter()
    scores = HumanEvalPlusTask(sandbox=Sandbox(wall_timeout_s=4)).score([he["HumanEval/2"]] * 2, outs, workdir)
    assert time.perf_counter() - t0 < 10
    assert all(s.detail == {"base": "timeout", "plus": NOT_RUN, "error": "sandbox wall-clock budget exceeded"}
               for s in scores)


def test_normal_user_without_namespaces_still_contained(host, data_dir):
    """Where the kernel refuses namespaces, a normal user's sandbox still contains time, memory, processes and
    network (alarms and the wall limit, rlimits, seccomp)."""
    if os.geteuid() != 0:
        pytest.skip("the nobody batch starts as root")
    names = ["infinite_loop", "loop_ignoring_alarm", "memory_hog", "fork_bomb", "spawn_shell", "kill_parent",
             "network", "write_outside"]
    got = score_as_nobody(outputs(host, names), data_dir, Sandbox(namespaces=False, min_time_limit=0.2))
    hello = got["hello"]
    assert hello["refused"] is None and hello["namespaces"] == [] and hello["root"] == "host"
    assert hello["uid"] == 65534 and hello["no_new_privs"] == 1  # bounding set: see sandbox._privileged
    assert not any(v for k, v in hello["caps"].items() if k != "CapBnd")
    for name, (correct, detail) in zip(names, got["scores"][::2]):
        base, reason = EXPECTED.get(name, ("fail", RAISED))
        assert not correct and detail == {"base": base, "plus": NOT_RUN, "error": reason}, name
    assert all(correct for correct, _ in got["scores"][1::2])
    assert host.sentinel.read_text() == "keep me" and live_bombs() == 0
    with pytest.raises(BlockingIOError):
        host.srv.accept()
