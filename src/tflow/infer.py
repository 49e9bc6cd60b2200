"""Answer questions with a trained generator: senders prefill, the generator writes a transient
LoRA, the receiver answers under it. Prints each answer and its accounting.

    python -m tflow.infer --checkpoint results/runs/quickstart/generator.pt --question "..."
    python -m tflow.infer --checkpoint ... --questions questions.jsonl   # one {"question": ...} per line

The run config is the checkpoint's own; `key=value` overrides may change the device, dtype or
backend, but a checkpoint that does not fit the backbones or architecture is an error.
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from omegaconf import DictConfig

from tflow.accounting import Accounting, PrefillTimer
from tflow.agents import receiver_batch, sender_states
from tflow.config import load_config
from tflow.errors import cli
from tflow.lora import TransientLoRA
from tflow.models import DTYPES, load_backbones, target_linears
from tflow.pipeline import delta_for, load_generator, read_checkpoint, zero_delta_like


@dataclass
class Answer:
    question: str
    text: str
    generated_tokens: int
    truncated: bool  # hit max_new_tokens without an end-of-turn token
    accounting: Accounting  # per-problem share of the batch's time; exact per-row tokens


def config_from_checkpoint(path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    return load_config([read_checkpoint(path)["config"]], overrides)


class TFlowAgents:
    """Two (or more) frozen senders, a generator checkpoint and a receiver, ready to answer."""

    def __init__(self, cfg: DictConfig, checkpoint: str | Path):
        self.cfg = cfg
        self.receiver, self.sender = load_backbones(cfg)
        self.tflow = load_generator(checkpoint, cfg, self.receiver, self.sender)
        layers = None if cfg.lora.layers is None else list(cfg.lora.layers)
        self.linears = target_linears(self.receiver.model, list(cfg.lora.targets), layers)

    @torch.no_grad()
    def answer(self, questions: Sequence[str], max_new_tokens: int = 256, do_sample: bool = False,
               temperature: float = 0.6, top_p: float = 0.95, zero_delta: bool = False,
               receiver_prompts: Sequence[str] | None = None,
               condition_questions: Sequence[str] | None = None) -> list[Answer]:
        """Answer one batch. `zero_delta=True` is the delta-W = 0 control (same prompt, same hooks).
        `receiver_prompts` (default: the questions) is the receiver's user message, e.g. the question
        plus a task's answer-format instruction; `condition_questions` (default: the questions) is what
        the senders read (the shuffled-condition control passes other problems' questions)."""
        cfg, acc = self.cfg, Accounting()
        n = len(questions)
        sender_inputs = list(condition_questions if condition_questions is not None else questions)
        prompts = list(receiver_prompts if receiver_prompts is not None else questions)
        if len(sender_inputs) != n or len(prompts) != n:
            raise ValueError("questions, receiver_prompts and condition_questions must have the same length")
        per_row = [Accounting() for _ in questions]
        per_example: list[list[torch.Tensor]] = [[] for _ in questions]
        for role in cfg.agents.senders:
            with acc.phase("sender_prefill"):
                states, prompt_tokens = sender_states(self.sender, role, sender_inputs,
                                                      cfg.agents.max_question_tokens, batch_size=max(1, n))
            for i, (s, t) in enumerate(zip(states, prompt_tokens)):
                per_example[i].append(s)
                per_row[i].add_tokens(f"sender:{role}", prompt=t)
        batch = receiver_batch(self.receiver.tokenizer, cfg.agents.receiver, prompts, padding_side="left")
        with acc.phase("generator"):
            delta, _ = delta_for(self.tflow, self.receiver, per_example, batch)
            if zero_delta:
                delta = zero_delta_like(delta)
        tok = self.receiver.tokenizer
        timer = PrefillTimer()
        with TransientLoRA(self.linears, delta, backend=cfg.backend, factor_dtype=DTYPES[cfg.lora.factor_dtype]):
            out = self.receiver.model.generate(
                **{k: v.to(self.receiver.device) for k, v in batch.items()}, max_new_tokens=max_new_tokens,
                do_sample=do_sample, temperature=temperature if do_sample else None, top_p=top_p if do_sample else None,
                top_k=None, pad_token_id=tok.pad_token_id, streamer=timer)
        prefill, decode = timer.split()
        acc.add_seconds("receiver_prefill", prefill)
        acc.add_seconds("decode", decode)
        answers = []
        width = batch["input_ids"].shape[1]
        for i, q in enumerate(questions):
            gen = out[i, width:].tolist()
            stop = [j for j, t in enumerate(gen) if t in (tok.eos_token_id, tok.pad_token_id)]
            gen = gen[: stop[0]] if stop else gen
            row = per_row[i]
            row.add_tokens("receiver", prompt=int(batch["attention_mask"][i].sum()), generated=len(gen))
            for phase, sec in acc.seconds.items():
                row.add_seconds(phase, sec / n)
            answers.append(Answer(q, tok.decode(gen, skip_special_tokens=True), len(gen), not stop, row))
        return answers


@cli
def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="generator.pt written by tflow.train")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--question")
    src.add_argument("--questions", help="JSONL file with a 'question' field per line")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--sample", action="store_true", help="sample (T=0.6, top_p=0.95) instead of greedy")
    ap.add_argument("--out", help="write one JSON line per answer here")
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. model.receiver.device=cuda backend=torch")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = config_from_checkpoint(args.checkpoint, args.overrides)
    agents = TFlowAgents(cfg, args.checkpoint)
    if args.question:
        questions = [args.question]
    else:
        questions = [json.loads(ln)["question"] for ln in Path(args.questions).read_text().splitlines() if ln.strip()]
    records = []
    for k in range(0, len(questions), args.batch_size):
        for a in agents.answer(questions[k:k + args.batch_size], args.max_new_tokens, do_sample=args.sample):
            rec = {"question": a.question, "answer": a.text, "truncated": a.truncated, **a.accounting.to_dict()}
            records.append(rec)
            print(f"Q: {a.question}\nA: {a.text}\n   tokens {json.dumps(a.accounting.tokens)} | "
                  f"processed {a.accounting.processed_tokens} | seconds "
                  + ", ".join(f"{p} {s:.2f}" for p, s in a.accounting.seconds.items()) + "\n")
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in records))


if __name__ == "__main__":
    main()
