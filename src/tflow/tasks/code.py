"""Code benchmarks (HumanEval+, MBPP+): loading, code extraction, and evalplus's official scoring.

Scoring (`tflow.tasks.judge`) runs every sample in `tflow.tasks.sandbox` (namespaces, nobody, no capabilities,
seccomp, time and memory limits) and compares its outputs, returned as plain data, in a trusted judge process
with evalplus's semantics; model code never runs in this process nor in the judge.
"""
from __future__ import annotations

import ast
import hashlib
import logging
import re
import textwrap
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

from tflow.errors import ConfigError, DataError
from tflow.tasks.base import EvalProblem, Score, code_block
from tflow.tasks.judge import NOT_RUN, evaluate
from tflow.tasks.sandbox import Sandbox

log = logging.getLogger(__name__)
INSTRUCTION = ("Please provide a self-contained Python script that solves the following problem "
               "in a markdown code block:")  # evalplus codegen's instruction prefix
ANSWER_FORMAT = "Answer with the complete solution in a single ```python code block."


# ----------------------------------------------------------------------------- data
def read_source_commit(folder: Path) -> str:
    f = folder / "SOURCE_COMMIT"
    return f.read_text().split()[0] if f.is_file() else "unknown"


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{what} not found at {path}. Set data.data_dir (or TFLOW_DATA_DIR) to the offline "
                        "data folder (see ../shared/data/README.md), or use source='hub' with internet access")
    return path


@lru_cache(maxsize=4)
def load_records(dataset: str, path: str) -> dict[str, dict[str, Any]]:
    """evalplus records by task id, inputs deserialized as evalplus's get_*_plus does."""
    from evalplus.data.utils import completeness_check, stream_jsonl

    recs = {r["task_id"]: r for r in stream_jsonl(path)}
    if dataset == "mbpp":
        from evalplus.data.mbpp import mbpp_deserialize_inputs

        for tid, r in recs.items():
            for k in ("base_input", "plus_input"):
                r[k] = mbpp_deserialize_inputs(tid, r[k])
    completeness_check(dataset, recs)
    return recs


def make_problems(dataset: str, path: str, question: Callable[[dict], str]) -> list[EvalProblem]:
    """One EvalProblem per record; meta keeps what scoring needs (the records stay in load_records' cache)."""
    return [EvalProblem(task_id=r["task_id"], question=question(r), gold="",
                        meta={"entry_point": r["entry_point"], "prompt": r["prompt"], "dataset": dataset,
                              "data_path": path, "canonical": r["canonical_solution"]})
            for r in load_records(dataset, path).values()]


def code_reference(problem: EvalProblem, with_prompt: bool) -> str:
    """The canonical solution in one python block, as the code tasks ask the receiver to answer (HumanEval's
    canonical solution is the body of its prompt's function: the prompt comes first)."""
    body = problem.meta["canonical"]
    return code_block((problem.meta["prompt"] + body) if with_prompt else body)


def scorer() -> str:
    from importlib.metadata import version

    return (f"evalplus {version('evalplus')} semantics, base then plus (fast_check), upstream find_zero fix; "
            "outputs returned as plain data from a sandbox (namespaces, nobody, no capabilities, seccomp) and "
            "compared in a trusted process")


def code_prompt(problem: EvalProblem) -> str:
    return f"{INSTRUCTION}\n```python\n{problem.question.strip()}\n```\n{ANSWER_FORMAT}"


# ----------------------------------------------------------------------------- extraction
_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:^[ \t]*```|\Z)", re.S | re.M)
_PY_TAGS = {"", "python", "py", "python3", "py3"}
_MAX_SPAN_LINES = 200


def extract_code(text: str, entry_point: str, prompt: str | None = None) -> str | None:
    """The solution in a model output, sanitized as evalplus does (imports + top-level definitions reachable
    from `entry_point`); None when there is none. Fenced blocks first (the last one defining the entry point,
    else the longest); with `prompt` (HumanEval), code without the `def` is taken as the body."""
    if not isinstance(text, str) or not text.strip():
        return None
    blocks = [(tag.lower(), body) for tag, body in _FENCE.findall(text.replace("\r\n", "\n"))]
    cands = [b for t, b in blocks if t in _PY_TAGS] or [b for _, b in blocks]
    defines = re.compile(rf"^[ \t]*(?:async[ \t]+)?def[ \t]+{re.escape(entry_point)}[ \t]*\(", re.M)
    code = text
    if cands:
        with_def = [b for b in cands if defines.search(b)]
        code = with_def[-1] if with_def else max(cands, key=len)
    if prompt is not None and not defines.search(code):
        code = prompt + textwrap.indent(textwrap.dedent(code), "    ")
    try:
        return _sanitize(code, entry_point)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
        return True
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False


def _longest_parseable(lines: list[str]) -> list[str]:
    """evalplus's code_extract: the contiguous span with the most non-empty lines that parses."""
    lines = lines[:_MAX_SPAN_LINES]
    size = [0]
    for line in lines:
        size.append(size[-1] + bool(line.strip()))
    best, span = 0, (0, 0)
    for i in range(len(lines)):
        for j in range(len(lines), i, -1):
            if size[j] - size[i] <= best:
                break
            if _parses("\n".join(lines[i:j])):
                best, span = size[j] - size[i], (i, j)
                break
    return lines[span[0]:span[1]]


def _def_name(node: ast.stmt) -> str | None:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):  # evalplus keeps functions that return
        keep = (ast.Return, ast.Yield, ast.YieldFrom)  # (and, here, generators: evalplus drops Mbpp/630's helper)
        return node.name if any(isinstance(n, keep) for n in ast.walk(node)) else None
    if isinstance(node, ast.ClassDef):
        return node.name
    target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
    return target.id if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(target, ast.Name) else None


def _sanitize(code: str, entry_point: str) -> str | None:
    lines = code.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if not _parses("\n".join(lines)):
        lines = _longest_parseable(lines)
    tree = ast.parse("\n".join(lines))
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    defs: dict[str, ast.stmt] = {}
    for node in tree.body:
        name = _def_name(node)
        if name is not None:
            defs.setdefault(name, node)  # the first definition wins, as in evalplus
    reach, todo = set(), [entry_point]
    while todo:
        name = todo.pop()
        if name in defs and name not in reach:
            reach.add(name)
            todo += [n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(defs[name])
                     if isinstance(n, (ast.Name, ast.Attribute))]
    if not reach:
        return None
    kept = imports + [node for name, node in defs.items() if name in reach]
    starts = [min([n.lineno] + [d.lineno for d in getattr(n, "decorator_list", [])]) for n in kept]
    return "\n".join("\n".join(lines[s - 1:n.end_lineno]) for s, n in zip(starts, kept)).strip()


# ----------------------------------------------------------------------------- scoring (harness side)
def score_code(dataset: str, problems: Sequence[EvalProblem], outputs: Sequence[str], workdir: str | Path,
               sandbox: Sandbox) -> list[Score]:
    """Extract each output's code and run evalplus's base and plus tests on it: the program runs in the sandbox,
    its outputs are compared in the trusted judge (`tflow.tasks.judge`)."""
    if len(problems) != len(outputs):
        raise ConfigError(f"{len(problems)} problems but {len(outputs)} outputs")
    codes = [extract_code(o, p.meta["entry_point"], p.meta["prompt"] if dataset == "humaneval" else None)
             for p, o in zip(problems, outputs)]
    results: dict[int, dict[str, Any]] = {}
    for path in sorted({p.meta["data_path"] for p in problems}):
        todo = [i for i, c in enumerate(codes) if c is not None and problems[i].meta["data_path"] == path]
        if todo:
            records = load_records(dataset, path)
            gt_dir = Path(workdir) / "evalplus_gt" / hashlib.md5(Path(path).read_bytes()).hexdigest()
            jobs = [(problems[i].task_id, codes[i]) for i in todo]
            results.update(zip(todo, evaluate(dataset, records, jobs, gt_dir, sandbox)))
    none = {"base": "fail", "plus": NOT_RUN, "error": "no code in the output"}
    details = [results.get(i, none) for i in range(len(codes))]
    return [Score(extracted=c, correct=d["base"] == d["plus"] == "pass", detail=d) for c, d in zip(codes, details)]
