"""GSM8K test (1319): final-number extraction (last \\boxed{} first, else the last number) and exact
numeric scoring (thousands separators, currency, percent, fractions and decimals normalised).

Offline: `<data_dir>/gsm8k/test.jsonl` (openai/grade-school-math). Hub: `openai/gsm8k` (main, test).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

from tflow.data import gsm8k_solution, last_boxed, load_gsm8k
from tflow.errors import ConfigError, DataError
from tflow.tasks.base import EvalProblem, Score

INSTRUCTION = "Solve step by step and put the final answer (a number) in \\boxed{}."
HUB_ID = "openai/gsm8k"
MAX_ANSWER_CHARS = 200  # a "number" longer than this is not an answer

# a number: optional sign and $, "1,234,567" (groups of three) or plain digits, optional decimals
_NUMBER = re.compile(r"-?\\?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
_FRAC = re.compile(r"(-?)\\[dt]?frac\{?(-?\d+)\}?\{?(-?\d+)\}?")
_PLAIN = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?")
_NOISE = re.compile(r"\\text\{[^{}]*\}|\\mathrm\{[^{}]*\}|\\[,!;: ]|\\?\$|\\?%|\\left|\\right|[\s,]")


def _to_number(text: str) -> Fraction | None:
    """`text` as an exact number ("1,000", "$18.00", "\\frac{3}{4}", "-3/4", "50%"), else None."""
    if len(text) > MAX_ANSWER_CHARS:
        return None
    s = text.replace("\u2212", "-").replace("{,}", ",").replace("\\dfrac", "\\frac")
    s = _NOISE.sub("", s).rstrip(".")
    s = s[1:-1] if s[:1] == "{" and s[-1:] == "}" else s
    m = _FRAC.fullmatch(s)
    if m:
        num, den = int(m.group(2)), int(m.group(3))
        return None if den == 0 else Fraction(-num if m.group(1) else num, den)
    if not _PLAIN.fullmatch(s):  # no exponents, no "inf"/"nan": Fraction("1e999999999") would not finish
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(text: str) -> str | None:
    """The predicted final answer as a string, or None when the output has no number."""
    if not isinstance(text, str):
        return None
    text = text.replace("\u2212", "-").replace("{,}", ",")
    boxed = last_boxed(text)
    if boxed is not None:
        if _to_number(boxed) is not None:
            return boxed.strip()
        frac = _FRAC.search(boxed)
        if frac:
            return frac.group(0)
        nums = _NUMBER.findall(boxed)
        if nums:
            return nums[-1]
    nums = _NUMBER.findall(text)
    return nums[-1] if nums else None


def is_correct(pred: str | None, gold: str) -> bool:
    """Exact numeric equality of the prediction and the gold answer."""
    if pred is None:
        return False
    a, b = _to_number(pred), _to_number(gold)
    return a is not None and b is not None and a == b


def _check_source(source: str, name: str) -> None:
    if source not in ("offline", "hub"):
        raise ConfigError(f"unknown source {source!r} for {name}; use 'offline' or 'hub'")


@dataclass
class GSM8KTask:
    name: str = "gsm8k"

    def load(self, data_dir: str | Path, source: str = "offline") -> tuple[list[EvalProblem], dict[str, Any]]:
        """The 1319 test problems; gold = the number after '####'."""
        _check_source(source, self.name)
        if source == "offline":
            rows, info = load_gsm8k(data_dir, "test")
            problems = [EvalProblem(p.id, p.question, p.answer, {"solution": p.solution}) for p in rows]
            prov = {"source": "offline", **info}
        else:
            try:
                import datasets
            except ImportError as err:
                raise DataError("source 'hub' needs: pip install datasets (or use source 'offline')") from err
            ds = datasets.load_dataset(HUB_ID, "main", split="test")
            problems = [EvalProblem(f"gsm8k/test/{i}", row["question"].strip(), gsm8k_solution(row["answer"])[1],
                                    {"solution": gsm8k_solution(row["answer"])[0]}) for i, row in enumerate(ds)]
            prov = {"source": "hub", "path": HUB_ID, "version": f"{HUB_ID}@{getattr(ds, '_fingerprint', 'unknown')}"}
        return problems, {**prov, "count": len(problems)}

    def prompt(self, problem: EvalProblem) -> str:
        return f"{problem.question}\n\n{INSTRUCTION}"

    def sender_view(self, problem: EvalProblem) -> str:
        return problem.question

    def reference(self, problem: EvalProblem) -> str | None:
        return problem.meta.get("solution")  # the worked steps, ending "The final answer is $\\boxed{N}$."

    def score(self, problems: Sequence[EvalProblem], outputs: Sequence[str], workdir: str | Path) -> list[Score]:
        scores = []
        for problem, output in zip(problems, outputs, strict=True):
            try:
                pred = extract_answer(output)
                ok = is_correct(pred, problem.gold)
                detail: dict[str, Any] = {} if pred is not None else {"reason": "no number in output"}
            except Exception as err:  # never let one malformed output stop a run
                pred, ok, detail = None, False, {"reason": f"scoring error: {type(err).__name__}: {err}"}
            scores.append(Score(pred, ok, detail))
        return scores


TASK = GSM8KTask()
