"""Trusted scoring of code samples: evalplus 0.3.1's verdicts, computed where no model code runs.

The harness (`evaluate`) starts a judge (`judge_main`, a fresh interpreter) per batch and reads back only verdict
rows, each checked (`_row`). The judge starts the sandbox runner first (no process that runs model code is ever
forked from one holding expected outputs), computes missing ground truth in a throwaway process (`gt_main`:
evalplus's trusted_exec on the canonical solutions, cached as plain data, mode 0600), then per sample runs the
base tests and, when they pass, the plus tests in the sandbox. Each output arrives as plain data and is compared
as evalplus's unsafe_execute does (`_same`: exact match, the special oracles, its float tolerance), and the check
is stopped at the first failure (fast_check). Expected outputs, the comparison and the verdict never enter the
sandbox. Deliberate differences: oracles that read the input (find_zero, surface_Area, digit_distance_nums) see
the input as given, not as the program may have mutated it; the find_zero pass is recorded (upstream's fix of
0.3.1's `continue`); an output that is not plain data fails (evalplus would compare, e.g., a numpy int).
Records carry only the verdict enums and fixed reasons. A judge that dies or stalls costs the sample it was
scoring (`error`); a new judge takes the rest.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import resource
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tflow.tasks.plain import NotPlain, dumps_plain, loads_plain
from tflow.tasks.sandbox import (LENGTH, LOCKSTEP_BYTES, UNAVAILABLE, Runner, Sandbox, SandboxLost,
                                 require_platform, sandbox_env)

log = logging.getLogger(__name__)
NOT_RUN = "skipped"  # plus status when base did not pass (base AND plus decides correctness, as in evalplus)
STATUSES = ("pass", "fail", "timeout", "error")
WRONG, LOAD, RAISED, SLOW, NOT_PLAIN = ("wrong output", "the program failed to load", "the program raised an exception",
                                       "an input exceeded its time limit", "an output is not plain data")
MALFORMED, TOO_BIG, WALL, ENDED = ("malformed result stream", "outputs over the size limit",
                                   "the check exceeded its wall-clock limit", "the check ended before all inputs ran")
SETUP, LOST, JUDGE_LOST, NO_GT, BUDGET = ("sandbox setup failed", "sandbox process lost", "judge process lost",
                                          "ground truth failed", "sandbox wall-clock budget exceeded")
REASONS = frozenset((WRONG, LOAD, RAISED, SLOW, NOT_PLAIN, MALFORMED, TOO_BIG, WALL, ENDED, SETUP, LOST, JUDGE_LOST,
                     NO_GT, BUDGET, *UNAVAILABLE))


# ----------------------------------------------------------------------------- harness side
def evaluate(dataset: str, records: dict[str, dict], samples: list[tuple[str, str]], gt_dir: Path,
             box: Sandbox) -> list[dict[str, Any]]:
    """Score (task_id, code) samples: one {"base", "plus", "error"} per sample."""
    require_platform(box)
    deadline = time.monotonic() + box.wall_timeout_s if box.wall_timeout_s else math.inf
    rows: list[dict[str, Any]] = []
    while len(rows) < len(samples):
        rows += _judge(dataset, records, samples, len(rows), gt_dir, box, deadline)
        if len(rows) < len(samples):
            late = time.monotonic() >= deadline
            rows += [{"base": "timeout" if late else "error", "plus": NOT_RUN, "error": BUDGET if late else JUDGE_LOST}]
            rows += [rows[-1]] * (len(samples) - len(rows)) if late else []
    return rows


def _judge(dataset: str, records: dict[str, dict], samples: list[tuple[str, str]], start: int, gt_dir: Path,
           box: Sandbox, deadline: float) -> list[dict[str, Any]]:
    """Run one judge on samples[start:]; the rows it delivered before it finished, died or stalled."""
    todo = samples[start:]
    with tempfile.TemporaryDirectory(prefix="tflow-judge-") as tmp:  # the judge's, runner's and ground truth's
        os.chmod(tmp, 0o711)  # a runner that became nobody without namespaces works in a folder inside
        job = {"dataset": dataset, "records": {t: records[t] for t, _ in todo}, "samples": todo, "start": start,
               "gt_dir": str(gt_dir), "box": asdict(box), "tmp": tmp}
        proc = subprocess.Popen([sys.executable, "-c", "from tflow.tasks.judge import judge_main; judge_main()"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        try:
            rows = _rows(proc, job, box, deadline)
            if len(rows) == len(todo):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=30)  # a judge that delivered everything closes its runner and leaves
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
    return rows


def _rows(proc: subprocess.Popen, job: dict[str, Any], box: Sandbox, deadline: float) -> list[dict[str, Any]]:
    """Send the job; read the judge's lines until every row came, or it died, stalled or sent a bad one."""
    rows: list[dict[str, Any]] = []
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.write(pickle.dumps(job))
        proc.stdin.close()
    lines, due = _Lines(proc.stdout.fileno()), time.monotonic() + box.gt_timeout_s + box.sample_timeout_s
    while len(rows) < len(job["samples"]):
        obj = _json(lines.next(min(due, deadline)))
        if isinstance(obj, dict) and set(obj) == {"gt"} and isinstance(obj["gt"], dict):
            log.info("evalplus ground truth: %s tasks computed in %ss", obj["gt"].get("computed"),
                     obj["gt"].get("seconds"))
        elif isinstance(obj, dict) and set(obj) == {"sandbox"}:
            log.info("code sandbox: %s", json.dumps(obj["sandbox"])[:400])
        elif (row := _row(obj, job["start"] + len(rows))) is not None:
            rows.append(row)
        else:
            break
        due = time.monotonic() + box.sample_timeout_s
    return rows


def _row(obj: Any, i: int) -> dict[str, Any] | None:
    """A verdict row from the judge, only if every value is one it may send."""
    if not (isinstance(obj, dict) and set(obj) == {"i", "base", "plus", "error"} and type(obj["i"]) is int
            and obj["i"] == i and obj["base"] in STATUSES and obj["plus"] in (*STATUSES, NOT_RUN)
            and (obj["error"] is None or isinstance(obj["error"], str) and obj["error"] in REASONS)):
        return None
    if (obj["plus"] != NOT_RUN) != (obj["base"] == "pass") or (obj["error"] is None) != (obj["plus"] == "pass"):
        return None
    return {k: obj[k] for k in ("base", "plus", "error")}


def _json(line: bytes | None) -> Any:
    try:
        return json.loads(line) if line else None
    except ValueError:
        return None


class _Lines:
    """Lines from a pipe, each within a deadline and at most 64 KiB."""

    def __init__(self, fd: int) -> None:
        self.fd, self.buf = fd, b""

    def next(self, deadline: float) -> bytes | None:
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if len(self.buf) > 1 << 16 or left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return None
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line


# ----------------------------------------------------------------------------- the judge process
def judge_main() -> None:
    """The judge: runner first, then ground truth, then one verdict row per sample on stdout."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # nothing else reaches the harness's pipe
    job = pickle.load(sys.stdin.buffer)  # from the harness (trusted)
    tempfile.tempdir = job["tmp"]  # the harness removes it, whatever happens to this process
    box = Sandbox(**job["box"])
    resource.setrlimit(resource.RLIMIT_AS, (box.judge_memory_bytes,) * 2)

    def emit(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    gt_dir = Path(job["gt_dir"])
    gt_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # before the runner starts: it hides this folder
    runner = _start(box, gt_dir)
    try:
        t0 = time.monotonic()
        computed = _ground_truth(job["dataset"], job["records"], gt_dir, box)
        emit({"gt": {"computed": computed, "seconds": round(time.monotonic() - t0, 1)}})
        emit({"sandbox": runner.hello if isinstance(runner, Runner) else {"refused": runner}})
        gt: tuple[str, dict | None] = ("", None)
        for i, (task_id, code) in enumerate(job["samples"], start=job["start"]):
            if gt[0] != task_id:
                gt = (task_id, _load_gt(gt_dir, task_id, job["records"][task_id]))
            if gt[1] is None or not isinstance(runner, Runner):
                row = {"base": "error", "plus": NOT_RUN, "error": NO_GT if gt[1] is None else runner}
            else:
                row, runner = _score(runner, job["dataset"], job["records"][task_id], code, gt[1], box, gt_dir)
            emit({"i": i, **row})
    finally:
        if isinstance(runner, Runner):
            runner.close()


def _start(box: Sandbox, gt_dir: Path) -> Runner | str:
    """A runner ready for samples, or the fixed reason why there is none."""
    try:
        runner = Runner(box, hide=[gt_dir])
    except SandboxLost:
        return LOST
    if runner.hello["refused"] is not None:
        runner.close()
        return runner.hello["refused"]
    return runner


def _score(runner: Runner, dataset: str, rec: dict[str, Any], code: str, gt: dict[str, Any], box: Sandbox,
           gt_dir: Path) -> tuple[dict[str, Any], Runner | str]:
    """Base, then plus when base passed; the row and the runner for the next sample."""
    row: dict[str, Any] = {"base": "error", "plus": NOT_RUN, "error": None}
    for which in ("base", "plus"):
        try:
            row[which], row["error"] = _check(runner, dataset, rec, code, which, gt, box)
        except SandboxLost:
            runner.close()
            row[which], row["error"] = "error", LOST
            return row, _start(box, gt_dir)
        if row[which] != "pass":
            break
    return row, runner


def _check(runner: Runner, dataset: str, rec: dict[str, Any], code: str, which: str, gt: dict[str, Any],
           box: Sandbox) -> tuple[str, str | None]:
    from evalplus.eval._special_oracle import MBPP_OUTPUT_NOT_NONE_TASKS

    limits = [max(box.min_time_limit, box.gt_time_limit_factor * t) for t in gt[f"{which}_time"]]
    wall = min(box.timeout_per_task_s, sum(limits)) + 2  # untrusted_check: join(min(60, sum) + 1 + 1)
    ep = rec["entry_point"]
    verdict = _Verdict(dataset, ep, rec[f"{which}_input"], gt[which], rec["atol"], box.max_output_bytes)
    request = {"code": code, "entry_point": ep, "inputs": rec[f"{which}_input"], "limits": limits,
               "not_none": dataset == "mbpp" and ep in MBPP_OUTPUT_NOT_NONE_TASKS}
    return verdict.finish(runner.run(request, wall, verdict.feed))


_ENDS = {b"e": RAISED, b"t": SLOW, b"b": NOT_PLAIN}


class _Verdict:
    """evalplus's verdict on one check, from its record stream as the chunks arrive (see sandbox._execute)."""

    def __init__(self, dataset: str, entry_point: str, inputs: list, expected: list, atol: float, cap: int) -> None:
        self.dataset, self.entry_point, self.atol = dataset, entry_point, atol
        self.inputs, self.expected = inputs, expected
        self.cap, self.buf, self.stage, self.done, self.large = cap, bytearray(), "start", 0, 0
        self.result: tuple[str, str | None] | None = None

    def feed(self, chunk: bytes) -> tuple[bool, int]:
        """Take a chunk: (the verdict is a failure, so the check may stop; large outputs it accepted, for which
        the check process waits)."""
        self.buf += chunk
        before = self.large
        while self.result is None and len(self.buf) >= 1 + LENGTH.size:
            n = LENGTH.unpack_from(self.buf, 1)[0]
            if n > self.cap:
                self.result = ("fail", MALFORMED)
            elif len(self.buf) >= 1 + LENGTH.size + n:
                tag, payload = bytes(self.buf[:1]), bytes(self.buf[1 + LENGTH.size:1 + LENGTH.size + n])
                del self.buf[:1 + LENGTH.size + n]
                self._record(tag, payload)
            else:
                break
        return self.result is not None, self.large - before

    def _record(self, tag: bytes, payload: bytes) -> None:
        if tag == b"o" and self.stage == "run" and self.done < len(self.inputs):
            self._output(payload)
        elif payload:
            self.result = ("fail", MALFORMED)
        elif (self.stage, tag) == ("start", b"r"):
            self.stage = "load"
        elif (self.stage, tag) == ("load", b"x"):
            self.stage = "run"
        elif (self.stage, tag) == ("load", b"X"):
            self.result = ("fail", LOAD)
        elif self.stage == "run" and tag in _ENDS:
            self.result = ("fail", _ENDS[tag])
        else:
            self.result = ("fail", MALFORMED)

    def _output(self, payload: bytes) -> None:
        try:
            out = loads_plain(payload)
        except Exception:  # noqa: BLE001 - not plain data (NotPlain) or not a pickle at all
            self.result = ("fail", NOT_PLAIN)
            return
        i = self.done
        try:
            ok, self.atol = _same(self.dataset, self.entry_point, self.inputs[i], out, self.expected[i], self.atol)
        except Exception:  # noqa: BLE001 - evalplus: an exception in the comparison fails the input
            ok = False
        self.done += 1
        self.large += len(payload) >= LOCKSTEP_BYTES
        if not ok:
            self.result = ("fail", WRONG)

    def finish(self, end: dict[str, bool]) -> tuple[str, str | None]:
        """The verdict once the check has ended (evalplus: a process that ends without one timed out)."""
        if self.result is not None:
            return self.result
        if end["overflow"]:
            return "fail", TOO_BIG
        if self.buf and not end["killed"]:
            return "fail", MALFORMED
        if self.stage == "start":
            return "error", SETUP
        if self.stage == "run" and self.done == len(self.inputs):
            return "pass", None
        return "timeout", WALL if end["killed"] else ENDED


def _same(dataset: str, entry_point: str, inp: list, out: Any, exp: Any, atol: float) -> tuple[bool, float]:
    """evalplus 0.3.1's check of one output (unsafe_execute), on plain data; (passed, atol for later inputs)."""
    import numpy as np
    from evalplus.eval import is_floats
    from evalplus.eval._special_oracle import (MBPP_OUTPUT_NOT_NONE_TASKS, MBPP_OUTPUT_SET_EQ_TASKS,
                                               _digit_distance_nums, _poly, _surface_Area)

    exact = out == exp
    if dataset == "mbpp":
        if entry_point == "are_equivalent":  # Mbpp/164
            exact = True
        elif entry_point == "sum_div":  # Mbpp/295
            exact = exact or out == 0
        elif entry_point == "surface_Area":  # Mbpp/581
            exact = exact or abs(out - _surface_Area(*inp)) <= atol
        elif entry_point == "digit_distance_nums":  # Mbpp/558
            exact = exact or out == _digit_distance_nums(*inp)
        elif entry_point in MBPP_OUTPUT_SET_EQ_TASKS:
            _bounded(out, exp)
            exact = set(out) == set(exp)
        elif entry_point in MBPP_OUTPUT_NOT_NONE_TASKS:
            exact = out == exp if isinstance(out, bool) else exp == (out is not None)
    if dataset == "humaneval" and entry_point == "find_zero":
        return abs(_poly(*inp, out)) <= atol, atol
    if atol == 0 and is_floats(exp):
        atol = 1e-6  # evalplus: enforce a tolerance for floats (and keep it for the later inputs)
    if not exact and atol != 0:
        if type(out) != type(exp) or isinstance(exp, (list, tuple)) and len(out) != len(exp):  # noqa: E721
            return False, atol
        _bounded(out, exp)
        return bool(np.allclose(out, exp, rtol=1e-07, atol=atol)), atol
    return bool(exact), atol


def _bounded(out: Any, exp: Any) -> None:
    """Refuse an output whose tree (shared parts counted each time, as set() and numpy walk it) is far larger or
    deeper than the expected one: a few pickled bytes can describe an exponential tree."""
    _tree_size(out, 4 * _tree_size(exp, math.inf) + 10_000)


def _tree_size(x: Any, limit: float, max_depth: int = 100) -> int:
    todo, n = [(x, 0)], 0
    while todo:
        y, depth = todo.pop()
        n += 1
        if n > limit or depth > max_depth:
            raise ValueError("output too large to compare")
        if type(y) in (list, tuple, set, frozenset):
            todo += [(z, depth + 1) for z in y]
        elif type(y) is dict:
            todo += [(z, depth + 1) for kv in y.items() for z in kv]
    return n


# ----------------------------------------------------------------------------- ground truth
def _gt_file(gt_dir: Path, task_id: str) -> Path:
    return gt_dir / (task_id.replace("/", "_") + ".gt")


def _ground_truth(dataset: str, records: dict[str, dict], gt_dir: Path, box: Sandbox) -> int:
    """Compute the missing ground truth in a throwaway process; how many tasks it computed."""
    missing = {t: r for t, r in records.items() if not _gt_file(gt_dir, t).is_file()}
    if missing:
        with tempfile.TemporaryDirectory(prefix="tflow-gt-") as tmp:
            proc = subprocess.Popen([sys.executable, "-c", "from tflow.tasks.judge import gt_main; gt_main()"],
                                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, cwd=tmp, env=sandbox_env(tmp))
            try:
                proc.communicate(pickle.dumps({"dataset": dataset, "records": missing, "gt_dir": str(gt_dir)}),
                                 timeout=box.gt_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return sum(_gt_file(gt_dir, t).is_file() for t in missing)


def _load_gt(gt_dir: Path, task_id: str, rec: dict[str, Any]) -> dict[str, Any] | None:
    """The cached ground truth of a task, if it is there and well formed."""
    try:
        gt = loads_plain(_gt_file(gt_dir, task_id).read_bytes())
    except (OSError, NotPlain, pickle.UnpicklingError, EOFError, ValueError):
        return None
    ok = isinstance(gt, dict) and all(
        isinstance(gt.get(k), list) and isinstance(gt.get(f"{k}_time"), list)
        and len(gt[k]) == len(gt[f"{k}_time"]) == len(rec[f"{k}_input"]) for k in ("base", "plus"))
    return gt if ok else None


def gt_main() -> None:
    """The ground-truth process: evalplus's trusted_exec on each canonical solution, written as plain data."""
    from evalplus.eval._special_oracle import MBPP_OUTPUT_NOT_NONE_TASKS
    from evalplus.gen.util import trusted_exec

    job = pickle.load(sys.stdin.buffer)
    for task_id, rec in job["records"].items():
        nn = job["dataset"] == "mbpp" and rec["entry_point"] in MBPP_OUTPUT_NOT_NONE_TASKS
        out: dict[str, Any] = {}
        try:
            for k in ("base", "plus"):
                out[k], out[f"{k}_time"] = trusted_exec(rec["prompt"] + rec["canonical_solution"], rec[f"{k}_input"],
                                                        rec["entry_point"], record_time=True, output_not_none=nn)
            data = dumps_plain(out)
        except Exception as err:  # noqa: BLE001 - the task's samples score error
            print(f"ground truth failed for {task_id}: {type(err).__name__}", file=sys.stderr)
            continue
        path = _gt_file(Path(job["gt_dir"]), task_id)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
