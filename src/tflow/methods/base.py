"""What every method shares: the `Method` interface, its output, and batched generation with one
accounting for all.

Every method answers a batch of problems given the task's receiver prompts and returns, per
problem, the receiver's text, its generated-token count, whether it hit the token budget, and an
`Accounting` with the prompt and generated tokens of EVERY agent and seconds per phase (a batch's
seconds are shared equally among its rows). Methods are registered in `tflow.methods.METHODS`.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
from omegaconf import DictConfig

from tflow.accounting import Accounting, PrefillTimer
from tflow.agents import receiver_batch
from tflow.errors import CheckpointError, ConfigError
from tflow.models import Backbone
from tflow.tasks.base import EvalProblem
from tflow.utils import write_json_atomic


@dataclass
class MethodOutput:
    text: str
    generated_tokens: int
    truncated: bool  # the receiver hit max_new_tokens without ending its turn
    accounting: Accounting
    messages: dict[str, str] | None = None  # textmas: each sender's message


class Method(Protocol):
    name: str

    @classmethod
    def build(cls, cfg: DictConfig, layers: Sequence[Any], overrides: Sequence[str]) -> tuple["Method", DictConfig]:
        """The method for `cfg` (models loaded) and the config it runs with."""
        ...

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


# A method with its own trained module (MethodSpec.needs == "trained") is trained by `python -m <trainer>`
# into a folder; `trained.json`, written last and atomically, marks it finished and says for what.
TRAINED_MARKER = "trained.json"


def write_trained(out: str | Path, method: str, chash: str, receiver: Backbone, **extra: Any) -> None:
    write_json_atomic(Path(out) / TRAINED_MARKER, {"method": method, "config_hash": chash,
                                                   "receiver": receiver.fingerprint(), **extra})


def trained_hash(out: str | Path) -> str | None:
    """The config hash of a finished training in `out`, or None when there is none."""
    marker = Path(out) / TRAINED_MARKER
    return json.loads(marker.read_text())["config_hash"] if marker.is_file() else None


def read_trained(folder: str | None, method: str, receiver: Backbone) -> Path:
    """The folder of a finished training of `method` for this receiver; a CheckpointError otherwise."""
    marker = Path(folder or "") / TRAINED_MARKER
    if not folder or not marker.is_file():
        raise CheckpointError(f"method {method} needs eval.checkpoint=<a folder trained by its trainer "
                              f"(tflow.methods.METHODS[{method!r}].trainer)>; {marker} not found")
    info = json.loads(marker.read_text())
    if info.get("method") != method:
        raise CheckpointError(f"{folder} holds a trained {info.get('method')!r}, not {method!r}")
    if info.get("receiver") != receiver.fingerprint():
        raise CheckpointError(f"{folder} was trained for receiver {info.get('receiver')}, not {receiver.fingerprint()}")
    return Path(folder)


# Held-out evidence (the `heldout` family): a method that can score reference solutions teacher-forced
# implements `reference_nll(problems) -> [(summed token NLL, scored tokens)]`, one pair per problem, with
# the receiver reading the problem as in training (tflow.mix.receiver_prompt) and the target p.solution.
def reference_batch(tokenizer: Any, role: str, problems: Sequence[Any], max_tokens: int) -> dict[str, torch.Tensor]:
    """The receiver's teacher-forced batch of reference solutions: each problem's task prompt (as in training
    and evaluation) followed by its target (p.solution), labels on the target only."""
    from tflow.mix import receiver_prompt

    return receiver_batch(tokenizer, role, [receiver_prompt(p) for p in problems], [p.solution for p in problems],
                          max_tokens, padding_side="right")


def row_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[list[float], list[int]]:
    """Per row of a causal-LM batch: the summed next-token NLL of the labelled tokens and their count.
    logits [B, T, V], labels [B, T] with -100 where not scored."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]  # position t predicts token t+1
    nll = torch.nn.functional.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=-100,
                                            reduction="none")  # [B, T-1]
    mask = shift_labels != -100
    return (nll * mask).sum(1).tolist(), mask.sum(1).tolist()
