"""Benchmarks: one module each (load, prompt, extract, score), behind one registry (torch-free).

`get_task(name)` imports the module lazily (code tasks pull in evalplus) and returns its `TASK`.
"""
from __future__ import annotations

from tflow.registry import Registry
from tflow.tasks.base import EvalProblem, Score, Task, subset

TASKS: Registry[str] = Registry("task", "eval.task", {
    "gsm8k": "tflow.tasks.gsm8k:TASK",
    "math500": "tflow.tasks.math500:TASK",
    "mmlu_redux": "tflow.tasks.mmlu_redux:TASK",
    "humanevalplus": "tflow.tasks.humanevalplus:TASK",
    "mbppplus": "tflow.tasks.mbppplus:TASK",
    "minerva_math": "tflow.tasks.minerva_math:TASK",  # the release's "MATH" (hub, or an offline file you provide)
})


def get_task(name: str) -> Task:
    return TASKS.load(name)


__all__ = ["TASKS", "EvalProblem", "Score", "Task", "get_task", "subset"]
