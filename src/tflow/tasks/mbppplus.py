"""MBPP+ (evalplus), scored by evalplus's base and plus tests in the code sandbox.

Offline: `<data_dir>/mbppplus/MbppPlus-prerelease.jsonl.gz`, the first published MBPP+ (Nov 2023, 399
problems, close to v0.1.0). Hub: evalplus's current release (v0.2.0, 378 problems). The pre-release
prompt is the bare description; the question adds the first test assertion, as v0.2.0's prompts do,
so the model learns the function's name and signature.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tflow.errors import ConfigError
from tflow.tasks.base import EvalProblem, Score
from tflow.tasks.code import (Sandbox, code_prompt, code_reference, make_problems, read_source_commit, require_file, score_code,
                              scorer)

DATASET = "mbpp"
OFFLINE_VERSION = "MBPP+ pre-release (Nov 2023)"


def question(rec: dict[str, Any]) -> str:
    """The problem as evalplus v0.2.0 phrases it: description plus one example assertion in a docstring."""
    text = rec["prompt"].strip().strip("'\"").strip()
    if "assert" not in text:
        asserts = [ln.strip() for ln in rec.get("assertion", "").splitlines() if ln.strip().startswith("assert")]
        example = asserts[0] if asserts else ""
        text = f"{text}\n{example}".strip()
    return f'"""\n{text}\n"""\n'


@dataclass
class MbppPlusTask:
    sandbox: Sandbox = field(default_factory=Sandbox)
    name: str = "mbppplus"

    def load(self, data_dir: str | Path, source: str = "offline") -> tuple[list[EvalProblem], dict[str, Any]]:
        if source == "offline":
            folder = Path(data_dir) / "mbppplus"
            path = str(require_file(folder / "MbppPlus-prerelease.jsonl.gz", "MBPP+ (pre-release)"))
            info = {"source": "offline", "version": OFFLINE_VERSION, "source_commit": read_source_commit(folder)}
        elif source == "hub":
            from evalplus.data.mbpp import MBPP_PLUS_VERSION, _ready_mbpp_plus_path  # downloads into evalplus's cache

            path = _ready_mbpp_plus_path()
            info = {"source": "hub", "version": f"MBPP+ {MBPP_PLUS_VERSION}", "source_commit": None}
        else:
            raise ConfigError(f"unknown source {source!r} for {self.name}; use 'offline' or 'hub'")
        problems = make_problems(DATASET, path, question)
        return problems, {**info, "path": path, "count": len(problems), "scorer": scorer()}

    def prompt(self, problem: EvalProblem) -> str:
        """evalplus's chat instruction around the problem docstring."""
        return code_prompt(problem)

    def sender_view(self, problem: EvalProblem) -> str:
        return problem.question  # the description and an example assertion (name and signature)

    def reference(self, problem: EvalProblem) -> str | None:
        return code_reference(problem, with_prompt=False)

    def score(self, problems: Sequence[EvalProblem], outputs: Sequence[str], workdir: str | Path) -> list[Score]:
        return score_code(DATASET, problems, outputs, workdir, self.sandbox)


TASK = MbppPlusTask()
