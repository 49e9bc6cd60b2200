"""Answer questions with a trained generator: senders prefill, the generator writes a transient
LoRA, the receiver answers under it. Prints each answer and its accounting.

    python -m tflow.infer --checkpoint results/runs/quickstart/generator.pt --question "..."
    python -m tflow.infer --checkpoint ... --questions questions.jsonl   # one {"question": ...} per line

The run config is the checkpoint's own; `key=value` overrides may change the device, dtype or
backend, but a checkpoint that does not fit the backbones or architecture is an error. The questions
and the checkpoint are checked before any model loads. `--sample` seeds each question's sampler from
`--seed` and the question's text, so an answer does not depend on the batch it runs in.
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
from tflow.errors import InputError, cli
from tflow.lora import TransientLoRA
from tflow.methods.base import decode_rows, decoding, row_seed
from tflow.models import DTYPES, load_backbones, target_linears
from tflow.pipeline import checked_checkpoint, delta_for, load_generator, read_checkpoint, zero_delta_like
from tflow.utils import write_text_atomic


@dataclass
class Answer:
    question: str
    text: str
    generated_tokens: int
    truncated: bool  # hit max_new_tokens without an end-of-turn token
    accounting: Accounting  # per-problem share of the batch's time; exact per-row tokens


def config_from_checkpoint(path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    return load_config([read_checkpoint(path)["config"]], overrides)


QUESTION_LINE = 'one JSON object per line, e.g. {"question": "What is 2 + 2?"}'


def read_questions(question: str | None, path: str | None) -> list[str]:
    """The questions of `--question` or a `--questions` JSONL file, checked before any model loads."""
    if path is None:
        if not (question or "").strip():
            raise InputError("--question is empty; give the question's text, e.g. --question 'What is 2 + 2?'")
        return [question]  # type: ignore[list-item]
    file = Path(path)
    if not file.is_file():
        raise InputError(f"--questions file not found: {file}")
    data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        at = data[:err.start].count(b"\n") + 1
        raise InputError(f"{file} is not UTF-8 text (byte {err.start}, line {at}); save it as UTF-8") from None
    questions = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{file}, line {i}: not JSON ({err.msg}); write {QUESTION_LINE}") from None
        q = rec.get("question") if isinstance(rec, dict) else None
        if not isinstance(q, str) or not q.strip():
            raise InputError(f"{file}, line {i}: no non-empty string field 'question'; write {QUESTION_LINE}")
        questions.append(q)
    if not questions:
        raise InputError(f"{file} holds no questions; write {QUESTION_LINE}")
    return questions


class TFlowAgents:
    """Two (or more) frozen senders, a generator checkpoint and a receiver, ready to answer."""

    def __init__(self, cfg: DictConfig, checkpoint: str | Path):
        self.cfg = cfg
        ckpt = checked_checkpoint(checkpoint, cfg)  # a checkpoint that cannot fit fails before any model loads
        self.receiver, self.sender = load_backbones(cfg)
        self.tflow = load_generator(checkpoint, cfg, self.receiver, self.sender, ckpt)
        layers = None if cfg.lora.layers is None else list(cfg.lora.layers)
        self.linears = target_linears(self.receiver.model, list(cfg.lora.targets), layers)

    @torch.no_grad()
    def answer(self, questions: Sequence[str], max_new_tokens: int = 256, do_sample: bool = False,
               temperature: float = 0.6, top_p: float = 0.95, zero_delta: bool = False,
               receiver_prompts: Sequence[str] | None = None, condition_questions: Sequence[str] | None = None,
               row_seeds: Sequence[int] | None = None, receiver_role: str | None = None) -> list[Answer]:
        """Answer one batch. `zero_delta=True` is the delta-W = 0 control (same prompt, same hooks).
        `receiver_prompts` (default: the questions) is the receiver's user message, e.g. the question
        plus a task's answer-format instruction; `condition_questions` (default: the questions) is what
        the senders read (the shuffled-condition control passes other problems' questions). With
        `do_sample`, row i samples with its own generator seeded `row_seeds[i]` (default: from its question).
        `receiver_role` (default agents.receiver) is the receiver's role prompt (the prompt arm's executor)."""
        cfg, acc = self.cfg, Accounting()
        n = len(questions)
        sender_inputs = list(condition_questions if condition_questions is not None else questions)
        prompts = list(receiver_prompts if receiver_prompts is not None else questions)
        seeds = list(row_seeds if row_seeds is not None else [row_seed(0, q, "receiver") for q in questions])
        if not len(sender_inputs) == len(prompts) == len(seeds) == n:
            raise ValueError("questions, receiver_prompts, condition_questions and row_seeds must have the same length")
        per_row = [Accounting() for _ in questions]
        per_example: list[list[torch.Tensor]] = [[] for _ in questions]
        for role in cfg.agents.senders:
            with acc.phase("sender_prefill"):
                states, prompt_tokens = sender_states(self.sender, role, sender_inputs,
                                                      cfg.agents.max_question_tokens, batch_size=max(1, n))
            for i, (s, t) in enumerate(zip(states, prompt_tokens)):
                per_example[i].append(s)
                per_row[i].add_tokens(f"sender:{role}", prompt=t)
        batch = receiver_batch(self.receiver.tokenizer, receiver_role or cfg.agents.receiver, prompts, padding_side="left")
        with acc.phase("generator"):
            delta, _ = delta_for(self.tflow, self.receiver, per_example, batch)
            if zero_delta:
                delta = zero_delta_like(delta)
        tok = self.receiver.tokenizer
        timer = PrefillTimer()
        with TransientLoRA(self.linears, delta, backend=cfg.backend, factor_dtype=DTYPES[cfg.lora.factor_dtype]):
            out = self.receiver.model.generate(
                **{k: v.to(self.receiver.device) for k, v in batch.items()}, max_new_tokens=max_new_tokens,
                pad_token_id=tok.pad_token_id, streamer=timer, **decoding(do_sample, temperature, top_p, seeds),
                **({"cache_implementation": "static"} if cfg.eval.cache == "static" else {}))
        prefill, decode = timer.split()
        acc.add_seconds("receiver_prefill", prefill)
        acc.add_seconds("decode", decode)
        answers = []
        for i, (q, (text, gen, truncated)) in enumerate(zip(questions, decode_rows(tok, out[:, batch["input_ids"].shape[1]:]))):
            row = per_row[i]
            row.add_tokens("receiver", prompt=int(batch["attention_mask"][i].sum()), generated=gen)
            for phase, sec in acc.seconds.items():
                row.add_seconds(phase, sec / n)
            answers.append(Answer(q, text, gen, truncated, row))
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
    ap.add_argument("--seed", type=int, default=0, help="with --sample: each question samples with a generator "
                    "seeded from this and its text")
    ap.add_argument("--out", help="write one JSON line per answer here")
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. model.receiver.device=cuda backend=torch")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise InputError("--batch-size and --max-new-tokens must be >= 1")
    questions = read_questions(args.question, args.questions)
    cfg = config_from_checkpoint(args.checkpoint, args.overrides)
    agents = TFlowAgents(cfg, args.checkpoint)
    records = []
    for k in range(0, len(questions), args.batch_size):
        chunk = questions[k:k + args.batch_size]
        for a in agents.answer(chunk, args.max_new_tokens, do_sample=args.sample,
                               row_seeds=[row_seed(args.seed, q, "receiver") for q in chunk]):
            rec = {"question": a.question, "answer": a.text, "truncated": a.truncated, **a.accounting.to_dict()}
            records.append(rec)
            print(f"Q: {a.question}\nA: {a.text}\n   tokens {json.dumps(a.accounting.tokens)} | "
                  f"processed {a.accounting.processed_tokens} | seconds "
                  + ", ".join(f"{p} {s:.2f}" for p, s in a.accounting.seconds.items()) + "\n")
    if args.out:
        write_text_atomic(args.out, "".join(json.dumps(r) + "\n" for r in records))


if __name__ == "__main__":
    main()
