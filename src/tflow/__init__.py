"""TFlow reproduction: LLM agents that communicate by generating transient, per-query LoRA weights.

Modules: config (run configuration), models (backbones and offline assets), agents (roles,
conditions), generator (layer aggregator + parameter generator), fusion (sender fusion registry),
lora (transient application), pipeline (TFlow module + checkpoints), data (training data),
train / infer / export / heldout (entry points), accounting (tokens and time).
"""
__version__ = "0.1.0"
