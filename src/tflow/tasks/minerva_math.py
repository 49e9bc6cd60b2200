"""Minerva Math (the TFlow release's "MATH"): 272 undergraduate STEM problems, asked 4-shot with the
Minerva exemplars, scored as the release scores them.

Prompt: the four exemplars of Lewkowycz et al. (2022, App. D; the MATH problems lm-evaluation-harness uses
for minerva_math) as "Problem: ... Solution: ... Final Answer: The final answer is X. I hope it is
correct.", then the problem. Scoring: the output is cut at a new "Problem:"; it is correct if the
"Final Answer: ..." line or the last \\boxed{} equals the gold answer after Minerva's answer normalisation
(or by MATH-500's symbolic equivalence, tflow.tasks.math500.judge), or math-verify finds the gold in the
text. Gold: the last \\boxed{} of the reference solution. Senders read the problem only: the exemplars are
the same for every problem (they carry nothing about the query) and would fill the condition's token
budget (the release's senders read the whole 4-shot text).

Sources: hub `knoveleng/Minerva-Math` (split train, 272 problems: the set the release loads); offline, a
JSONL with `problem` and `solution` per line at `<data_dir>/minerva_math/minerva_math.jsonl` (no package
ships it: the offline default runs without this task).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tflow.data import last_boxed
from tflow.errors import ConfigError, DataError
from tflow.tasks.base import EvalProblem, Score

HUB_ID = "knoveleng/Minerva-Math"
OFFLINE_FILE = Path("minerva_math") / "minerva_math.jsonl"
EXEMPLARS = [  # (problem, solution, final answer): Lewkowycz et al. 2022, App. D
    ("Find the domain of the expression  $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.",
     "The expressions inside each square root must be non-negative. Therefore, $x-2 \\ge 0$, so $x\\ge2$, and "
     "$5 - x \\ge 0$, so $x \\le 5$. Also, the denominator cannot be equal to zero, so $5-x>0$, which gives $x<5$. "
     "Therefore, the domain of the expression is $\\boxed{[2,5)}$.", "[2,5)"),
    ("If $\\det \\mathbf{A} = 2$ and $\\det \\mathbf{B} = 12,$ then find $\\det (\\mathbf{A} \\mathbf{B}).$",
     "We have that $\\det (\\mathbf{A} \\mathbf{B}) = (\\det \\mathbf{A})(\\det \\mathbf{B}) = (2)(12) = "
     "\\boxed{24}.$", "24"),
    ("Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights instead, how many times "
     "must Terrell lift them in order to lift the same total weight?",
     "If Terrell lifts two 20-pound weights 12 times, he lifts a total of $2\\cdot 12\\cdot20=480$ pounds of weight. "
     "If he lifts two 15-pound weights instead for $n$ times, he will lift a total of $2\\cdot15\\cdot n=30n$ pounds "
     "of weight. Equating this to 480 pounds, we can solve for $n$: \\begin{align*} 30n&=480\\\\ \\Rightarrow\\qquad "
     "n&=480/30=\\boxed{16} \\end{align*}", "16"),
    ("If the system of equations\n\n\\begin{align*}\n6x-4y&=a,\\\\\n6y-9x &=b.\n\\end{align*}has a solution $(x, y)$ "
     "where $x$ and $y$ are both nonzero, find $\\frac{a}{b},$ assuming $b$ is nonzero.",
     "If we multiply the first equation by $-\\frac{3}{2}$, we obtain\n\n$$6y-9x=-\\frac{3}{2}a.$$Since we also "
     "know that $6y-9x=b$, we have\n\n$$-\\frac{3}{2}a=b\\Rightarrow\\frac{a}{b}=\\boxed{-\\frac{2}{3}}.$$",
     "-\\frac{2}{3}"),
]
FEW_SHOT = "\n\n".join(f"Problem:\n{p}\n\nSolution:\n{s}\nFinal Answer: The final answer is ${a}$. I hope it is correct."
                       for p, s, a in EXEMPLARS)
INSTRUCTION = ("Solve the problem as in the examples: put the final answer in \\boxed{} and end with \"Final Answer: "
               "The final answer is $X$. I hope it is correct.\"")
_FINAL = re.compile(r"Final Answer: The final answer is (.*?)\. I hope it is correct\.", re.S)

# Minerva's answer normalisation (Lewkowycz et al. 2022, App. D): text substitutions, units and words removed
_SUBSTITUTIONS = [("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), (r"\ ", ""), (" ", ""), ("mbox", "text"),
                  (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}")]
_REMOVED = ["square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units", "\\ldots", "sue",
            "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals", "edges",
            "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2",
            "\\text{}^3", "\\text{\n}", "\\text{}", r"\mathrm{th}", r"^\circ", r"^{\circ}", r"\;", r",\!", "{,}", '"',
            "\\dots"]


def normalize_final_answer(answer: str) -> str:
    """Minerva's normalisation of a final answer (the part after the last '=', units and markup removed)."""
    answer = answer.split("=")[-1]
    for old, new in _SUBSTITUTIONS:
        answer = answer.replace(old, new)
    for expr in _REMOVED:
        answer = answer.replace(expr, "")
    answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", answer)
    for macro in ("text", "textbf", "overline", "boxed"):
        answer = re.sub(rf"(\\{macro}\{{)(.*?)(\}})", "\\2", answer)
    answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", answer)
    answer = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", answer)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer.strip()


def candidates(output: str) -> list[str]:
    """The answers an output states, in the release's order: the Final-Answer line, then the last box."""
    text = output.split("Problem:")[0]  # the release cuts a continuation that starts a new problem
    found = [m.group(1) for m in _FINAL.finditer(text)][-1:]
    boxed = last_boxed(text)
    return [normalize_final_answer(a) for a in found + ([boxed] if boxed is not None else [])]


def judge(output: str, gold: str) -> tuple[bool, dict[str, Any]]:
    from tflow.tasks.math500 import judge as equivalent

    for cand in candidates(output):
        if cand == gold:
            return True, {"method": "minerva_normalised", "answer": cand}
        ok, detail = equivalent(cand, gold)
        if ok:
            return True, {**detail, "answer": cand}
    return False, {"reason": "no stated answer equals the gold" if candidates(output) else "no answer stated"}


@dataclass
class MinervaMathTask:
    name: str = "minerva_math"

    def load(self, data_dir: str | Path, source: str = "offline") -> tuple[list[EvalProblem], dict[str, Any]]:
        if source == "offline":
            path = Path(data_dir) / OFFLINE_FILE
            if not path.is_file():
                raise DataError(f"Minerva Math has no offline copy at {path} (no package ships it): use "
                                "eval.source=hub (task_overrides: {minerva_math: [eval.source=hub]}) or put the "
                                "272 problems there as JSONL with 'problem' and 'solution'")
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            prov = {"source": "offline", "path": str(path), "version": f"file {path.name}"}
        elif source == "hub":
            try:
                import datasets
            except ImportError as err:
                raise DataError("source 'hub' needs: pip install datasets (or an offline copy)") from err
            ds = datasets.load_dataset(HUB_ID, split="train")
            rows, prov = list(ds), {"source": "hub", "path": HUB_ID, "version": f"{HUB_ID}@{getattr(ds, '_fingerprint', '?')}"}
        else:
            raise ConfigError(f"unknown source {source!r} for {self.name}; use 'offline' or 'hub'")
        problems = []
        for i, row in enumerate(rows):
            gold = last_boxed(row.get("solution", "")) or row.get("answer")
            if not row.get("problem") or not gold:
                raise DataError(f"{prov['path']}: problem {i} lacks a problem text or a boxed gold answer")
            problems.append(EvalProblem(f"minerva_math/{i}", row["problem"].strip(), normalize_final_answer(gold),
                                        {"solution": row.get("solution")}))
        return problems, {**prov, "count": len(problems), "scorer": "Minerva normalisation + MATH-500 equivalence"}

    def prompt(self, problem: EvalProblem) -> str:
        return f"{INSTRUCTION}\n\n{FEW_SHOT}\n\nProblem:\n{problem.question}\n\nSolution:"

    def sender_view(self, problem: EvalProblem) -> str:
        return problem.question

    def reference(self, problem: EvalProblem) -> str | None:
        return problem.meta.get("solution")

    def score(self, problems: Sequence[EvalProblem], outputs: Sequence[str], workdir: str | Path) -> list[Score]:
        scores = []
        for problem, output in zip(problems, outputs, strict=True):
            try:
                ok, detail = judge(output, problem.gold) if isinstance(output, str) else (False, {"reason": "not text"})
                scores.append(Score(detail.get("answer"), ok, detail))
            except Exception as err:  # never let one malformed output stop a run
                scores.append(Score(None, False, {"reason": f"scoring error: {type(err).__name__}: {err}"}))
        return scores


TASK = MinervaMathTask()
