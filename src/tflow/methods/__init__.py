"""The evaluation methods: one registry that declares what each method needs (torch-free).

Every method answers a batch of problems and returns, per problem, the receiver's text and an
accounting of every agent's tokens and every phase's seconds (`tflow.methods.base`). A method's
`MethodSpec` says where it is implemented, what it needs before it can run, and whether it depends
on the ablation cell; the workflow derives from it which training rule feeds which evaluation and
which methods are cell-free (`tflow.experiment`). Adding a method is its module, one entry here and
its YAML entries (a family in the DAG config, a label in config/paper.yaml).

  needs="none"       nothing trained (single, textmas, ac, kv, kv_prompt)
  needs="generator"  a TFlow generator checkpoint of its cell (tflow and its controls)
  needs="trained"    its own trained module, written by `python -m <trainer>` into a folder whose
                     `trained.json` marks it finished (static_lora, lmnet, kv_hetero); a preset that changes
                     training (lmnet-mlp) trains a module of its own with the preset's overrides, a preset of
                     evaluation settings (kv_hetero-aware/-unaware) evaluates the method's one module
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Sequence

from tflow.registry import Registry, load_object

if TYPE_CHECKING:  # the implementations import torch
    from omegaconf import DictConfig

    from tflow.methods.base import Method


@dataclass(frozen=True)
class MethodSpec:
    target: str  # "module:Class"; Class.build(cfg, layers, overrides) -> (method, the config it runs with)
    category: Literal["baseline", "text", "weights", "control", "latent"]
    summary: str  # what the receiver gets, in a few words
    needs: Literal["none", "generator", "trained"] = "none"
    trainer: str | None = None  # needs="trained": the training entry point (python -m <trainer>)
    cell: bool = False  # evaluated per ablation cell (else once per task and seed, in no cell)
    presets: dict[str, tuple[str, ...]] = field(default_factory=dict)  # DAG name suffix -> eval overrides


METHODS: Registry[MethodSpec] = Registry("method", "eval.method", {
    "single": MethodSpec("tflow.methods.single:Single", "baseline", "the receiver alone"),
    "textmas": MethodSpec(
        "tflow.methods.textmas:TextMAS", "text", "the senders' text messages before the task prompt",
        presets={"long": ("eval.textmas_preset=long",), "short48": ("eval.textmas_preset=short48",)}),
    "tflow": MethodSpec("tflow.methods.tflow:TFlowMethod", "weights", "the generator's transient LoRA",
                        needs="generator", cell=True),
    "tflow_zero_delta": MethodSpec("tflow.methods.tflow:TFlowMethod", "control",
                                   "the same hooks with delta-W = 0", needs="generator", cell=True,
                                   presets={"executor": ("eval.receiver_role=executor",)}),  # the prompt arm
    "tflow_shuffled": MethodSpec("tflow.methods.tflow:TFlowMethod", "control",
                                 "the LoRA generated from another problem's senders", needs="generator", cell=True),
    "static_lora": MethodSpec("tflow.methods.static_lora:StaticLoRA", "control",
                              "one LoRA trained on the same data and budget", needs="trained",
                              trainer="tflow.methods.static_lora"),
    "ac": MethodSpec("tflow.methods.latent:ActivationCommunication", "latent",
                     "the senders' layer-k state combined into its layer-j state"),
    "kv": MethodSpec("tflow.methods.latent:KVCommunication", "latent",
                     "the senders' KV cache of their prompts and messages before its prompt"),
    "kv_prompt": MethodSpec("tflow.methods.latent:KVPromptCommunication", "latent",
                            "the senders' prompt-only KV cache (with one backbone: a longer prompt)"),
    "kv_hetero": MethodSpec("tflow.methods.kv_hetero:KVHetero", "latent",
                            "a sender model's KV cache mapped to its layers by a learned transformation",
                            needs="trained", trainer="tflow.methods.kv_hetero",
                            presets={"aware": ("eval.kv_context=aware",), "unaware": ("eval.kv_context=unaware",)}),
    "lmnet": MethodSpec("tflow.methods.lmnet:LMNet", "latent",
                        "the senders' final states through trained seq2seq edges, as soft tokens in its prompt",
                        needs="trained", trainer="tflow.methods.lmnet", presets={"mlp": ("lmnet.edge=mlp",)}),
})

# TextMAS message budgets (eval.textmas_preset): the paper's senders stop at the end of their turn
# within 1024 new tokens; the reviewers' baseline writes exactly 48 tokens each.
TEXTMAS_PRESETS: dict[str, dict[str, Any]] = {
    "long": {"message_tokens": 1024, "fixed": False},
    "short48": {"message_tokens": 48, "fixed": True},
}


def build_method(cfg: "DictConfig", layers: Sequence[Any] = (), overrides: Sequence[str] = ()
                 ) -> tuple["Method", "DictConfig"]:
    """The configured method, ready to answer, and the config it actually runs with (a generator's
    methods run with the checkpoint's own config under this run's layers and overrides)."""
    return load_object(METHODS[cfg.eval.method].target).build(cfg, layers, overrides)
