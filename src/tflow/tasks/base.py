"""The benchmark interface: every task module provides load, prompt and score.

A task turns a data source into `EvalProblem`s, writes the receiver's instruction for one problem,
and scores a batch of model outputs (batch, because code tasks run one sandboxed evaluation over
all samples). Scoring never raises on malformed model output: such an output scores as wrong with
the reason in `Score.detail`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

from tflow.errors import ConfigError


@dataclass(frozen=True)
class EvalProblem:
    task_id: str  # unique within its task, e.g. "gsm8k/test/17", "HumanEval/0", "mmlu-redux/anatomy/3"
    question: str  # what every agent is shown (the problem statement, without answer-format instructions)
    gold: str  # the reference answer as a string ("" for code tasks: their tests are the reference)
    meta: dict[str, Any] = field(default_factory=dict, compare=False)  # task-specific (choices, entry point, ...)
    view: str = ""  # what the senders read (Task.sender_view; set by the harness), "" = the question

    @property
    def sender_view(self) -> str:
        return self.view or self.question


@dataclass(frozen=True)
class Score:
    extracted: str | None  # the answer read from the output (None: nothing extractable)
    correct: bool  # the task's headline correctness (code: plus tests passed, i.e. pass@1 on "plus")
    detail: dict[str, Any] = field(default_factory=dict)  # e.g. {"base": "pass", "plus": "fail"} for code


class Task(Protocol):
    name: str  # registry key, e.g. "gsm8k"

    def load(self, data_dir: str | Path, source: str = "offline") -> tuple[list[EvalProblem], dict[str, Any]]:
        """All problems of the evaluation set, in a fixed order, and their provenance
        ({"source", "version", "path", "count", ...}). `source`: "offline" (the default, no network) or
        "hub" (datasets / evalplus downloads). A missing source raises DataError naming the fix;
        never falls back to another set."""
        ...

    def prompt(self, problem: EvalProblem) -> str:
        """The receiver's user message: the question plus the task's answer-format instruction."""
        ...

    def sender_view(self, problem: EvalProblem) -> str:
        """What every sender reads (TextMAS, TFlow and its controls, the latent comparators): the problem as
        the release shows it to its senders, without the receiver's answer-format instruction."""
        ...

    def score(self, problems: Sequence[EvalProblem], outputs: Sequence[str], workdir: str | Path) -> list[Score]:
        """One Score per (problem, output). `workdir` is a scratch folder the task may use."""
        ...

    def reference(self, problem: EvalProblem) -> str | None:
        """The problem's reference solution formatted as the receiver is asked to answer (the held-out
        family scores it teacher-forced); None when the task has none (multiple choice)."""
        ...


def code_block(code: str) -> str:
    """A code training target: the solution in one python block, as the code tasks ask for it."""
    return f"```python\n{code.replace(chr(13) + chr(10), chr(10)).strip()}\n```"


def subset(problems: Sequence[EvalProblem], n: int | None, seed: int) -> list[EvalProblem]:
    """A deterministic subset of n problems (all when n is None or >= len), in the set's own order."""
    if n is None or n >= len(problems):
        return list(problems)
    if n <= 0:
        raise ConfigError(f"subset size must be positive, got {n}")
    keep = sorted(random.Random(seed).sample(range(len(problems)), n))
    return [problems[i] for i in keep]
