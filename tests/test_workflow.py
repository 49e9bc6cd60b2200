"""The Snakemake workflow: lint clean, schema-validated config, DAG shapes of the default and paper
configs, and a tiny end-to-end run on a tiny model that writes every table, figure and macro."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import TINY_OVERRIDES, write_tiny_layer

ROOT = Path(__file__).resolve().parents[1]
SNAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile")]


def _snakemake(*args, cwd=ROOT, timeout=600):
    return subprocess.run([*SNAKE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def _job_counts(out: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run: rule -> count."""
    lines = out[out.index("Job stats:"):].splitlines()[3:] if "Job stats:" in out else []
    counts = {}
    for line in lines:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        counts[parts[0]] = int(parts[1])
    return counts


def _expected(cfg: dict, specs: dict) -> dict[str, int]:
    """Jobs per rule, counted from the config: every (kind, task, method, cell) a family or an ablation evaluates
    (methods needing a generator run at the main cell, others in no cell; a family's kind is eval or heldout; an
    ablation's cells are its TSV rows, duplicates of the main cell included once). A method has every seed unless
    decoding is greedy and it trains nothing (then one); with eval_seeds_per_job a multi-seed method's seeds share
    one evaluate_seeds job, everything else is one evaluate job per seed."""
    import pandas as pd

    from tflow.methods import METHODS

    seeds, tasks = len(cfg["seeds"]), len(cfg["tasks"])
    needs = lambda m: METHODS[m.partition("-")[0]].needs  # noqa: E731
    sampled = bool(cfg.get("eval", {}).get("do_sample", False))
    n_seeds = lambda m: seeds if sampled or needs(m) != "none" else 1  # noqa: E731
    evals = set()  # (kind, task, method, cell-or-None); None = no cell, "main" = the main cell
    for fam in cfg["families"].values():
        for m in fam["methods"]:
            evals |= {(fam.get("kind", "eval"), t, m, "main" if needs(m) == "generator" else None)
                      for t in fam.get("tasks", cfg["tasks"])}
    from omegaconf import OmegaConf

    from tflow.config import load_config

    main_cfg = load_config([str(ROOT / p) for p in cfg["run_config"]], [f"{k}={v}" for k, v in cfg["main_cell"].items()])
    main = lambda k: str(OmegaConf.select(main_cfg, k))  # noqa: E731
    for a in cfg.get("ablations", {}).values():
        df = pd.read_csv(ROOT / a["sweep"], sep="\t", dtype=str)
        for row in df.to_dict("records"):
            diff = tuple(sorted((k, v) for k, v in row.items() if not _same(v, main(k))))
            evals |= {("eval", t, "tflow", diff or "main") for t in a["tasks"]}
    cells = {c for *_, c in evals if c is not None}
    def own_module(m):  # a preset that changes training (lmnet-mlp) trains its own; kv_hetero-aware shares
        base, _, preset = m.partition("-")
        return m if any(not o.startswith("eval.") for o in METHODS[base].presets.get(preset, ())) else base
    trained = {own_module(m) for _, _, m, _ in evals if needs(m) == "trained"}
    per_job = cfg.get("eval_seeds_per_job", False)  # the schema default
    multi = [e for e in evals if per_job and n_seeds(e[2]) > 1]
    timing = cfg.get("timing") or {}
    n_timing = len(timing.get("methods") or cfg["families"]["main"]["methods"]) if timing else 0
    return {"prepare_data": tasks, "cache_conditions": 1, "train_generator": len(cells) * seeds,
            "train_method": len(trained) * seeds,
            "evaluate": sum(n_seeds(e[2]) for e in evals if e not in multi), "evaluate_seeds": len(multi),
            "timing": n_timing, "facts": 1, "collect": 1, "stats": 1,
            "make_table": len({t["name"] for t in specs["tables"] if not t["family"].startswith("ablation_")}
                              | set(cfg.get("ablations", {}))),  # an ablation table/figure only for the run's sweeps
            "make_figure": len({f["name"] for f in specs["figures"] if f["kind"] != "ablation"}
                               | set(cfg.get("ablations", {}))),
            "make_macros": 1, "paper_pdf": int(shutil.which("latexmk") is not None), "all": 1}


def _same(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a.lower() == b.lower()  # YAML booleans: "true" in a TSV, "True" from OmegaConf


def test_lint_is_clean():
    res = _snakemake("--lint")
    assert res.returncode == 0 and "Congratulations" in res.stdout + res.stderr, res.stdout + res.stderr


def _merged(configfile: str) -> dict:
    """What Snakemake sees for `--configfile <file>`: the file merged recursively over config/config.yaml,
    then (Snakefile) families and ablations set to null removed."""
    def merge(base, over):
        return {**base, **{k: merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                           for k, v in over.items()}}
    cfg = merge(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()), yaml.safe_load((ROOT / configfile).read_text()))
    return {**cfg, **{k: {n: v for n, v in (cfg.get(k) or {}).items() if v is not None} for k in ("families", "ablations")}}


@pytest.mark.parametrize("configfile, profile, per_seed", [("config/config.yaml", None, None),
                                                           ("config/config.yaml", None, False),
                                                           ("config/paper_scale.yaml", "workflow/profiles/slurm", None),
                                                           ("config/medium.yaml", None, None),
                                                           ("config/medium_cross.yaml", None, None)])
def test_dry_run_dag_shape(tmp_path, configfile, profile, per_seed):
    args = ["-n", "--forceall", "--quiet", "rules", "--directory", str(ROOT), "--configfile", str(ROOT / configfile)]
    if profile:
        args += ["--profile", str(ROOT / profile)]
    else:
        args += ["--cores", "2"]
    if per_seed is not None:
        args += ["--config", f"eval_seeds_per_job={per_seed}"]
    res = _snakemake(*args)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    cfg = _merged(configfile)
    if per_seed is not None:
        cfg["eval_seeds_per_job"] = per_seed
    specs = yaml.safe_load((ROOT / cfg["paper_specs"]).read_text())
    expected = {k: v for k, v in _expected(cfg, specs).items() if v}
    counts = _job_counts(out)
    assert {k: v for k, v in counts.items() if k != "total"} == expected, out


def _readme_target_commands() -> list[str]:
    """The README's `snakemake --cores 2 "<one target>" ...` examples."""
    text = (ROOT / "README.md").read_text()
    return [line.split("  #")[0].strip() for line in text.splitlines()
            if line.startswith("snakemake --cores 2 ") and '"results/' in line]


@pytest.mark.parametrize("command", _readme_target_commands())
def test_readme_single_target_commands_run_only_that_target(command):
    """Each one-target README command, dry-run, schedules that target's chain, not the whole DAG
    (an option taking several values before the target would swallow it)."""
    args = [a.strip('"') for a in command.split()[1:]]
    res = _snakemake(*args, "-n", "--forceall", "--directory", str(ROOT))  # --forceall: whatever exists here
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert 0 < _job_counts(out).get("total", 0) <= 8, out


def test_readme_has_single_target_commands():
    assert len(_readme_target_commands()) >= 3


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_a_new_ablation_axis_is_one_tsv_and_one_config_entry(tmp_path):
    """generator.depth as an axis: a TSV and an `ablations:` entry add its generators, evaluations, table and
    figure to the DAG; no code, schema or paper spec changes, and no existing cell is renamed."""
    (tmp_path / "depth.tsv").write_text("generator.depth\n1\n2\n")  # 2 = the main cell's depth
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["ablations"]["ablation_depth"] = {"sweep": str(tmp_path / "depth.tsv"), "tasks": ["gsm8k"]}
    res = _snakemake("-n", "--forceall", "--quiet", "rules", "--cores", "2", "--directory", str(ROOT),
                     "--configfile", str(_write(tmp_path, yaml.safe_dump(cfg))))
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    specs = yaml.safe_load((ROOT / cfg["paper_specs"]).read_text())
    before = _expected(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()), specs)
    after = _job_counts(out)
    assert after == {**{k: v for k, v in _expected(cfg, specs).items() if v}, "total": after["total"]}, out
    assert after["train_generator"] == before["train_generator"] + len(cfg["seeds"])  # one new cell
    assert after["evaluate_seeds"] == before["evaluate_seeds"] + 1  # its gsm8k job (all seeds); depth 2 is main
    assert after["make_table"] == before["make_table"] + 1 and after["make_figure"] == before["make_figure"] + 1
    res = _snakemake("results/cpu/generators/generator.depth~1/seed~0/generator.pt", "-n", "--forceall", "-p",
                     "--directory", str(ROOT), "--configfile", str(tmp_path / "config.yaml"))
    assert res.returncode == 0 and "generator.depth=1" in res.stdout + res.stderr, res.stdout + res.stderr


def test_config_schema_rejects_unknown_keys(tmp_path):
    bad = _write(tmp_path, (ROOT / "config" / "config.yaml").read_text() + "seedz: [1]\n")
    res = _snakemake("-n", "--configfile", str(bad))
    assert res.returncode != 0 and "seedz" in res.stdout + res.stderr


def test_run_config_typo_fails_at_dag_construction(tmp_path):
    text = (ROOT / "config" / "config.yaml").read_text().replace("overrides: []", "overrides: [lora.rnak=8]")
    res = _snakemake("-n", "--configfile", str(_write(tmp_path, text)))
    assert res.returncode != 0 and "rnak" in res.stdout + res.stderr


@pytest.mark.parametrize("table, words", [
    ("fusion.name\nmean\nmedian\n", ["bad.tsv row 3", "fusion.name", "median"]),  # unknown registry name
    ("lora.rank\n4\n8.5\n", ["bad.tsv row 3", "lora.rank", "8.5"]),  # not an integer
    ("lora.rank\tlora.rnak\n8\t2\n", ["bad.tsv row 2", "lora.rnak"]),  # a column that is no run-config key
    ("lora.alpha\nlarge\n", ["bad.tsv row 2", "lora.alpha", "large"]),  # not a number
    ("lora.rank\n8\n8\n", ["bad.tsv row 3", "duplicates"]),
    ("rank\n8\n", ["rank"]),  # not a run-config key path (sweep schema)
])
def test_bad_sweep_table_fails_naming_file_row_and_key(tmp_path, table, words):
    tsv = tmp_path / "bad.tsv"
    tsv.write_text(table)
    text = (ROOT / "config" / "config.yaml").read_text().replace("config/sweeps/cpu/ablation_rank.tsv", str(tsv))
    res = _snakemake("-n", "--configfile", str(_write(tmp_path, text)))
    out = res.stdout + res.stderr
    assert res.returncode != 0 and all(w in out for w in words), out


def test_every_yaml_in_config_merges_into_its_schema():
    from snakemake.utils import validate

    from tflow.artifacts import load_specs
    from tflow.config import load_config

    for layer in sorted((ROOT / "config" / "run").glob("*.yaml")):
        load_config([str(layer)], [])
    for dag in ("config.yaml", "paper_scale.yaml", "medium.yaml", "medium_cross.yaml"):  # as Snakemake merges them
        validate(_merged(f"config/{dag}"), str(ROOT / "workflow/schemas/config.schema.yaml"))
    load_specs(ROOT / "config" / "paper.yaml")
    known = {"config.yaml", "paper_scale.yaml", "medium.yaml", "medium_cross.yaml", "paper.yaml"}
    assert {p.name for p in (ROOT / "config").glob("*.yaml")} == known  # a new YAML needs a check here


# ----------------------------------------------------------------------------- tiny end-to-end run
@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory, tiny_tokenizer, data_dir):
    """A temp workdir with a tiny model, a tiny run layer and a DAG config covering every family."""
    work = tmp_path_factory.mktemp("dag")
    layer = write_tiny_layer(work, tiny_tokenizer, data_dir, steps=2, batch_size=2, warmup_steps=1, log_every=1,
                             ckpt_every=1)
    tables = {"rank": "lora.rank\tlora.alpha\n4\t8.0\n8\t16.0\n", "scale": "lora.alpha\n4.0\n8.0\n",
              "fusion": "fusion.name\nmean\nmax\nattention\n"}
    for fam, table in tables.items():
        (work / f"{fam}.tsv").write_text(table)
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["families"] = {k: {**v, "tasks": ["gsm8k"]} for k, v in cfg["families"].items()}
    cfg.update(run_name="tiny", run_config=[str(layer)], seeds=[0, 1], tasks=["gsm8k"],
               overrides=TINY_OVERRIDES, n_boot=200, paper_specs=str(ROOT / "config" / "paper.yaml"),
               eval={**cfg["eval"], "n": 3, "max_new_tokens": 4, "batch_size": 3},
               method_overrides={"textmas-long": ["eval.message_tokens=3"]},
               ablations={f"ablation_{f}": {"sweep": str(work / f"{f}.tsv"), "tasks": ["gsm8k"]}
                          for f in ("rank", "scale", "fusion")})
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    for name in ("main.tex", "preamble.tex"):
        (work / "paper").mkdir(exist_ok=True)
        (work / "paper" / name).write_text((ROOT / "paper" / name).read_text())
    return work


def _run_dag(work: Path, *extra):
    return _snakemake("--directory", str(work), "--configfile", str(work / "config.yaml"), "--cores", "2", *extra,
                      timeout=1200)


@pytest.mark.slow
def test_tiny_end_to_end_run_writes_every_artifact_then_does_nothing(tiny_project):
    work = tiny_project
    res = _run_dag(work)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    specs = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    swept = {"ablation_rank", "ablation_scale", "ablation_fusion"}  # the tiny run's sweeps (no generator sweep)
    for t in specs["tables"]:
        path = work / "paper" / "tables" / f"{t['name']}.tex"
        if t["family"].startswith("ablation_") and t["family"] not in swept:
            assert not path.exists(), t["name"]  # an ablation the run does not sweep gets no empty table
            continue
        tex = path.read_text()
        assert "\\toprule" in tex and "config hash" in tex.lower()
    for f in specs["figures"]:
        for ext in ("pdf", "png"):
            path = work / "paper" / "figures" / f"{f['name']}.{ext}"
            wanted = not f["family"].startswith("ablation_") or f["family"] in swept
            assert (path.stat().st_size > 1000) if wanted else not path.exists(), f["name"]
    assert "\\newcommand" in (work / "paper" / "generated" / "macros.tex").read_text()
    if shutil.which("latexmk"):  # the DAG builds the PDF where LaTeX is installed; a LaTeX error fails the run
        assert (work / "paper" / "main.pdf").stat().st_size > 10_000
    elif os.environ.get("TFLOW_REQUIRE_LATEX") == "1":  # CI sets this: it installs latexmk first
        pytest.fail("TFLOW_REQUIRE_LATEX=1 but latexmk is not installed (see README: apt-get install latexmk ...)")
    stats = (work / "results" / "tiny" / "stats" / "cells.csv").read_text()
    assert "ablation_fusion" in stats and "tflow_shuffled" in stats
    printed = re.search(r"print\(d\[\[([^]]*)\]\]", (ROOT / "Makefile").read_text()).group(1)  # make reproduce's table
    assert {c.strip(" '") for c in printed.split(",")} <= set(stats.splitlines()[0].split(","))
    again = _run_dag(work, "-n")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr, again.stdout + again.stderr
    report = _run_dag(work, "--report", str(work / "report.html"))
    html = (work / "report.html").read_text(errors="replace") if (work / "report.html").is_file() else ""
    assert report.returncode == 0 and len(html) > 10_000, report.stdout[-2000:] + report.stderr[-4000:]
    for name in ["frontier.png", "main.tex", "cells.csv", "main.pdf" if shutil.which("latexmk") else "macros"]:
        assert name in html, name


@pytest.mark.slow
def test_editing_one_sweep_row_reruns_only_that_cell(tiny_project):
    work = tiny_project
    if not (work / "results" / "tiny" / "stats" / "cells.csv").is_file():
        assert _run_dag(work).returncode == 0
    tsv = work / "rank.tsv"
    tsv.write_text(tsv.read_text().replace("8\t16.0", "16\t32.0"))
    res = _run_dag(work, "-n", "--quiet", "rules")
    counts = _job_counts(res.stdout + res.stderr)
    assert res.returncode == 0
    assert counts["train_generator"] == 2, counts  # the new cell, both seeds
    assert counts["evaluate_seeds"] == 1, counts  # both seeds in one job (config.yaml: eval_seeds_per_job)
    assert "cache_conditions" not in counts and "train_method" not in counts
    assert counts["collect"] == counts["stats"] == 1  # and the aggregates


def test_family_tasks_outside_the_run_fail_naming_the_family(tmp_path):
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["tasks"] = ["gsm8k", "humanevalplus"]
    cfg["families"]["controls"]["tasks"] = ["gsm8k", "math500"]
    res = _snakemake("-n", "--directory", str(ROOT), "--configfile", str(_write(tmp_path, yaml.safe_dump(cfg))))
    assert res.returncode != 0 and re.search(r"families\.controls\.tasks: \[.math500.\] not in the run.s tasks", res.stdout + res.stderr), res.stdout + res.stderr
