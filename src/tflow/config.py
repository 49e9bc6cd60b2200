"""Run configuration: OmegaConf structured dataclasses, layered YAML files and dotlist overrides.

A run is configured by `RunConfig` defaults <- YAML layers (in order) <- `key=value` overrides.
Unknown keys and wrong types fail here, before any model is loaded, with the offending key named.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tflow.errors import ConfigError

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class BackboneConfig:
    """Where a backbone comes from. source: `asset` (offline registry name), `hub` (a hub id such
    as Qwen/Qwen3-4B; needs internet) or `path` (a local transformers folder)."""

    source: str = "asset"
    name: str = "smollm2-135m-instruct"
    dtype: str = "bfloat16"  # float32 | bfloat16 | float16 (bf16 is ~2x faster than fp32 on CPU)
    device: str = "cpu"
    revision: Optional[str] = None  # hub revision (commit/tag) for reproducible hub runs


@dataclass
class ModelConfig:
    receiver: BackboneConfig = field(default_factory=BackboneConfig)
    # None: the senders share the receiver's backbone instance (the TFlow release). A different
    # backbone of the same family (e.g. a smaller sender) is allowed.
    sender: Optional[BackboneConfig] = None
    cache_dir: str = "${oc.env:TFLOW_CACHE,'~/.cache/tflow-repro'}"  # converted assets, conditions
    threads: int = 0  # torch intra-op threads on CPU; 0 = torch's default
    # Qwen3's thinking mode, passed to the chat template in training and evaluation alike (None: the
    # template's default; templates without the switch ignore it). Paper scale: true, as the release runs.
    enable_thinking: Optional[bool] = None


@dataclass
class AgentsConfig:
    senders: list[str] = field(default_factory=lambda: ["strategist", "knowledge_extractor"])
    receiver: str = "solver"
    max_question_tokens: int = 256  # question span longer than this is cut (recorded in the log)


@dataclass
class LoraConfig:
    rank: int = 4
    alpha: float = 8.0  # LoRA scale = alpha / rank
    output_scale: float = 0.01  # multiplies both generated A and B (TFlow)
    targets: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS))
    layers: Optional[list[int]] = None  # None = every decoder layer
    # Storage of the generated factors while applied at inference: float32 | bfloat16 (half the bytes
    # a decode step reads for them; the rank intermediate and accumulation stay fp32). Training uses fp32.
    factor_dtype: str = "float32"


@dataclass
class GeneratorConfig:
    # repro: this package's compact generator (tflow.generator); release: the released TFlow architecture
    # (tflow.generator_release; condition-initialised tokens, rotary positions, SiLU MLP, RMSNorm, no sender
    # embedding), what the paper-scale config runs
    variant: str = "repro"
    width: int = 256  # TFlow uses 1024 for Qwen3-4B
    depth: int = 2  # transformer blocks over parameter tokens
    heads: int = 4
    mlp_ratio: int = 2  # the release: 4
    tile_size: int = 192  # columns of a LoRA factor produced by one parameter token (release: a tile's row)
    accumulation: int = 2  # release variant: tile rows packed into one parameter token
    sender_embedding: bool = True  # a learned per-role vector added to the condition (repro variant only)


@dataclass
class FusionConfig:
    name: str = "mean"  # mean | max | attention (tflow.registry.FUSIONS)
    gate_width: int = 64  # attention fusion: width of the query/key projections


@dataclass
class LMNetConfig:
    """The `lmnet` comparator (tflow.methods.lmnet): one trainable seq2seq edge per sender -> receiver."""

    edge: str = "transformer"  # transformer (self-attention + MLP blocks, LMNet's edge) | mlp (per token, no attention)
    depth: int = 1  # blocks per edge
    heads: int = 4  # transformer edge: attention heads (the width is a multiple of it)
    mlp_ratio: int = 2
    width: Optional[int] = None  # None: chosen so the edges' parameters match TFlow's generator's
    match_tolerance: float = 0.1  # relative gap allowed between the two parameter counts when matching


@dataclass
class SourceWeight:
    source: str  # tflow.data.SOURCES
    weight: float = 1.0


@dataclass
class DataConfig:
    data_dir: str = "${oc.env:TFLOW_DATA_DIR,'../shared/data'}"
    # The training mix (tflow.mix): sources drawn in proportion to their weights. Offline default: math word
    # problems, competition math and two code sources; paper scale: the hub reasoning corpora. A list, so a
    # layer replaces the whole mix.
    mix: list[SourceWeight] = field(default_factory=lambda: [
        SourceWeight("gsm8k", 0.35), SourceWeight("math", 0.35), SourceWeight("mbpp", 0.15),
        SourceWeight("basic_coding", 0.15)])
    per_source_limit: int = 0  # 0 = every decontaminated problem of each source; N: a seeded N of them
    decontaminate_against: list[str] = field(default_factory=lambda: [  # evaluation tasks; <task>@hub: its hub copy
        "gsm8k", "math500", "mmlu_redux", "humanevalplus", "mbppplus"])
    ngram: int = 13  # word n-gram overlap that marks a training problem as contaminated
    validation_size: int = 64  # problems held back per source (at most a tenth of it) for validation choices
    reasoning_traces: bool = False  # hub corpora: keep the reasoning trace as a <think> block in the target
    heldout_size: int = 64  # GSM8K test problems used for the held-out loss comparison
    max_solution_tokens: int = 384


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 10
    grad_clip: float = 1.0
    l2_delta: float = 1e-3  # weight of the mean ||scale * B A||_F^2 penalty on generated weights
    lr_grid: list[float] = field(default_factory=lambda: [0.25, 1.0, 4.0])  # factors of lr the static LoRA
    # chooses from on the validation problems (tflow.methods.static_lora)
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 50
    validation_every: int = 0  # the generator's CE on the held-back validation problems before training, every N
    # steps and after the last (train_log.jsonl; `python -m tflow.curve` draws it and finds where it stops
    # improving); 0 = never
    out_dir: str = "results/runs/default"


@dataclass
class EvalConfig:
    """One evaluation run: a method on a (subset of a) benchmark (see tflow.evaluate)."""

    task: str = "gsm8k"  # tflow.tasks.TASKS: gsm8k | math500 | mmlu_redux | humanevalplus | mbppplus
    source: str = "offline"  # offline (shared data folder / packages) | hub (datasets / evalplus downloads)
    n: Optional[int] = None  # problems in the subset (seeded by subset_seed); None = the whole set
    subset_seed: int = 0
    method: str = "single"  # tflow.methods.METHODS
    checkpoint: Optional[str] = None  # generator.pt (needs="generator") or a trained folder (needs="trained")
    max_new_tokens: int = 512  # the receiver's budget; hitting it is recorded as truncated
    do_sample: bool = False  # greedy by default
    temperature: float = 0.6
    top_p: float = 0.95
    batch_size: int = 8
    sort_by_length: bool = False  # batches of similar prompt lengths (less padding; fixed, so resumes agree)
    cache: str = "dynamic"  # the receiver's KV cache in generate(): dynamic | static (preallocated)
    seed: int = 0  # sampling seed and the shuffled-condition permutation
    textmas_preset: str = "long"  # long: senders write up to 1024 tokens (paper); short48: exactly 48 each
    # The receiver's role prompt at evaluation (None: agents.receiver, the prompt it was trained with). The
    # prompt-confound arm sets `executor`, a paraphrase of the release's task-specific executor prompts.
    receiver_role: Optional[str] = None
    message_tokens: Optional[int] = None  # overrides the preset's sender message budget
    ac_sender_layer: Optional[int] = None  # activation communication: sender layer k (None: round(0.93 L))
    ac_receiver_layer: Optional[int] = None  # receiver layer j (None: round(0.93 L)); negative counts from the end
    ac_op: str = "replace"  # replace | sum | mean
    kv_context: str = "aware"  # kv_hetero: aware (the receiver also reads the question) | unaware (only the
    # transferred cache and the answer format)
    out_dir: str = "results/eval/default"


@dataclass
class KVConfig:
    """The KV-cache comparators: `kv` (homogeneous, after the senders' messages) and `kv_hetero` (a learned
    cache transformation from a sender model to the receiver, tflow.methods.kv_hetero)."""

    message_tokens: int = 48  # kv: tokens each sender writes before its KV is sent (TextMAS short48's budget)
    reconstruction_fraction: float = 0.5  # kv_hetero: the first part of train.steps reconstructs the receiver's
    # own K/V (phase 1); the rest trains on the receiver's next-token loss (phase 2)
    train_context: str = "aware"  # kv_hetero phase 2 layout: aware | unaware | alternate (aware on even steps)
    # kv_hetero's sender model; None: the run's sender (model.sender, else the receiver). Lets a DAG pair
    # kv_hetero with another model while every other method keeps the run's senders.
    sender: Optional[BackboneConfig] = None


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    agents: AgentsConfig = field(default_factory=AgentsConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    lmnet: LMNetConfig = field(default_factory=LMNetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    kv: KVConfig = field(default_factory=KVConfig)
    backend: str = "auto"  # LoRA-apply backend: auto (triton on CUDA, cpu_fused on CPU) | torch | cpu_fused | triton
    note: str = ""  # free text recorded with the run


def load_config(layers: Sequence[str | Path | dict] = (), overrides: Sequence[str] = ()) -> DictConfig:
    """Merge `layers` (YAML files or plain dicts, in order) then `key=value` `overrides` onto the
    `RunConfig` schema and validate."""
    cfg = OmegaConf.structured(RunConfig)
    for layer in layers:
        where = "config layer" if isinstance(layer, dict) else str(layer)
        if not isinstance(layer, dict) and not Path(layer).is_file():
            raise ConfigError(f"config file not found: {layer}")
        try:
            cfg = OmegaConf.merge(cfg, layer if isinstance(layer, dict) else OmegaConf.load(layer))
        except OmegaConfBaseException as err:
            raise ConfigError(f"{where}: {_describe(err)}") from None
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise ConfigError(f"override {list(overrides)}: {_describe(err)}") from None
    validate(cfg)
    return cfg


def _describe(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    msg = str(err).splitlines()[0]
    return f"key '{key}': {msg}" if key else msg


def validate(cfg: DictConfig) -> None:
    """Semantic checks the schema cannot express: names (each registry checks its own) and ranges."""
    from tflow.data import SOURCES
    from tflow.methods import METHODS, TEXTMAS_PRESETS
    from tflow.prompts import ROLES
    from tflow.registry import BACKENDS, FUSIONS
    from tflow.tasks import TASKS

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"key '{key}': {msg}")

    FUSIONS.check(cfg.fusion.name)
    BACKENDS.check(cfg.backend)
    for name in cfg.agents.senders:
        ROLES.check(name, "agents.senders")
    ROLES.check(cfg.agents.receiver, "agents.receiver")
    for entry in cfg.data.mix:
        SOURCES.check(entry.source)
        need(entry.weight >= 0, "data.mix", f"weight of {entry.source!r} must be >= 0")
    need(any(e.weight > 0 for e in cfg.data.mix), "data.mix", "needs a source with a positive weight")
    for entry in cfg.data.decontaminate_against:  # task, or task@hub for its hub copy
        name, _, source = entry.partition("@")
        TASKS.check(name, "data.decontaminate_against")
        need(source in ("", "hub"), "data.decontaminate_against", f"{entry!r}: write <task> or <task>@hub")
    TASKS.check(cfg.eval.task)
    if cfg.eval.receiver_role is not None:
        ROLES.check(cfg.eval.receiver_role, "eval.receiver_role")
    METHODS.check(cfg.eval.method)
    need(cfg.lora.rank >= 1, "lora.rank", "must be >= 1")
    need(cfg.lora.factor_dtype in ("float32", "bfloat16"), "lora.factor_dtype", "must be float32 or bfloat16")
    need(len(cfg.lora.targets) > 0, "lora.targets", "needs at least one module name")
    bad = [t for t in cfg.lora.targets if t not in ALL_PROJECTIONS]
    need(not bad, "lora.targets", f"unknown projections {bad}; choose from {ALL_PROJECTIONS}")
    need(len(cfg.agents.senders) >= 1, "agents.senders", "needs at least one sender role")
    need(cfg.generator.width % cfg.generator.heads == 0, "generator.width", "must be divisible by generator.heads")
    need(cfg.generator.tile_size >= 1, "generator.tile_size", "must be >= 1")
    need(cfg.generator.variant in ("repro", "release"), "generator.variant", "must be repro or release")
    need(cfg.generator.variant == "repro" or not cfg.generator.sender_embedding, "generator.sender_embedding",
         "the released generator has no per-sender embedding: set it false with generator.variant=release")
    lm = cfg.lmnet
    need(lm.edge in ("transformer", "mlp"), "lmnet.edge", f"unknown edge {lm.edge!r}; choose transformer or mlp")
    need(lm.depth >= 1 and lm.heads >= 1 and lm.mlp_ratio >= 1, "lmnet", "depth, heads and mlp_ratio must be >= 1")
    need(lm.width is None or (lm.width >= 1 and (lm.edge == "mlp" or lm.width % lm.heads == 0)), "lmnet.width",
         "must be null (matched) or a positive multiple of lmnet.heads")
    need(0 < lm.match_tolerance < 1, "lmnet.match_tolerance", "must be in (0, 1)")
    for b, key in [(cfg.model.receiver, "model.receiver"), (cfg.model.sender, "model.sender"), (cfg.kv.sender, "kv.sender")]:
        if b is None:
            continue
        need(b.source in ("asset", "hub", "path"), f"{key}.source", "must be asset, hub or path")
        need(b.dtype in ("float32", "bfloat16", "float16"), f"{key}.dtype", "must be float32, bfloat16 or float16")
    need(cfg.train.steps >= 1 and cfg.train.batch_size >= 1, "train", "steps and batch_size must be >= 1")
    need(cfg.train.validation_every >= 0, "train.validation_every", "must be >= 0 (0: no validation curve)")
    ev = cfg.eval
    need(ev.source in ("offline", "hub"), "eval.source", "must be offline or hub")
    need(ev.cache in ("dynamic", "static"), "eval.cache", "must be dynamic or static")
    need(ev.n is None or ev.n >= 1, "eval.n", "must be >= 1 (or null for the whole set)")
    need(ev.max_new_tokens >= 1 and ev.batch_size >= 1, "eval", "max_new_tokens and batch_size must be >= 1")
    need(ev.ac_op in ("replace", "sum", "mean"), "eval.ac_op", f"unknown op {ev.ac_op!r}; choose replace, sum or mean")
    need(ev.kv_context in ("aware", "unaware"), "eval.kv_context", f"unknown setting {ev.kv_context!r}; choose aware or unaware")
    need(cfg.kv.message_tokens >= 1, "kv.message_tokens", "must be >= 1")
    need(0.0 <= cfg.kv.reconstruction_fraction <= 1.0, "kv.reconstruction_fraction", "must be in [0, 1]")
    need(cfg.kv.train_context in ("aware", "unaware", "alternate"), "kv.train_context",
         f"unknown layout {cfg.kv.train_context!r}; choose aware, unaware or alternate")
    need(ev.textmas_preset in TEXTMAS_PRESETS, "eval.textmas_preset",
         f"unknown preset {ev.textmas_preset!r}; choose from {sorted(TEXTMAS_PRESETS)}")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def config_hash(cfg: DictConfig | dict[str, Any]) -> str:
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]
