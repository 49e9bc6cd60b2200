"""HumanEval+ (evalplus): 164 problems, scored by evalplus's base and plus tests in the code sandbox.

Offline: `<data_dir>/humanevalplus/HumanEvalPlus.jsonl.gz` (v0.1.10; `mini=True` reads HumanEvalPlus-Mini,
the same problems with a reduced plus test set). Hub: evalplus's own download of the same release.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tflow.errors import ConfigError
from tflow.tasks.base import EvalProblem, Score
from tflow.tasks.code import (Sandbox, code_prompt, code_reference, make_problems, read_source_commit, require_file, score_code,
                              scorer)

DATASET = "humaneval"
VERSION = "v0.1.10"


@dataclass
class HumanEvalPlusTask:
    mini: bool = False
    sandbox: Sandbox = field(default_factory=Sandbox)
    name: str = "humanevalplus"

    def _locate(self, data_dir: str | Path, source: str) -> tuple[str, dict[str, Any]]:
        suffix = "-Mini" if self.mini else ""
        if source == "offline":
            folder = Path(data_dir) / "humanevalplus"
            path = require_file(folder / f"HumanEvalPlus{suffix}.jsonl.gz", f"HumanEval+{suffix}")
            return str(path), {"source": "offline", "source_commit": read_source_commit(folder)}
        if source == "hub":
            from evalplus.data.humaneval import _ready_human_eval_plus_path  # downloads into evalplus's cache

            return _ready_human_eval_plus_path(mini=self.mini), {"source": "hub", "source_commit": None}
        raise ConfigError(f"unknown source {source!r} for {self.name}; use 'offline' or 'hub'")

    def load(self, data_dir: str | Path, source: str = "offline") -> tuple[list[EvalProblem], dict[str, Any]]:
        path, info = self._locate(data_dir, source)
        problems = make_problems(DATASET, path, lambda r: r["prompt"])
        version = f"HumanEval+{'-Mini' if self.mini else ''} {VERSION}"
        return problems, {**info, "version": version, "path": path, "count": len(problems), "scorer": scorer()}

    def prompt(self, problem: EvalProblem) -> str:
        """evalplus's chat instruction around the function signature and docstring."""
        return code_prompt(problem)

    def sender_view(self, problem: EvalProblem) -> str:
        return problem.question  # the signature and the docstring with its examples

    def reference(self, problem: EvalProblem) -> str | None:
        return code_reference(problem, with_prompt=True)

    def score(self, problems: Sequence[EvalProblem], outputs: Sequence[str], workdir: str | Path) -> list[Score]:
        return score_code(DATASET, problems, outputs, workdir, self.sandbox)


TASK = HumanEvalPlusTask()
