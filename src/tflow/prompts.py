"""Role prompts and chat formatting (torch-free: the config validates role names against `ROLES`).

A sender is a frozen backbone with a role system prompt; the receiver answers under its own role.
"""
from __future__ import annotations

from typing import Any

from tflow.registry import Registry

# System prompts (written for this reproduction). Senders analyse; they never answer.
ROLES: Registry[str] = Registry("role", "agents.senders / agents.receiver", {
    "strategist": (
        "You are a strategist on a problem-solving team. Read the task and work out how to approach it: "
        "the key steps, the order in which to take them, and the traps to avoid. Do not solve the task yourself."
    ),
    "knowledge_extractor": (
        "You are a knowledge extractor on a problem-solving team. Read the task and name the facts, definitions, "
        "formulas and domain knowledge that solving it requires. Do not solve the task yourself."
    ),
    "solver": (
        "You are a careful problem solver. Think step by step and state the final answer clearly at the end."
    ),
    # The prompt-confound arm: the release's receiver is an "executor" whose dataset-specific system prompts
    # push for concise, non-repetitive solving and a final re-check (written here in our own words).
    "executor": (
        "You are the executor of a problem-solving team. Solve concisely: state each intermediate result once, "
        "never repeat a calculation or an approach you have tried, re-read the question to answer exactly what "
        "it asks, check that you used every given fact, and end with the final answer in the requested format."
    ),
})


def chat_text(tokenizer: Any, role: str, question: str, answer: str | None = None) -> str:
    """The role's chat prompt for `question` (ending with the assistant turn's opening). The template's
    switches (`model.enable_thinking`) ride on the tokenizer as `chat_template_kwargs`, set when the
    backbone is loaded, so training, evaluation and every agent render prompts alike."""
    messages = [{"role": "system", "content": ROLES[role]}, {"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         **getattr(tokenizer, "chat_template_kwargs", {}))
    return text if answer is None else text + answer
