"""Shared fixtures: a tokenizer built at test time and tiny random Llama backbones (no files)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():  # run Triton kernels through the interpreter (before any kernel is decorated)
    os.environ.setdefault("TRITON_INTERPRET", "1")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? The answer is 72.",
    "You are a strategist. You are a knowledge extractor. You are a careful problem solver.",
    "Think step by step and state the final answer clearly at the end. Compute 3 + 4 = 7.",
    "def add(a, b):\n    return a + b\n",
] * 20


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=400, min_frequency=1,
                            special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token="<pad>", eos_token="<|im_end|>",
                                  bos_token="<|im_start|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_backbone(tokenizer, seed: int = 0, hidden: int = 32, layers: int = 2, ident: str = "tiny:llama",
                  init_range: float = 0.02):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tflow.models import Backbone

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                      initializer_range=init_range)
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    return Backbone(model=model, tokenizer=tokenizer, ident=ident)


@pytest.fixture
def tiny_backbone(tiny_tokenizer):
    return make_backbone(tiny_tokenizer)


@pytest.fixture(scope="session")
def data_dir() -> str:
    """The offline data folder: $TFLOW_DATA_DIR, else ../shared/data beside the repository."""
    return os.environ.get("TFLOW_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))


def save_tiny_model(folder: Path, tokenizer) -> Path:
    """A tiny Llama + tokenizer as a transformers folder, loadable with model.receiver.source=path
    (init_range 0.5: sharp logits, so end-of-turn is rarely sampled)."""
    make_backbone(tokenizer, init_range=0.5).model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_tiny_layer(work: Path, tokenizer, data_dir: str, **train) -> Path:
    """work/tiny.yaml: a run-config layer on a tiny model saved in work/tiny-llama (cache in work/cache)."""
    import yaml

    model_dir = save_tiny_model(work / "tiny-llama", tokenizer)
    layer = {"model": {"receiver": {"source": "path", "name": str(model_dir), "dtype": "float32", "device": "cpu"},
                       "threads": 1, "cache_dir": str(work / "cache")},
             "data": {"data_dir": data_dir, "per_source_limit": 24, "max_solution_tokens": 32},
             "train": train}
    (work / "tiny.yaml").write_text(yaml.safe_dump(layer))
    return work / "tiny.yaml"


TINY_OVERRIDES = [
    "generator.width=32", "generator.heads=2", "generator.tile_size=16", "generator.depth=1",
    "fusion.gate_width=8", "lora.output_scale=1.0", "agents.max_question_tokens=64",
]


@pytest.fixture
def tiny_cfg():
    from tflow.config import load_config

    return load_config(overrides=TINY_OVERRIDES)
