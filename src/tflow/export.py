"""Export the fused delta of one query as a PEFT LoRA adapter folder.

    python -m tflow.export --checkpoint generator.pt --question "..." --out adapters/q1

The folder loads with `PeftModel.from_pretrained(receiver, folder)` and reproduces the transient
path's logits for that query. Sum-type fusions (mean, attention) are exactly one LoRA of rank
S*r with the fusion weights and the LoRA scale folded into B; `max` fusion is not a LoRA and
cannot be exported.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from tflow.agents import receiver_batch, sender_states
from tflow.errors import TFlowError, cli
from tflow.fusion import LoraDelta
from tflow.infer import TFlowAgents, config_from_checkpoint
from tflow.pipeline import delta_for
from tflow.utils import provenance


def module_paths(model: torch.nn.Module, linears: dict[str, torch.nn.Linear]) -> dict[str, str]:
    """Our short names ('layers.3.q_proj') -> full module paths in `model`."""
    full = {id(m): n for n, m in model.named_modules()}
    return {short: full[id(lin)] for short, lin in linears.items()}


def export_peft(delta: LoraDelta, row: int, model: torch.nn.Module, linears: dict[str, torch.nn.Linear],
                out_dir: str | Path, base_model_name: str | None = None, metadata: dict | None = None) -> Path:
    """Write row `row` of a sum-type delta as a PEFT adapter folder (atomically)."""
    if delta.mode != "sum":
        raise TFlowError(f"fusion mode {delta.mode!r} is not a LoRA (element-wise max over senders); "
                         "only sum-type fusions (mean, attention) can be exported to PEFT")
    paths = module_paths(model, linears)
    some = next(iter(delta.modules.values()))
    rank = some.a.shape[1]  # S*r
    state = {}
    for name, d in delta.modules.items():
        prefix = f"base_model.model.{paths[name]}"
        state[f"{prefix}.lora_A.weight"] = d.a[row].detach().float().contiguous().cpu()  # [R, d_in]
        state[f"{prefix}.lora_B.weight"] = d.b[row].detach().float().contiguous().cpu()  # [d_out, R], scale folded
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        target_modules=sorted(paths[n] for n in delta.modules),  # exact module paths
                        base_model_name_or_path=base_model_name)  # alpha = r: PEFT's scale is 1 (folded into B)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        config.save_pretrained(tmp)
        save_file(state, tmp / "adapter_model.safetensors")
        (tmp / "tflow_export.json").write_text(json.dumps({**(metadata or {}), "provenance": provenance()}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@torch.no_grad()
def query_delta(agents: TFlowAgents, question: str) -> LoraDelta:
    cfg = agents.cfg
    per_example = [[sender_states(agents.sender, role, [question], cfg.agents.max_question_tokens)[0][0]
                    for role in cfg.agents.senders]]
    batch = receiver_batch(agents.receiver.tokenizer, cfg.agents.receiver, [question])
    return delta_for(agents.tflow, agents.receiver, per_example, batch)[0]


@cli
def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--question", required=True)
    ap.add_argument("--out", required=True, help="adapter folder to write")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = config_from_checkpoint(args.checkpoint, args.overrides)
    agents = TFlowAgents(cfg, args.checkpoint)
    delta = query_delta(agents, args.question)
    out = export_peft(delta, 0, agents.receiver.model, agents.linears, args.out, agents.receiver.ident,
                      {"question": args.question, "checkpoint": str(args.checkpoint),
                       "receiver": agents.receiver.fingerprint(), "fusion": cfg.fusion.name})
    print(f"wrote PEFT adapter (rank {next(iter(delta.modules.values())).a.shape[1]}) to {out}")


if __name__ == "__main__":
    main()
