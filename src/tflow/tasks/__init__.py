"""Benchmarks: one module each (load, prompt, extract, score), behind one registry.

`get_task(name)` imports the module lazily (code tasks pull in evalplus) and returns its `TASK`.
"""
from __future__ import annotations

import importlib

from tflow.errors import ConfigError
from tflow.tasks.base import EvalProblem, Score, Task, subset

TASKS: dict[str, str] = {  # name -> module holding TASK
    "gsm8k": "tflow.tasks.gsm8k",
    "math500": "tflow.tasks.math500",
    "mmlu_redux": "tflow.tasks.mmlu_redux",
    "humanevalplus": "tflow.tasks.humanevalplus",
    "mbppplus": "tflow.tasks.mbppplus",
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    return importlib.import_module(TASKS[name]).TASK


__all__ = ["TASKS", "EvalProblem", "Score", "Task", "get_task", "subset"]
