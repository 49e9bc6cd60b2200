"""Methods of the evaluation harness, behind one registry, with one accounting for all.

Every method answers a batch of problems given the task's receiver prompts and returns, per
problem, the receiver's text, its generated-token count, whether it hit the token budget, and an
`Accounting` with the prompt and generated tokens of EVERY agent and seconds per phase (a batch's
seconds are shared equally among its rows). The receiver always gets the same user message (the
task prompt) and the same system prompt (`agents.receiver`), except TextMAS, which puts the
senders' messages before it.

  single            the receiver alone
  textmas           each sender writes a text message (role prompt + question); the messages, in
                    sender order, precede the receiver's prompt. Presets: long (up to 1024 tokens per
                    sender, the paper's budget) and short48 (exactly 48 tokens per sender)
  tflow             the generator's transient LoRA (a checkpoint)
  tflow_zero_delta  the same hooks with delta-W = 0 ("is it the prompt?")
  tflow_shuffled    each problem gets the LoRA generated from ANOTHER problem of the subset (a seeded
                    derangement; "is the condition used?")
  static_lora       the receiver with ONE peft LoRA trained on the same data and budget (tflow.static_lora;
                    "is per-query adaptation needed?")
  ac, kv            training-free comparators: activation and KV-cache communication (tflow.comparators)
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch
from omegaconf import DictConfig

from tflow.accounting import Accounting, PrefillTimer
from tflow.agents import receiver_batch
from tflow.errors import CheckpointError, ConfigError
from tflow.models import Backbone
from tflow.tasks.base import EvalProblem

TEXTMAS_PRESETS: dict[str, dict[str, Any]] = {
    "long": {"message_tokens": 1024, "fixed": False},  # the paper's TextMAS: senders stop at end of turn
    "short48": {"message_tokens": 48, "fixed": True},  # the reviewers' baseline: exactly 48 tokens each
}
METHODS = ("single", "textmas", "tflow", "tflow_zero_delta", "tflow_shuffled", "static_lora", "ac", "kv")


@dataclass
class MethodOutput:
    text: str
    generated_tokens: int
    truncated: bool  # the receiver hit max_new_tokens without ending its turn
    accounting: Accounting
    messages: dict[str, str] | None = None  # textmas: each sender's message


class Method(Protocol):
    name: str

    def prepare(self, problems: Sequence[EvalProblem]) -> None:
        """Called once with the whole subset before any batch (e.g. to fix a permutation)."""
        ...

    def answer(self, problems: Sequence[EvalProblem], prompts: Sequence[str]) -> list[MethodOutput]:
        ...


def sampling(ev: DictConfig) -> dict[str, Any]:
    """generate() keyword arguments for the configured decoding (greedy unless eval.do_sample)."""
    if ev.do_sample:
        return dict(do_sample=True, temperature=ev.temperature, top_p=ev.top_p, top_k=None)
    return dict(do_sample=False, temperature=None, top_p=None, top_k=None)


def decode_rows(tok: Any, generated: torch.Tensor, forced: bool = False) -> list[tuple[str, int, bool]]:
    """Per row of generated ids [B, N]: (text up to end of turn, its token count, truncated)."""
    results = []
    for row in generated.tolist():
        stop = [j for j, t in enumerate(row) if t in (tok.eos_token_id, tok.pad_token_id)]
        gen = row[: stop[0]] if stop else row
        results.append((tok.decode(gen, skip_special_tokens=True), len(gen), not stop and not forced))
    return results


def generate(backbone: Backbone, role: str, messages: Sequence[str], ev: DictConfig, acc: Accounting,
             rows: list[Accounting], agent: str, max_new_tokens: int, min_new_tokens: int = 0,
             phases: tuple[str, str] = ("receiver_prefill", "decode")) -> list[tuple[str, int, bool]]:
    """Batched chat generation for one agent. Adds the agent's tokens to each row's accounting and the
    batch's prefill/decode seconds to `acc`. Returns (text, generated tokens, truncated) per row."""
    tok = backbone.tokenizer
    batch = receiver_batch(tok, role, messages, padding_side="left")
    timer = PrefillTimer()
    with torch.no_grad():
        out = backbone.model.generate(**{k: v.to(backbone.device) for k, v in batch.items()},
                                      max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                      pad_token_id=tok.pad_token_id, streamer=timer, **sampling(ev))
    prefill, decode = timer.split()
    acc.add_seconds(phases[0], prefill)
    acc.add_seconds(phases[1], decode)
    results = decode_rows(tok, out[:, batch["input_ids"].shape[1]:], forced=min_new_tokens > 0)
    for i, (_, n, _) in enumerate(results):
        rows[i].add_tokens(agent, prompt=int(batch["attention_mask"][i].sum()), generated=n)
    return results


def warm_up(backbone: Backbone, role: str, text: str) -> None:
    """An untimed greedy 2-token answer (no sampling, so no RNG drawn): first-call costs of a process
    (kernel selection, allocator growth, lazy imports) are not per-query work, and every method gets the
    same warm-up (TFlow's also loads its LoRA backend), whether it runs alone or after others (--each)."""
    batch = receiver_batch(backbone.tokenizer, role, [text], padding_side="left")
    with torch.no_grad():
        backbone.model.generate(**{k: v.to(backbone.device) for k, v in batch.items()}, max_new_tokens=2,
                                pad_token_id=backbone.tokenizer.pad_token_id, do_sample=False, temperature=None,
                                top_p=None, top_k=None)


def share_seconds(acc: Accounting, rows: list[Accounting]) -> None:
    for row in rows:
        for phase, sec in acc.seconds.items():
            row.add_seconds(phase, sec / len(rows))


class Single:
    """The receiver alone (also with a static adapter already applied: static_lora)."""

    def __init__(self, cfg: DictConfig, receiver: Backbone, name: str = "single"):
        self.cfg, self.receiver, self.name = cfg, receiver, name

    def prepare(self, problems: Sequence[EvalProblem]) -> None:
        if problems:
            warm_up(self.receiver, self.cfg.agents.receiver, problems[0].question)

    def answer(self, problems: Sequence[EvalProblem], prompts: Sequence[str]) -> list[MethodOutput]:
        acc, rows = Accounting(), [Accounting() for _ in problems]
        res = generate(self.receiver, self.cfg.agents.receiver, prompts, self.cfg.eval, acc, rows, "receiver",
                       self.cfg.eval.max_new_tokens)
        share_seconds(acc, rows)
        return [MethodOutput(t, n, tr, row) for (t, n, tr), row in zip(res, rows)]


def textmas_prompt(messages: dict[str, str], prompt: str) -> str:
    """The receiver's user message in TextMAS: the senders' messages in sender order, then the task."""
    notes = "\n\n".join(f"[{role}]\n{text.strip()}" for role, text in messages.items())
    return f"Notes from your teammates:\n\n{notes}\n\n---\n\n{prompt}"


class TextMAS:
    name = "textmas"

    def __init__(self, cfg: DictConfig, receiver: Backbone, sender: Backbone):
        self.cfg, self.receiver, self.sender = cfg, receiver, sender
        preset = TEXTMAS_PRESETS[cfg.eval.textmas_preset]
        self.message_tokens = cfg.eval.message_tokens or preset["message_tokens"]
        self.fixed = preset["fixed"]

    def prepare(self, problems: Sequence[EvalProblem]) -> None:
        if problems:
            warm_up(self.receiver, self.cfg.agents.receiver, problems[0].question)
            if self.sender is not self.receiver:
                warm_up(self.sender, self.cfg.agents.senders[0], problems[0].question)

    def answer(self, problems: Sequence[EvalProblem], prompts: Sequence[str]) -> list[MethodOutput]:
        acc, rows = Accounting(), [Accounting() for _ in problems]
        messages: list[dict[str, str]] = [{} for _ in problems]
        for role in self.cfg.agents.senders:  # senders see the question only, as in TFlow
            res = generate(self.sender, role, [p.question for p in problems], self.cfg.eval, acc, rows,
                           f"sender:{role}", self.message_tokens, self.message_tokens if self.fixed else 0,
                           phases=("sender_prefill", "sender_decode"))
            for i, (text, _, _) in enumerate(res):
                messages[i][role] = text
        full = [textmas_prompt(m, p) for m, p in zip(messages, prompts)]
        res = generate(self.receiver, self.cfg.agents.receiver, full, self.cfg.eval, acc, rows, "receiver",
                       self.cfg.eval.max_new_tokens)
        share_seconds(acc, rows)
        return [MethodOutput(t, n, tr, row, m) for (t, n, tr), row, m in zip(res, rows, messages)]


def derangement(n: int, seed: int) -> list[int]:
    """A seeded permutation with no fixed point (n >= 2)."""
    if n < 2:
        raise ConfigError("the shuffled-condition control needs at least 2 problems (eval.n >= 2)")
    rng = random.Random(seed)
    while True:
        perm = list(range(n))
        rng.shuffle(perm)
        if all(i != j for i, j in enumerate(perm)):
            return perm


class TFlowMethod:
    """tflow, tflow_zero_delta and tflow_shuffled: one generator checkpoint (tflow.infer.TFlowAgents)."""

    def __init__(self, name: str, agents: Any, cfg: DictConfig):
        self.name, self.agents, self.cfg = name, agents, cfg
        self.condition: dict[str, str] = {}

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
                                     condition_questions=cond)
        return [MethodOutput(a.text, a.generated_tokens, a.truncated, a.accounting) for a in answers]


def static_adapter(receiver: Backbone, adapter: str | None) -> Backbone:
    """The receiver with a static-LoRA adapter (tflow.static_lora) loaded; refuses a missing adapter or one
    trained for another receiver."""
    import json
    from pathlib import Path

    from peft import PeftModel

    stamp = Path(adapter or "") / "tflow_static.json"
    if not adapter or not stamp.is_file():
        raise CheckpointError(f"method static_lora needs eval.checkpoint=<adapter folder written by tflow.static_lora>; "
                              f"{stamp} not found")
    trained_for = json.loads(stamp.read_text())["receiver"]
    if trained_for != receiver.fingerprint():
        raise CheckpointError(f"static adapter {adapter} was trained for {trained_for}, not {receiver.fingerprint()}")
    model = PeftModel.from_pretrained(receiver.model, adapter).eval()
    return Backbone(model=model, tokenizer=receiver.tokenizer, ident=f"{receiver.ident}+static:{Path(adapter).name}")


def build_method(cfg: DictConfig, layers: Sequence[Any] = (), overrides: Sequence[str] = ()) -> tuple[Method, DictConfig]:
    """The configured method, ready to answer, and the config it actually runs with. The tflow methods
    run with the checkpoint's own config, with this run's config layers and overrides on top (so a
    checkpoint that does not fit the backbones or architecture is an error, never a silent mismatch)."""
    name = cfg.eval.method
    if name.startswith("tflow"):
        from tflow.config import load_config
        from tflow.infer import TFlowAgents
        from tflow.pipeline import read_checkpoint

        if not cfg.eval.checkpoint:
            raise CheckpointError(f"method {name} needs eval.checkpoint=<generator.pt> (train one with tflow.train)")
        trained = read_checkpoint(cfg.eval.checkpoint)["config"]
        # the layers' train/data sections do not describe this generator: keep what it was trained with
        run_cfg = load_config([trained, *layers, {"train": trained["train"], "data": trained["data"]}], overrides)
        return TFlowMethod(name, TFlowAgents(run_cfg, cfg.eval.checkpoint), run_cfg), run_cfg
    from tflow.pipeline import load_backbones

    receiver, sender = load_backbones(cfg)
    if name == "single":
        return Single(cfg, receiver), cfg
    if name == "static_lora":
        return Single(cfg, static_adapter(receiver, cfg.eval.checkpoint), name="static_lora"), cfg
    if name in ("ac", "kv"):
        from tflow.comparators import ActivationCommunication, KVCommunication

        return (ActivationCommunication if name == "ac" else KVCommunication)(cfg, receiver, sender), cfg
    return TextMAS(cfg, receiver, sender), cfg
