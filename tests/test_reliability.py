"""Runs that resume identically and never hang, and clear errors before compute: evaluations killed
(SIGKILL) mid-way resume to the records of an uninterrupted run (greedy and sampled); a killed build or
load of the C++ op never blocks the next load; one output folder, one run; bad inputs fail before any
model loads, naming the problem and the fix."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_harness import _overrides, _run, checkpoint, tiny_dir  # noqa: F401  (module fixtures)

KEYS = ("prediction", "extracted", "correct", "tokens", "messages")

# A child that starts every given evaluation in its own thread; each stops for good once its first batch is
# on disk (the parent then SIGKILLs the whole process, mid-run).
KILLED_CHILD = """
import json, os, sys, threading
from tflow.config import load_config
from tflow.evaluate import evaluate
fsync = os.fsync
def stall(fd):
    fsync(fd)
    threading.Event().wait()
os.fsync = stall
for ov in json.loads(sys.argv[1]):
    threading.Thread(target=evaluate, args=(load_config([], ov), [], ov), daemon=True).start()
threading.Event().wait()
"""

# A child that holds a lock file (fcntl.flock, its PID inside, as the package writes it) until it is killed.
HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.pwrite(fd, f"{os.getpid()}\\n".encode(), 0)
for extra in sys.argv[2:]:
    open(extra, "w").close()
print("ready", flush=True)
sys.stdin.read()
"""


def _records(folder) -> dict:
    lines = (folder / "records.jsonl").read_text().splitlines()
    recs = {r["task_id"]: {k: r.get(k) for k in KEYS} for r in map(json.loads, lines)}
    assert len(recs) == len(lines)  # nothing recorded twice
    return recs


def _hold(path, *extra) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), *map(str, extra)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    return child


def _kill(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=30)  # reaps it and closes its pipes


# ---------------------------------------------------------------- resume identically


def test_killed_runs_resume_to_the_records_of_uninterrupted_runs(tiny_dir, data_dir, tmp_path, checkpoint):
    """7 problems in batches of 3, sampled and greedy; TextMAS senders sample too; TFlow's hooks."""
    sampled = {"eval.n": 7, "eval.batch_size": 3, "eval.do_sample": "true", "eval.seed": 5}
    extras = {"single_sampled": ("single", sampled),
              "single_greedy": ("single", {**sampled, "eval.do_sample": "false"}),
              "textmas_sampled": ("textmas", {**sampled, "eval.message_tokens": 5}),
              "tflow_sampled": ("tflow", {**sampled, "eval.checkpoint": checkpoint})}
    runs = {name: lambda out, m=m, e=e: _overrides(tiny_dir, data_dir, out, m, **e) for name, (m, e) in extras.items()}
    log = tmp_path / "child.log"
    with log.open("w") as err:
        child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD,
                                  json.dumps([ov(tmp_path / "killed" / n) for n, ov in runs.items()])],
                                 stdout=subprocess.DEVNULL, stderr=err)
    try:
        straight = {}
        for name, ov in runs.items():  # meanwhile, the uninterrupted runs in this process
            _run(ov(tmp_path / "straight" / name))
            straight[name] = _records(tmp_path / "straight" / name)
        deadline = time.monotonic() + 300
        files = [tmp_path / "killed" / n / "records.jsonl" for n in runs]
        while not all(f.is_file() and f.read_text().count("\n") >= 3 for f in files):
            assert child.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
    finally:
        _kill(child)
    for name, ov in runs.items():
        out = tmp_path / "killed" / name
        assert len(_records(out)) == 3 and (out / ".lock").is_file()  # killed after batch 1; its lock left behind
        m = _run(ov(out))
        assert m["resumed_from"] == 3 and m["n"] == 7 and not (out / ".lock").exists()
        assert _records(out) == straight[name], name
    assert straight["single_sampled"] != straight["single_greedy"]  # the sampler really samples
    msgs = [r["messages"] for r in straight["textmas_sampled"].values()]
    assert all(set(m) == {"strategist", "knowledge_extractor"} for m in msgs)


def test_partly_recorded_batch_and_duplicates_are_redone_whole(tiny_dir, data_dir, tmp_path):
    ov = _overrides(tiny_dir, data_dir, tmp_path / "out", "single", **{"eval.n": 7, "eval.batch_size": 3,
                                                                       "eval.do_sample": "true"})
    _run(ov)
    want = _records(tmp_path / "out")
    path = tmp_path / "out" / "records.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    # batch 1, one record of batch 2 and a torn line of it; then the state two runs writing at once left
    for broken in ("".join(lines[:4]) + lines[4][:20], "".join(lines[:3] * 2 + lines[3:5])):
        path.write_text(broken)
        assert _run(ov)["resumed_from"] == 3
        assert _records(tmp_path / "out") == want


def test_sampling_is_per_row_and_independent_of_batch_neighbours():
    from tflow.methods.base import RowSampler, decoding, row_seed

    assert row_seed(0, "gsm8k/test/1", "receiver") == 950483386754903512  # stable across processes and versions
    assert len({row_seed(s, t, a) for s in (0, 1) for t in ("a", "b") for a in ("receiver", "sender:x")}) == 8
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 50, generator=g) * 2

    def draws(idx, seeds, steps=30):
        sampler = RowSampler(seeds, temperature=0.7, top_p=0.9)
        picks = []
        for _ in range(steps):
            out = sampler(None, rows[idx])
            assert ((out == 0).sum(-1) == 1).all() and (out.isinf().sum(-1) == 49).all()  # one forced token per row
            picks.append(out.argmax(-1))
        return torch.stack(picks, 1)

    together = draws([0, 1, 2], [11, 12, 13])
    assert torch.equal(together[1], draws([1], [12])[0])  # the same row alone, same seed: same tokens
    assert torch.equal(together[2], draws([2, 0], [13, 99])[0])
    assert len(set(together[0].tolist())) > 1  # it samples
    assert "logits_processor" not in decoding(False, 0.6, 0.95, [1])  # greedy stays plain greedy


# ---------------------------------------------------------------- one run per output folder


def test_second_run_on_a_folder_fails_at_once_naming_the_holder(tiny_dir, data_dir, tmp_path, monkeypatch, capsys):
    from tflow import evaluate as ev
    from tflow.errors import BusyError

    out = tmp_path / "out"
    out.mkdir()
    ov = _overrides(tiny_dir, data_dir, out, "single")
    holder = _hold(out / ".lock")
    try:
        with monkeypatch.context() as m:
            m.setattr(ev, "build_method", lambda *a: pytest.fail("a model loaded while another run held the folder"))
            t0 = time.perf_counter()
            with pytest.raises(BusyError, match=f"{re.escape(str(out))}.*PID {holder.pid}"):
                _run(ov)
            with pytest.raises(SystemExit) as exit_:
                ev.main(ov)
            assert exit_.value.code == 2 and f"PID {holder.pid}" in capsys.readouterr().err
            assert time.perf_counter() - t0 < 30  # at once (generous: a loaded CI machine)
    finally:
        _kill(holder)
    assert _run(ov)["n"] == 5  # the dead holder's lock is no obstacle
    assert len(_records(out)) == 5 and not (out / ".lock").exists()


# ---------------------------------------------------------------- the C++ op: no lock once built, bounded waits


@pytest.fixture
def built_copy(tmp_path):
    """A copy of the built cpu_fused op's build folder (built here first if needed), and its name and flags."""
    from tflow_kernels import cpu_fused

    cpu_fused.extension()
    flags = cpu_fused._cpu_flags()
    name = "tflow_lora_cpu_" + ("avx2" if flags else "generic")
    build = tmp_path / "build"
    shutil.copytree(cpu_fused.build_directory(name), build)
    return build, name, flags


def test_built_op_loads_while_every_lock_is_held(built_copy):
    from tflow_kernels.cpu_fused import BUILD_LOCK, load_op

    build, name, flags = built_copy
    holder = _hold(build / BUILD_LOCK, build / "lock")  # our lock held by a live process, torch's baton left
    try:
        assert hasattr(load_op(build, name, flags, wait_s=0), "lora_add_")  # any wait for a lock would raise
    finally:
        _kill(holder)


def test_build_lock_wait_is_bounded_and_a_dead_holders_lock_is_broken_at_once(tmp_path):
    from tflow_kernels.cpu_fused import BUILD_LOCK, build_lock

    holder = _hold(tmp_path / BUILD_LOCK)
    t0 = time.perf_counter()
    with pytest.raises(TimeoutError, match=re.escape(f"{tmp_path / BUILD_LOCK}, held by PID {holder.pid}")):
        with build_lock(tmp_path, wait_s=0.5):
            pass
    assert time.perf_counter() - t0 < 30  # bounded (generous: a loaded CI machine)
    _kill(holder)
    with build_lock(tmp_path, wait_s=0):  # the dead holder's lock is free at once
        assert (tmp_path / BUILD_LOCK).read_text() == f"{os.getpid()}\n"


def test_load_after_a_build_killed_midway(built_copy):
    """A build SIGKILLed while it held the build lock and torch's baton (no stamp: it never finished): the next
    load takes the lock at once, drops the baton, lets torch's loader resume the build and stamps it."""
    from tflow_kernels.cpu_fused import BUILD_LOCK

    build, name, flags = built_copy
    (build / f"{name}.stamp").unlink()
    _kill(_hold(build / BUILD_LOCK, build / "lock"))
    code = ("import sys; from pathlib import Path; from tflow_kernels.cpu_fused import load_op; "
            "assert load_op(Path(sys.argv[1]), sys.argv[2], sys.argv[3:], wait_s=0).lora_add_")
    res = subprocess.run([sys.executable, "-c", code, str(build), name, *flags], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert (build / f"{name}.stamp").is_file() and not (build / "lock").exists()


# ---------------------------------------------------------------- clear errors before compute


@pytest.fixture
def no_models(monkeypatch):
    """Any backbone load fails the test."""
    import tflow.infer
    import tflow.models

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(tflow.infer, "load_backbones", refuse)
    monkeypatch.setattr(tflow.models, "load_backbones", refuse)


def _cli_error(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and "Traceback" not in err
    return err


@pytest.mark.parametrize("content, args, message", [
    (None, ["--question", ""], "--question is empty"),
    (None, ["--question", "  "], "--question is empty"),
    (b"", [], "holds no questions"),
    (b"\n  \n", [], "holds no questions"),
    (b'{"question": "a"}\n\xff\xfe\n', [], r"not UTF-8 text \(byte 18, line 2\)"),
    (b'{"question": "a"}\n{"q": "b"}\n', [], "line 2: no non-empty string field 'question'"),
    (b'{"question": "a"}\n\n{"question": \n', [], "line 3: not JSON"),
    (b'["a"]\n', [], "line 1: no non-empty string field"),
    (None, ["--questions", "missing.jsonl"], "file not found"),
    (None, ["--question", "q", "--batch-size", "0"], "--batch-size"),
])
def test_infer_checks_its_inputs_before_reading_the_checkpoint_or_loading_models(
        tmp_path, capsys, no_models, content, args, message):
    from tflow.infer import main

    if content is not None:
        (tmp_path / "q.jsonl").write_bytes(content)
        args = ["--questions", str(tmp_path / "q.jsonl")]
    args = [a if a != "missing.jsonl" else str(tmp_path / a) for a in args]
    err = _cli_error(main, ["--checkpoint", str(tmp_path / "no.pt"), *args], capsys)  # the checkpoint is never read
    assert re.search(message, err), err


def test_truncated_checkpoint_and_marker_are_checkpoint_errors(tmp_path, checkpoint, capsys, no_models):
    from tflow.errors import CheckpointError
    from tflow.infer import main
    from tflow.methods.base import TRAINED_MARKER, trained_hash
    from tflow.pipeline import read_checkpoint

    bad = tmp_path / "generator.pt"
    data = checkpoint.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{re.escape(str(bad))} cannot be read .*truncated or corrupt"):
        read_checkpoint(bad)
    assert str(bad) in _cli_error(main, ["--checkpoint", str(bad), "--question", "q"], capsys)
    (tmp_path / TRAINED_MARKER).write_text('{"method": "static_lo')
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / TRAINED_MARKER} is unreadable")):
        trained_hash(tmp_path)


def test_mismatched_checkpoint_fails_before_the_backbones_load(tmp_path, checkpoint, capsys, no_models):
    from tflow.infer import main

    for override, message in [("lora.rank=8", "lora.rank: checkpoint 4 vs run 8"),
                              (f"model.receiver.name={tmp_path / 'other-llama'}",
                               "receiver.ident: checkpoint 'path:tiny-llama' vs configured 'path:other-llama'")]:
        err = _cli_error(main, ["--checkpoint", str(checkpoint), "--question", "q", override], capsys)
        assert "does not fit this run" in err and message in err, err


def test_train_without_its_data_writes_nothing(tmp_path, capsys):
    from tflow.train import main

    out = tmp_path / "run"
    err = _cli_error(main, ["--no-progress", f"train.out_dir={out}", f"data.data_dir={tmp_path / 'nodata'}"], capsys)
    assert "not found" in err and "data.data_dir" in err and not out.exists()
