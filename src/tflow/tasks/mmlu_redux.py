"""MMLU-Redux 2.0 (57 subjects x 100): multiple choice A-D with the expert error annotations applied.

Following the MMLU-Redux paper, items annotated "no correct answer" are dropped and "wrong groundtruth"
items take their `correct_answer` (a letter or a 0-based index; dropped when it is missing); every other
annotation keeps the original answer. Offline: `<data_dir>/mmlu-redux/mmlu_<subject>.csv`, whose separators,
column orders, encodings (one file is Mac Roman) and error_type spellings vary. Hub: `edinburgh-dawg/mmlu-redux-2.0`.
"""
from __future__ import annotations

import ast
import io
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from tflow.errors import ConfigError, DataError
from tflow.tasks.base import EvalProblem, Score

LETTERS = "ABCD"
HUB_ID = "edinburgh-dawg/mmlu-redux-2.0"
INSTRUCTION = "Answer with the letter of the correct option, e.g. 'The answer is (B)'."
COLUMNS = ("question", "choices", "answer", "error_type", "correct_answer")

_MARK = r"[\s*_:(\[{]*(?:\\(?:text|textbf|mathrm|boxed)\{)?\(?"  # markup between a cue and its letter
_STATED = re.compile(r"(?i:answer)(?:\s+(?i:is)|\s*:)[\s*_:]*(?:(?i:option|choice)\s*)?" + _MARK + r"([A-D])\b"
                     + r"|\\boxed\{" + _MARK + r"([A-D])\b")
_PAREN = re.compile(r"\(([A-D])\)")
_LEADING = re.compile(r"\s*[*_]*\(?([A-D])\)?[*_]*(?:[.:)\s]|$)")
_LONE = re.compile(r"(?<![\w'-])([A-D])(?![\w'-])")


def _located(match: re.Match[str]) -> str:
    return next(g for g in match.groups() if g is not None).upper()


def _article(text: str, match: re.Match[str]) -> bool:
    """An "A" followed by a lower-case word is the article, not an option."""
    return match.group(1) == "A" and re.match(r"\s+[a-z]", text[match.end(1):match.end(1) + 2]) is not None


def _extract(text: str) -> tuple[str | None, str]:
    """(letter, rule that found it). The final answer after a closing </think> is preferred."""
    if "</think>" in text:
        letter, rule = _extract(text.rsplit("</think>", 1)[1])
        if letter is not None:
            return letter, rule
        text = text.replace("</think>", " ")
    stated = list(_STATED.finditer(text))
    if stated:
        return _located(stated[-1]), "stated"  # the last "answer is X" / "answer: X" / \boxed{X}
    paren = _PAREN.findall(text)
    if paren:
        return paren[-1], "parenthesised"
    lead = _LEADING.match(text)
    if lead and not _article(text, lead):
        return lead.group(1), "leading"
    lone = [m for m in _LONE.finditer(text) if not _article(text, m)]
    if lone:
        return lone[-1].group(1), "last letter"
    return None, "none"


def extract_answer(text: str) -> str | None:
    """The chosen letter A-D, or None when the output names none."""
    return _extract(text)[0] if isinstance(text, str) else None


def is_correct(pred: str | None, gold: str) -> bool:
    return pred is not None and pred.strip().upper() == gold.strip().upper()


def _read_csv(path: Path) -> tuple[pd.DataFrame, str, str]:
    """A subject file as strings, whatever its separator and encoding: (frame, separator, encoding)."""
    raw = path.read_bytes()
    try:
        text, encoding = raw.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError:  # moral_scenarios: its one non-UTF-8 byte is 0xD5, Mac Roman's apostrophe
        text, encoding = raw.decode("mac_roman"), "mac_roman"
    header = text.split("\n", 1)[0]
    sep = ";" if header.count(";") > header.count(",") else ","
    frame = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False)
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: columns {missing} missing (found {list(frame.columns)})")
    return frame, sep, encoding


def _index(value: Any) -> int | None:
    """An answer given as a letter A-D or a 0-based index 0-3, else None."""
    v = str(value if value is not None else "").strip().upper()
    if len(v) == 1 and v in LETTERS:
        return LETTERS.index(v)
    return int(v) if v in {"0", "1", "2", "3"} else None


def _kind(error_type: Any) -> str:
    """'Wrong Groundtruth', 'wrong_groundtruth ', ... -> 'wrong_groundtruth'."""
    return re.sub(r"[\s_]+", "_", str(error_type or "").strip().lower())


def build(subject: str, rows: Iterable[dict[str, Any]], counts: Counter[str]) -> list[EvalProblem]:
    """One subject's problems with the annotations applied; `counts` collects what was dropped/corrected."""
    out = []
    for i, row in enumerate(rows):
        counts["rows"] += 1
        kind = _kind(row["error_type"])
        counts[f"error_type:{kind}"] += 1
        if kind == "no_correct_answer":
            counts["dropped_no_correct_answer"] += 1
            continue
        answer = _index(row["answer"])
        if kind == "wrong_groundtruth":
            fixed = _index(row.get("correct_answer"))
            if fixed is None:
                counts["dropped_wrong_groundtruth_without_correction"] += 1
                continue
            counts["corrected_wrong_groundtruth"] += 1
            counts["corrected_wrong_groundtruth_unchanged"] += fixed == answer  # annotation names the old answer
            answer = fixed
        choices = row["choices"]
        choices = list(choices) if not isinstance(choices, str) else ast.literal_eval(choices)
        if answer is None or len(choices) != len(LETTERS):
            counts["dropped_malformed"] += 1
            continue
        out.append(EvalProblem(f"mmlu-redux/{subject}/{i}", str(row["question"]).strip(), LETTERS[answer],
                               {"subject": subject, "choices": [str(c) for c in choices], "error_type": kind}))
        counts["kept"] += 1
    return out


@dataclass
class MMLUReduxTask:
    name: str = "mmlu_redux"

    def load(self, data_dir: str | Path, source: str = "offline") -> tuple[list[EvalProblem], dict[str, Any]]:
        """All kept items, subjects in alphabetical order, rows in file order."""
        counts: Counter[str] = Counter()
        problems: list[EvalProblem] = []
        if source == "offline":
            folder = Path(data_dir) / "mmlu-redux"
            files = sorted(folder.glob("mmlu_*.csv"))
            if not files:
                raise DataError(f"MMLU-Redux not found at {folder}. Set data.data_dir (or TFLOW_DATA_DIR) to the "
                                "folder holding mmlu-redux/mmlu_<subject>.csv")
            formats: dict[str, list[str]] = {"semicolon": [], "mac_roman": []}
            for path in files:
                subject = path.stem.removeprefix("mmlu_")
                frame, sep, encoding = _read_csv(path)
                formats["semicolon"] += [subject] if sep == ";" else []
                formats["mac_roman"] += [subject] if encoding == "mac_roman" else []
                problems += build(subject, frame.to_dict("records"), counts)
            commit = folder / "SOURCE_COMMIT"
            version = commit.read_text().split()[0] if commit.is_file() else "unknown"
            prov = {"source": "offline", "path": str(folder), "version": f"aryopg/mmlu-redux@{version}",
                    "subjects": len(files), "formats": formats}
        elif source == "hub":
            try:
                import datasets
            except ImportError as err:
                raise DataError("source 'hub' needs: pip install datasets (or use source 'offline')") from err
            subjects = sorted(datasets.get_dataset_config_names(HUB_ID))
            for subject in subjects:
                problems += build(subject, datasets.load_dataset(HUB_ID, subject, split="test"), counts)
            prov = {"source": "hub", "path": HUB_ID, "version": HUB_ID, "subjects": len(subjects)}
        else:
            raise ConfigError(f"unknown source {source!r} for {self.name}; use 'offline' or 'hub'")
        return problems, {**prov, "count": len(problems), "filtering": dict(sorted(counts.items()))}

    def prompt(self, problem: EvalProblem) -> str:
        return f"{self.sender_view(problem)}\n\n{INSTRUCTION}"

    def sender_view(self, problem: EvalProblem) -> str:
        """The question and its four options (the release shows senders the options too)."""
        options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, problem.meta["choices"]))
        return f"{problem.question}\n\n{options}"

    def reference(self, problem: EvalProblem) -> str | None:
        return None  # multiple choice: no worked solution

    def score(self, problems: Sequence[EvalProblem], outputs: Sequence[str], workdir: str | Path) -> list[Score]:
        scores = []
        for problem, output in zip(problems, outputs, strict=True):
            try:
                pred, rule = _extract(output) if isinstance(output, str) else (None, "not text")
                scores.append(Score(pred, is_correct(pred, problem.gold), {"rule": rule}))
            except Exception as err:  # never let one malformed output stop a run
                scores.append(Score(None, False, {"reason": f"scoring error: {type(err).__name__}: {err}"}))
        return scores


TASK = MMLUReduxTask()
