# Input functions of the workflow (the only place for Python code, by convention). The experiment itself
# (methods, cells, jobs, paths, arguments) is tflow.experiment.Experiment, built once from the validated
# config; nothing here imports torch or transformers.
import functools
import os
import re
import shutil

import pandas as pd

from tflow.artifacts import load_specs
from tflow.config import config_hash as hash_of
from tflow.experiment import KINDS, NO_CELL, Experiment, quote

for _spec in (config.get("ablations") or {}).values():  # every sweep table against its schema first
    validate(pd.read_csv(_spec["sweep"], sep="\t", dtype=str, keep_default_na=False), "../schemas/sweep.schema.yaml")

EXP = Experiment(config)
RUN = config["run_name"]
R = EXP.root


def one_of(names):
    """A wildcard constraint matching exactly these names."""
    return "|".join(re.escape(str(n)) for n in names) or "no-such-name"


def config_args():
    return quote(a for p in EXP.layers for a in ("--config", p))


def train_launcher():
    """python, or torchrun over config['train_gpus'] ranks (data-parallel generator training)."""
    n = config.get("train_gpus", 1)
    return "python" if n == 1 else f"torchrun --standalone --nproc_per_node {n}"


# Evaluation jobs: with eval_seeds_per_job, one job per (kind, task, method, cell) runs every seed of a method
# that has several (rule evaluate_seeds); a method with one seed (greedy decoding, nothing trained), or every
# method without eval_seeds_per_job, gets a job per seed (rule evaluate).
SEEDS_PER_JOB = config["eval_seeds_per_job"]
MULTI_SEED = EXP.multi_seed_methods() if SEEDS_PER_JOB else []
ONE_SEED = sorted({j.method for j in EXP.eval_jobs()} - set(MULTI_SEED))
SEED_SCOPE = "seeds~" + "-".join(str(s) for s in EXP.seeds)


def job_seeds(wildcards):
    return getattr(wildcards, "seed", None) and [wildcards.seed] or EXP.seeds


def eval_inputs(wildcards):
    return EXP.eval_inputs(wildcards.task, wildcards.method, wildcards.cell, job_seeds(wildcards), wildcards.kind)


def eval_args(wildcards):
    return EXP.eval_args(wildcards.task, wildcards.method, wildcards.cell, job_seeds(wildcards), wildcards.kind)


def eval_entry(wildcards):
    return KINDS[wildcards.kind]


def data_args(wildcards):
    return quote(EXP.data_overrides(wildcards.task))


def train_generator_args(wildcards, output):
    return quote(EXP.train_overrides(wildcards.cell, wildcards.seed, os.path.dirname(output.generator)))


def train_method_args(wildcards, output):
    return quote(EXP.method_train_overrides(wildcards.method, wildcards.seed, os.path.dirname(output.marker)))


def trainer(wildcards):
    return EXP.trainer(wildcards.method)


def all_metrics():
    return sorted({j.path for j in EXP.eval_jobs()})


def kernel_bench_csvs():
    """The committed kernel benchmark CSVs (CPU always; CUDA where one was measured)."""
    found = [f"results/reference/bench_kernels_{d}.csv" for d in ("cpu", "cuda")
             if os.path.exists(f"results/reference/bench_kernels_{d}.csv")]
    return found or ["results/reference/bench_kernels_cpu.csv"]


@functools.cache
def paper_specs():
    """config/paper.yaml, validated, with a table and a figure for every ablation family it does not spell out."""
    return load_specs(config["paper_specs"], ablations=list(EXP.sweeps))


def table_names():
    """Every table spec, except an ablation table whose sweep family this run does not have (it would be empty;
    the ablation section lists only the run's families)."""
    return [t["name"] for t in paper_specs()["tables"]
            if t.get("row_by") != "cell" or t["family"] in EXP.sweeps]


def figure_names():
    """Every figure spec, except an ablation figure whose sweep family this run does not have (no data to draw)."""
    return [f["name"] for f in paper_specs()["figures"]
            if f["kind"] != "ablation" or f["family"] in EXP.sweeps]


def run_tasks():
    return " ".join(EXP.tasks)


def config_hash():
    """Short hash of the resolved Snakemake config (recorded in every generated paper file)."""
    return hash_of(config)


def timing_inputs(wildcards):
    return EXP.timing_inputs(wildcards.method)


def timing_args(wildcards):
    return EXP.timing_args(wildcards.method)


def facts_inputs(wildcards):
    return EXP.facts_inputs()


def paper_targets():
    targets = [f"paper/tables/{t}.tex" for t in table_names()]
    targets += [f"paper/figures/{f}.{ext}" for f in figure_names() for ext in ("pdf", "png")]
    targets += ["paper/generated/macros.tex", "paper/generated/ablations.tex"]
    if shutil.which("latexmk"):  # the PDF where LaTeX is installed (see README)
        targets.append("paper/main.pdf")
    return targets


def artifact_caption(kind, name):
    """A table's or figure's caption (or title) from the paper specs, as plain text for the report."""
    spec = next(s for s in paper_specs()[kind] if s["name"] == name)
    text = str(spec.get("caption") or spec.get("title") or name)
    return re.sub(r"\s+", " ", re.sub(r"[\\$]", "", text)).strip()
