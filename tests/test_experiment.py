"""The experiment vocabulary (tflow.experiment): cell grammar, sweep tables, DAG method names, and the jobs
and arguments of the default DAG configuration; plus the architecture rules it relies on (registries and
the DAG import no torch, no import cycle in the package)."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tflow.errors import ConfigError
from tflow.experiment import (MAIN_CELL, NO_CELL, Experiment, canonical, dag_method, dag_name, format_cell, parse_cell,
                              read_sweep)

ROOT = Path(__file__).resolve().parents[1]


def test_cell_names_round_trip_and_reject_bad_names():
    assert parse_cell("lora.alpha~16.0_lora.rank~8") == {"lora.alpha": "16.0", "lora.rank": "8"}
    assert parse_cell(MAIN_CELL) == {} and format_cell({}) == MAIN_CELL
    assert parse_cell("fusion.gate_width~32") == {"fusion.gate_width": "32"}  # keys may hold '_'
    for cell in ["lora.alpha~16.0_lora.rank~8", "generator.tile_size~64_lora.rank~4", "fusion.name~max"]:
        assert format_cell(parse_cell(cell)) == cell
    assert format_cell({"lora.rank": 8, "lora.alpha": 16.0}) == "lora.alpha~16.0_lora.rank~8"  # sorted keys
    for bad in ["rank8", "lora.rank~8fusion.name~max", "lora.rank~", "a~b_c~d_e"]:
        with pytest.raises(ConfigError):
            parse_cell(bad)


def test_canonical_values_follow_the_run_config_types():
    assert canonical("lora.alpha", "16") == canonical("lora.alpha", 16) == "16.0"
    assert canonical("lora.rank", "8") == "8" and canonical("fusion.name", "max") == "max"
    assert canonical("generator.sender_embedding", "False") == "false"
    for key, value, word in [("lora.rank", "8.5", "lora.rank"), ("lora.rnak", "8", "lora.rnak"),
                             ("lora.alpha", "large", "lora.alpha"), ("lora.targets", "[q_proj]", "lora.targets"),
                             ("note", "a_b", "letters")]:
        with pytest.raises(ConfigError, match=word):
            canonical(key, value)


def test_read_sweep_fills_left_out_values_from_main_and_names_rows(tmp_path):
    main = {"lora.rank": "4", "lora.alpha": "8.0", "fusion.name": "mean"}
    tsv = tmp_path / "t.tsv"
    tsv.write_text("lora.rank\tlora.alpha\n4\t\n8\t16\n4\t8\n".replace("4\t8\n", "2\t4\n"))
    cells = read_sweep(tsv, main)
    assert list(cells) == [MAIN_CELL, "lora.alpha~16.0_lora.rank~8", "lora.alpha~4.0_lora.rank~2"]
    assert cells[MAIN_CELL] == {"lora.rank": "4", "lora.alpha": "8.0"}
    tsv.write_text("lora.rank\n4\n4\n")
    with pytest.raises(ConfigError, match="t.tsv row 3: duplicates"):
        read_sweep(tsv, main)


def test_dag_method_names_and_their_reverse_mapping():
    base, spec, overrides = dag_method("textmas-short48")
    assert base == "textmas" and overrides == ["eval.method=textmas", "eval.textmas_preset=short48"]
    assert dag_method("tflow")[1].needs == "generator" and dag_method("static_lora")[1].needs == "trained"
    with pytest.raises(ConfigError, match="no preset 'medium'"):
        dag_method("textmas-medium")
    with pytest.raises(ConfigError, match="unknown method 'tfloww'"):
        dag_method("tfloww")
    assert dag_name("textmas", {"eval": {"textmas_preset": "short48"}}) == "textmas-short48"
    assert dag_name("tflow", {"eval": {}}) == "tflow"
    base, spec, overrides = dag_method("kv_hetero-unaware")  # one trained module per seed serves both settings
    assert base == "kv_hetero" and spec.needs == "trained" and overrides[-1] == "eval.kv_context=unaware"
    assert dag_name("kv_hetero", {"eval": {"kv_context": "aware"}}) == "kv_hetero-aware"


@pytest.fixture(scope="module")
def exp():
    return Experiment(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()))


def test_default_dag_jobs_cells_and_arguments(exp):
    cfg = exp.config
    assert exp.cells == sorted([MAIN_CELL, "lora.alpha~16.0_lora.rank~8", "lora.alpha~4.0", "fusion.name~max",
                                "fusion.name~attention",
                                "generator.mlp_ratio~4_generator.sender_embedding~false_generator.variant~release"])
    jobs = exp.eval_jobs()
    assert {(j.method, j.cell) for j in jobs if j.family == "main"} == {
        ("single", NO_CELL), ("textmas-long", NO_CELL), ("textmas-short48", NO_CELL), ("tflow", MAIN_CELL)}
    assert len({(j.kind, j.task, j.method, j.cell) for j in jobs}) == 44  # what the dry-run test counts from the config
    assert {j.kind for j in jobs if j.family.startswith("heldout")} == {"heldout"}
    assert exp.trained_methods() == ["kv_hetero", "lmnet", "lmnet-mlp", "static_lora"]  # kv_hetero's presets share one
    assert {j.method for j in jobs if j.family == "comparators"} == {
        "single", "ac", "kv", "kv_prompt", "kv_hetero-aware", "kv_hetero-unaware", "lmnet", "lmnet-mlp", "tflow"}
    assert exp.checkpoint("kv_hetero-unaware", NO_CELL, 2) == "results/cpu/trained/kv_hetero/seed~2"
    assert exp.checkpoint("lmnet-mlp", NO_CELL, 2) == "results/cpu/trained/lmnet-mlp/seed~2"
    assert "eval.kv_context=unaware" in exp.eval_overrides("gsm8k", "kv_hetero-unaware", NO_CELL)
    long = exp.eval_overrides("gsm8k", "textmas-long", NO_CELL)
    assert "eval.message_tokens=64" in long and not any(a.startswith("lora.") for a in long)  # cell-free: no cell
    rank8 = exp.eval_overrides("gsm8k", "tflow", "lora.alpha~16.0_lora.rank~8")
    assert {"lora.rank=8", "lora.alpha=16.0", "fusion.name=mean"} <= set(rank8)
    static = exp.eval_overrides("gsm8k", "static_lora", NO_CELL)
    assert {"lora.rank=4", "lora.alpha=8.0"} <= set(static)  # trained at the main cell's rank and budget
    assert exp.checkpoint("static_lora", NO_CELL, 1) == "results/cpu/trained/static_lora/seed~1"
    assert exp.eval_inputs("gsm8k", "static_lora", NO_CELL, [0])["checkpoint"] == [
        "results/cpu/trained/static_lora/seed~0/trained.json"]
    # a trained method's preset trains its own module, with the preset's overrides, and evaluates with it
    assert exp.trainer("lmnet-mlp") == "tflow.methods.lmnet"
    train_mlp = exp.method_train_overrides("lmnet-mlp", 1, "results/cpu/trained/lmnet-mlp/seed~1")
    assert "lmnet.edge=mlp" in train_mlp and "train.seed=1" in train_mlp and "lora.rank=4" in train_mlp
    assert not any(a.startswith("lmnet.") for a in exp.method_train_overrides("lmnet", 1, "x"))
    assert exp.checkpoint("lmnet-mlp", NO_CELL, 1) == "results/cpu/trained/lmnet-mlp/seed~1"
    assert "lmnet.edge=mlp" in exp.eval_overrides("gsm8k", "lmnet-mlp", NO_CELL)
    args = exp.eval_args("gsm8k", "tflow", MAIN_CELL, cfg["seeds"])
    assert args.count("--each") == len(cfg["seeds"]) and f"results/cpu/generators/main/seed~{cfg['seeds'][-1]}/generator.pt" in args
    rows = exp.records_manifest()
    rank_rows = [r for r in rows if r["family"] == "ablation_rank" and r["cell"] == MAIN_CELL]
    assert json.loads(rank_rows[0]["cell_params"]) == {"lora.rank": "4", "lora.alpha": "8.0"}
    assert exp.baselines()["ablation_scale"] == {"cell": MAIN_CELL} and exp.baselines()["main"] == "single"


def test_config_errors_name_the_key(tmp_path):
    base = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    for edit, word in [(lambda c: c["families"]["main"]["methods"].append("tfloww"), "tfloww"),
                       (lambda c: c["families"]["main"].update(baseline="kv"), "baseline"),
                       (lambda c: c.update(tasks=["gsm8k", "gsm9k"]), "gsm9k"),
                       (lambda c: c["ablations"]["ablation_rank"].update(method="single"), "does not depend"),
                       (lambda c: c["method_overrides"].update({"textmas-long": ["eval.mesage_tokens=3"]}), "mesage")]:
        cfg = yaml.safe_load(yaml.safe_dump(base))
        edit(cfg)
        with pytest.raises(ConfigError, match=word):
            Experiment(cfg)


# ----------------------------------------------------------------------------- architecture
def test_config_registries_and_dag_import_no_torch():
    """Validating a run config and building the default DAG (snakemake -n) import neither torch nor
    transformers: registries own their name checks and load implementations lazily."""
    code = ("import sys, json\n"
            "from tflow.config import load_config\n"
            "load_config(['config/run/cpu.yaml'], ['eval.method=tflow', 'fusion.name=max', 'eval.task=mbppplus'])\n"
            "first = {m: m in sys.modules for m in ('torch', 'transformers')}\n"
            "from snakemake.cli import main\n"
            "sys.argv = ['snakemake', '-n', '--quiet', '--cores', '1']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
            "print(json.dumps({'config': first, 'dag': {m: m in sys.modules for m in ('torch', 'transformers')},"
            " 'exit': code}))\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["exit"] in (0, None), res.stderr[-2000:]
    assert out["config"] == {"torch": False, "transformers": False}
    assert out["dag"] == {"torch": False, "transformers": False}, res.stderr[-2000:]


def _imports(path: Path, module: str) -> set[str]:
    """Every tflow/tflow_kernels module `path` imports, at any level (functions included)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in ("tflow", "tflow_kernels")}


def test_no_import_cycle_in_the_package():
    """Module- and function-level imports between the package's modules form no cycle (importing a.b
    imports a: parent packages count, except the importer's own ancestors, which are loaded before it)."""
    modules = {}
    for root, name in ((ROOT / "src" / "tflow", "tflow"), (ROOT / "kernels", "tflow_kernels")):
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("")
            parts = [name, *rel.parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    graph = {}
    for mod, path in modules.items():
        deps = {d for d in _imports(path, mod) if d in modules}
        parents = {".".join(d.split(".")[:i]) for d in set(deps) for i in range(1, d.count(".") + 1)}
        deps |= parents & set(modules)
        graph[mod] = {d for d in deps if d != mod and not mod.startswith(d + ".")}
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in graph[m]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert len(graph) > 30


def test_eval_defaults_have_one_source():
    """The DAG schema's eval section states types only; every key is an EvalConfig field (its defaults rule)."""
    from dataclasses import fields

    from tflow.config import EvalConfig

    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    props = schema["properties"]["eval"]["properties"]
    assert set(props) <= {f.name for f in fields(EvalConfig)}
    assert not any("default" in p for p in props.values())
