"""TFlow and its controls, all driven by one generator checkpoint (`tflow.infer.TFlowAgents`):

  tflow             the generator's transient LoRA
  tflow_zero_delta  the same hooks with delta-W = 0 ("is it the prompt?")
  tflow_shuffled    each problem gets the LoRA generated from ANOTHER problem of the subset (a seeded
                    derangement; "is the condition used?")
"""
from __future__ import annotations

from typing import Any, Sequence

from omegaconf import DictConfig

from tflow.errors import CheckpointError
from tflow.methods.base import MethodOutput, derangement, row_seed
from tflow.tasks.base import EvalProblem


class TFlowMethod:
    def __init__(self, name: str, agents: Any, cfg: DictConfig):
        self.name, self.agents, self.cfg = name, agents, cfg
        self.condition: dict[str, str] = {}

    @classmethod
    def build(cls, cfg: DictConfig, layers: Sequence[Any] = (), overrides: Sequence[str] = ()) -> tuple["TFlowMethod", DictConfig]:
        """Runs with the checkpoint's own config, this run's layers and overrides on top (so a checkpoint
        that does not fit the backbones or architecture is an error, never a silent mismatch)."""
        from tflow.config import load_config
        from tflow.infer import TFlowAgents
        from tflow.pipeline import read_checkpoint

        name = cfg.eval.method
        if not cfg.eval.checkpoint:
            raise CheckpointError(f"method {name} needs eval.checkpoint=<generator.pt> (train one with tflow.train)")
        trained = read_checkpoint(cfg.eval.checkpoint)["config"]
        # the layers' train/data sections do not describe this generator: keep what it was trained with
        run_cfg = load_config([trained, *layers, {"train": trained["train"], "data": trained["data"]}], overrides)
        return cls(name, TFlowAgents(run_cfg, cfg.eval.checkpoint), run_cfg), run_cfg

    def prepare(self, problems: Sequence[EvalProblem]) -> None:
        # One untimed 2-token answer first: it loads the LoRA backend's op (cpu_fused builds or loads a C++
        # extension, Triton compiles), a one-time cost that, like the model load, is not per-query work.
        if problems:
            self.agents.answer([problems[0].question], 2, do_sample=False, zero_delta=self.name == "tflow_zero_delta")
        if self.name == "tflow_shuffled":
            perm = derangement(len(problems), self.cfg.eval.seed)
            self.condition = {p.task_id: problems[j].question for p, j in zip(problems, perm)}

    def answer(self, problems: Sequence[EvalProblem], prompts: Sequence[str]) -> list[MethodOutput]:
        ev = self.cfg.eval
        cond = [self.condition.get(p.task_id, p.question) for p in problems]
        answers = self.agents.answer([p.question for p in problems], ev.max_new_tokens, do_sample=ev.do_sample,
                                     temperature=ev.temperature, top_p=ev.top_p,
                                     zero_delta=self.name == "tflow_zero_delta", receiver_prompts=prompts,
                                     condition_questions=cond,
                                     row_seeds=[row_seed(ev.seed, p.task_id, "receiver") for p in problems])
        return [MethodOutput(a.text, a.generated_tokens, a.truncated, a.accounting) for a in answers]
