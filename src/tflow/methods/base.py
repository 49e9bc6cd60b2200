"""What every method shares: the `Method` interface, its output, and batched generation with one
accounting for all.

Every method answers a batch of problems given the task's receiver prompts and returns, per
problem, the receiver's text, its generated-token count, whether it hit the token budget, and an
`Accounting` with the prompt and generated tokens of EVERY agent and seconds per phase (a batch's
seconds are shared equally among its rows). Methods are registered in `tflow.methods.METHODS`.

Sampling (`eval.do_sample`) is per problem: each row of a batch draws from its own generator, seeded from
the run seed, the problem's task id and the agent (`row_seed`), so a problem's answer does not depend on
what ran before in the process or on which problems share its batch (`RowSampler`, used by every
generation path: `generate`, the KV comparator, `tflow.infer.TFlowAgents.answer`).
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
from omegaconf import DictConfig
from transformers import LogitsProcessor, LogitsProcessorList

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


def row_seed(seed: int, key: str, agent: str) -> int:
    """A stable seed for one agent on one problem: sha256 of (run seed, problem key, agent), never Python's
    hash() (salted per process)."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{key}\0{agent}".encode()).digest()[:8], "little") >> 1


class RowSampler(LogitsProcessor):
    """Temperature/top-p sampling that does not depend on the batch: each row draws its next token with its own
    torch.Generator and forces it (every other logit -inf), so generate() runs greedy (do_sample=False)."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float):
        if temperature <= 0 or not 0 < top_p <= 1:
            raise ConfigError(f"sampling needs temperature > 0 and 0 < top_p <= 1 (got {temperature}, {top_p}); "
                              "set eval.temperature / eval.top_p, or eval.do_sample=false for greedy")
        self.seeds, self.temperature, self.top_p = list(seeds), temperature, top_p
        self.generators: list[torch.Generator] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.generators:
            self.generators = [torch.Generator(scores.device).manual_seed(s) for s in self.seeds]
        if len(self.generators) != scores.shape[0]:
            raise ValueError(f"RowSampler has {len(self.generators)} seeds for a batch of {scores.shape[0]} rows")
        probs, order = torch.softmax(scores.float() / self.temperature, -1).sort(-1, descending=True)
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= self.top_p, 0.0)  # nucleus: keeps >= 1 token
        picks = torch.stack([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)])
        return torch.full_like(scores, float("-inf")).scatter_(-1, order.gather(-1, picks), 0.0)


def decoding(do_sample: bool, temperature: float, top_p: float, seeds: Sequence[int]) -> dict[str, Any]:
    """generate() keyword arguments: plain greedy, or per-row seeded sampling (`RowSampler`, run as greedy)."""
    kw: dict[str, Any] = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    if do_sample:
        kw["logits_processor"] = LogitsProcessorList([RowSampler(seeds, temperature, top_p)])
    return kw


def sampling(ev: DictConfig, task_ids: Sequence[str], agent: str) -> dict[str, Any]:
    """generate() keyword arguments for the configured decoding of `agent` on these problems (greedy unless
    eval.do_sample; each row then seeded from eval.seed, its task id and the agent)."""
    kw = decoding(ev.do_sample, ev.temperature, ev.top_p, [row_seed(ev.seed, t, agent) for t in task_ids])
    return {**kw, "cache_implementation": "static"} if ev.cache == "static" else kw


def receiver_role(cfg: DictConfig) -> str:
    """The receiver's role prompt at evaluation: eval.receiver_role (the prompt arm), else agents.receiver."""
    return cfg.eval.receiver_role or cfg.agents.receiver


def decode_rows(tok: Any, generated: torch.Tensor, forced: bool = False) -> list[tuple[str, int, bool]]:
    """Per row of generated ids [B, N]: (text up to end of turn, its token count, truncated)."""
    results = []
    for row in generated.tolist():
        stop = [j for j, t in enumerate(row) if t in (tok.eos_token_id, tok.pad_token_id)]
        gen = row[: stop[0]] if stop else row
        results.append((tok.decode(gen, skip_special_tokens=True), len(gen), not stop and not forced))
    return results


def generate(backbone: Backbone, role: str, messages: Sequence[str], ev: DictConfig, acc: Accounting,
             rows: list[Accounting], agent: str, max_new_tokens: int, task_ids: Sequence[str],
             min_new_tokens: int = 0, phases: tuple[str, str] = ("receiver_prefill", "decode"),
             ) -> list[tuple[str, int, bool]]:
    """Batched chat generation for one agent (row i answers problem task_ids[i]). Adds the agent's tokens to
    each row's accounting and the batch's prefill/decode seconds to `acc`. Returns (text, generated tokens,
    truncated) per row."""
    tok = backbone.tokenizer
    batch = receiver_batch(tok, role, messages, padding_side="left")
    timer = PrefillTimer()
    with torch.no_grad():
        out = backbone.model.generate(**{k: v.to(backbone.device) for k, v in batch.items()},
                                      max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                      pad_token_id=tok.pad_token_id, streamer=timer, **sampling(ev, task_ids, agent))
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


def _read_marker(marker: Path) -> dict[str, Any]:
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
        if isinstance(info, dict) and isinstance(info.get("config_hash"), str):
            return info
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        pass
    raise CheckpointError(f"{marker} is unreadable or incomplete (not the JSON its trainer writes); delete "
                          f"{marker.parent} and train again")


def trained_hash(out: str | Path) -> str | None:
    """The config hash of a finished training in `out`, or None when there is none."""
    marker = Path(out) / TRAINED_MARKER
    return _read_marker(marker)["config_hash"] if marker.is_file() else None


def read_trained(folder: str | None, method: str, receiver: Backbone) -> Path:
    """The folder of a finished training of `method` for this receiver; a CheckpointError otherwise."""
    marker = Path(folder or "") / TRAINED_MARKER
    if not folder or not marker.is_file():
        raise CheckpointError(f"method {method} needs eval.checkpoint=<a folder trained by its trainer "
                              f"(tflow.methods.METHODS[{method!r}].trainer)>; {marker} not found")
    info = _read_marker(marker)
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
