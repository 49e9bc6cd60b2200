"""TFlow and its controls, all driven by one generator checkpoint (`tflow.infer.TFlowAgents`):

  tflow             the generator's transient LoRA
  tflow_zero_delta  the same hooks with delta-W = 0 ("is it the prompt?")
  tflow_shuffled    each problem gets the LoRA generated from ANOTHER problem of the subset (a seeded
                    derangement; "is the condition used?")
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from omegaconf import DictConfig

from tflow.errors import CheckpointError
from tflow.methods.base import MethodOutput, derangement, receiver_role, reference_batch, row_nll, row_seed
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
            self.condition = {p.task_id: problems[j].sender_view for p, j in zip(problems, perm)}

    def answer(self, problems: Sequence[EvalProblem], prompts: Sequence[str]) -> list[MethodOutput]:
        ev = self.cfg.eval
        cond = [self.condition.get(p.task_id, p.sender_view) for p in problems]
        answers = self.agents.answer([p.sender_view for p in problems], ev.max_new_tokens, do_sample=ev.do_sample,
                                     temperature=ev.temperature, top_p=ev.top_p,
                                     zero_delta=self.name == "tflow_zero_delta", receiver_prompts=prompts,
                                     condition_questions=cond,
                                     row_seeds=[row_seed(ev.seed, p.task_id, "receiver") for p in problems],
                                     receiver_role=receiver_role(self.cfg))
        return [MethodOutput(a.text, a.generated_tokens, a.truncated, a.accounting) for a in answers]

    @torch.no_grad()
    def reference_nll(self, problems: Sequence[Any]) -> list[tuple[float, int]]:
        """Teacher-forced NLL of each problem's reference solution under the generated LoRA (zero for
        tflow_zero_delta; another problem's senders for tflow_shuffled, as in `answer`)."""
        from tflow.agents import sender_states
        from tflow.lora import TransientLoRA
        from tflow.mix import sender_view
        from tflow.pipeline import delta_for, zero_delta_like

        ag, cfg = self.agents, self.cfg
        views = [self.condition.get(p.id, sender_view(p)) for p in problems]
        per_example: list[list[torch.Tensor]] = [[] for _ in problems]
        for role in cfg.agents.senders:
            states, _ = sender_states(ag.sender, role, views, cfg.agents.max_question_tokens, batch_size=len(problems))
            for row, state in zip(per_example, states):
                row.append(state)
        batch = reference_batch(ag.receiver.tokenizer, receiver_role(cfg), problems, cfg.data.max_solution_tokens)
        delta, _ = delta_for(ag.tflow, ag.receiver, per_example, batch)
        if self.name == "tflow_zero_delta":
            delta = zero_delta_like(delta)
        batch = {k: v.to(ag.receiver.device) for k, v in batch.items()}
        with TransientLoRA(ag.linears, delta, backend=cfg.backend):
            logits = ag.receiver.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return list(zip(*row_nll(logits, batch["labels"])))
