"""The training mix: the configured sources (`data.mix`: name -> weight), each decontaminated against every
evaluation set, drawn in proportion to their weights into exactly the problems a run trains on, plus a
disjoint validation set (held back from every source) for choices such as the static LoRA's learning rate.

A problem is shown in training as its evaluation task shows problems: `receiver_prompt` is the task's
receiver prompt (question plus answer-format instruction) and `sender_view` what its senders read.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from tflow.data import SOURCES, Problem, norm_text
from tflow.errors import DataError
from tflow.tasks import EvalProblem, get_task
from tflow.utils import write_json_atomic

log = logging.getLogger(__name__)
_FORMAT = 1  # bump when the drawing below changes, so cached sets are redrawn


@dataclass
class TrainingSet:
    problems: list[Problem]  # exactly the requested number, in training order
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> version, weight, counts
    removed: dict[str, int] = field(default_factory=dict)  # reason -> count
    validation: list[Problem] = field(default_factory=list)  # held back from training, same mix


def as_eval_problem(p: Problem) -> EvalProblem:
    return EvalProblem(task_id=p.id, question=p.question, gold=p.answer)


def receiver_prompt(p: Problem) -> str:
    """The receiver's user message for a training problem: its task's prompt (train as you evaluate)."""
    return get_task(p.task).prompt(as_eval_problem(p))


def sender_view(p: Problem) -> str:
    """What the senders read for a training problem: its task's sender view."""
    return get_task(p.task).sender_view(as_eval_problem(p))


# ---------------------------------------------------------------- decontamination
def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = norm_text(text).split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def decontaminate(problems: list[Problem], eval_texts: Iterable[str], n: int) -> tuple[list[Problem], dict[str, int]]:
    """Drop problems whose normalised question equals an evaluation text ('exact') or shares a word n-gram
    with one ('ngram')."""
    evals = list(eval_texts)
    exact = {norm_text(q) for q in evals}
    grams: set[tuple[str, ...]] = set().union(*(_ngrams(q, n) for q in evals)) if evals else set()
    kept, removed = [], {"exact": 0, "ngram": 0}
    for p in problems:
        if norm_text(p.question) in exact:
            removed["exact"] += 1
        elif grams and not grams.isdisjoint(_ngrams(p.question, n)):
            removed["ngram"] += 1
        else:
            kept.append(p)
    return kept, removed


_EVAL_TEXTS: dict[tuple, list[str]] = {}


def eval_texts(names: Sequence[str], data_dir: str) -> list[str]:
    """Every evaluation problem's question and sender view, for the named tasks: `task` reads its offline
    copy, `task@hub` its hub copy (data.decontaminate_against)."""
    key = (tuple(names), str(data_dir))
    if key not in _EVAL_TEXTS:
        texts: list[str] = []
        for entry in names:
            name, _, source = entry.partition("@")
            task = get_task(name)
            for p in task.load(data_dir, source or "offline")[0]:
                texts += [p.question, task.sender_view(p)]
        _EVAL_TEXTS[key] = list(dict.fromkeys(texts))
    return _EVAL_TEXTS[key]


# ---------------------------------------------------------------- the mix
def _quotas(n: int, weights: dict[str, float]) -> dict[str, int]:
    """n split in proportion to the weights (largest remainders; ties by name order)."""
    total = sum(weights.values())
    raw = {k: n * w / total for k, w in weights.items()}
    out = {k: math.floor(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: (out[k] - raw[k], list(raw).index(k)))[: n - sum(out.values())]:
        out[k] += 1
    return out


def training_set(data_cfg: Any, seed: int, n: int, cache_dir: str | Path | None = None) -> TrainingSet:
    """`n` training problems drawn from the decontaminated sources in proportion to `data.mix` (a source
    smaller than its share is cycled, counted as epochs), in a seeded order; each source's last
    `data.validation_size` problems (after a seeded shuffle) are held back as the validation set. With
    `cache_dir`, the result is stored there, keyed by the data config, the seed, n and the data files, so
    the many training jobs of a DAG decontaminate once (it takes ~30 s on 2 cores)."""
    path = None
    if cache_dir is not None:
        path = Path(cache_dir).expanduser() / "training_sets" / f"{_cache_key(data_cfg, seed, n)}.json"
        if path.is_file():
            raw = json.loads(path.read_text())
            return TrainingSet(*([Problem(**p) for p in raw[k]] if k in ("problems", "validation") else raw[k]
                                 for k in ("problems", "sources", "removed", "validation")))
    out = _draw(data_cfg, seed, n)
    if path is not None:
        write_json_atomic(path, {"problems": [asdict(p) for p in out.problems], "sources": out.sources,
                                 "removed": out.removed, "validation": [asdict(p) for p in out.validation]})
    return out


def _cache_key(data_cfg: Any, seed: int, n: int) -> str:
    """The data config (every key that shapes the set), seed, n, and the data folder's files and sizes."""
    from omegaconf import OmegaConf

    keys = ("mix", "per_source_limit", "decontaminate_against", "ngram", "validation_size", "reasoning_traces")
    cfg = {k: OmegaConf.to_container(data_cfg, resolve=True)[k] for k in keys}
    root = Path(data_cfg.data_dir)
    files = sorted((str(f.relative_to(root)), f.stat().st_size) for f in root.rglob("*") if f.is_file()) \
        if root.is_dir() else []
    blob = json.dumps([cfg, seed, n, str(root), files, _FORMAT], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


_CLEAN: dict[tuple, tuple] = {}


def _clean_source(data_cfg: Any, name: str, seed: int) -> tuple[list[Problem], list[Problem], dict[str, int], dict]:
    """A source's problems, those kept by decontamination, the removal counts and its provenance (kept per
    process: a process often draws the same source again)."""
    key = (name, seed, data_cfg.data_dir, tuple(data_cfg.decontaminate_against), data_cfg.ngram,
           data_cfg.reasoning_traces)
    if key not in _CLEAN:
        items, info = SOURCES[name](data_cfg, seed)
        kept, rm = decontaminate(items, eval_texts(list(data_cfg.decontaminate_against), data_cfg.data_dir),
                                 data_cfg.ngram)
        _CLEAN[key] = (items, kept, rm, info)
    items, kept, rm, info = _CLEAN[key]
    return items, list(kept), dict(rm), dict(info)


def _draw(data_cfg: Any, seed: int, n: int) -> TrainingSet:
    weights: dict[str, float] = {}
    for entry in data_cfg.mix:
        if float(entry.weight) > 0:
            weights[entry.source] = weights.get(entry.source, 0.0) + float(entry.weight)
    if not weights:
        raise DataError("data.mix gives no source a positive weight")
    pools, validation, sources, removed = {}, {}, {}, {"exact": 0, "ngram": 0}
    for name in weights:
        items, kept, rm, info = _clean_source(data_cfg, name, seed)
        if not kept:
            raise DataError(f"training source {name!r}: no problem left after decontamination")
        if data_cfg.per_source_limit:
            kept = random.Random(f"{seed}/{name}").sample(kept, min(len(kept), data_cfg.per_source_limit))
        random.Random(f"{seed}/{name}/order").shuffle(kept)
        hold = min(data_cfg.validation_size, len(kept) // 10)
        pools[name], validation[name] = kept[: len(kept) - hold], kept[len(kept) - hold:]
        log.info("training source %s: %d problems, removed %d exact + %d %d-gram overlaps with %s; %d held back",
                 name, len(items), rm["exact"], rm["ngram"], data_cfg.ngram, list(data_cfg.decontaminate_against), hold)
        sources[name] = {**info, "weight": weights[name], "loaded": len(items), "kept": len(kept), "removed": rm,
                         "validation": hold}
        removed = {k: removed[k] + rm[k] for k in removed}
    chosen: list[Problem] = []
    for name, q in _quotas(n, weights).items():
        pool = pools[name]
        chosen += [pool[i % len(pool)] for i in range(q)]
        sources[name].update(drawn=q, epochs=round(q / len(pool), 3))
    random.Random(seed).shuffle(chosen)
    held = [p for name in weights for p in validation[name]]
    return TrainingSet(chosen, sources, removed, held)
