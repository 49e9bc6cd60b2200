"""Accounting: tokens per agent (prompt and generated) and wall-clock per phase.

"Processed tokens" of a method = every agent's prompt tokens + every agent's generated tokens
(sender prefills count for TFlow), not only the receiver's. Torch-free: the statistics and figures
read `PHASES` from here.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterator

# The phases a method's wall-clock time is split into, in pipeline order, with their display names.
PHASES: dict[str, str] = {
    "sender_prefill": "Sender prefill",
    "sender_decode": "Sender messages (decode)",
    "transform": "Cache transformation / edges",
    "generator": r"Generator ($\Delta W$)",
    "receiver_prefill": "Receiver prefill",
    "decode": "Receiver decode",
}


@dataclass
class Accounting:
    tokens: dict[str, dict[str, int]] = field(default_factory=dict)  # agent -> {"prompt", "generated"}
    seconds: dict[str, float] = field(default_factory=dict)  # phase -> seconds

    def add_tokens(self, agent: str, prompt: int = 0, generated: int = 0) -> None:
        t = self.tokens.setdefault(agent, {"prompt": 0, "generated": 0})
        t["prompt"] += prompt
        t["generated"] += generated

    def add_seconds(self, phase: str, seconds: float) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; phases are {list(PHASES)} (tflow.accounting.PHASES)")
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add_seconds(name, time.perf_counter() - t0)

    @property
    def processed_tokens(self) -> int:
        return sum(t["prompt"] + t["generated"] for t in self.tokens.values())

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "processed_tokens": self.processed_tokens, "seconds": self.seconds,
                "total_seconds": sum(self.seconds.values())}


class PrefillTimer:
    """A `generate(streamer=...)` object (transformers calls its put/end) that splits the receiver's time into prefill and decode:
    generate calls put() once with the prompt, then once per generated step."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first_token: float | None = None
        self.calls = 0

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first_token = time.perf_counter()

    def end(self) -> None:
        self.stop = time.perf_counter()

    def split(self) -> tuple[float, float]:
        stop = getattr(self, "stop", time.perf_counter())
        first = self.first_token or stop
        return first - self.start, stop - first
