# Helper functions and DAG bookkeeping of the workflow (the only place for Python code, by convention).
import functools
import os
import shlex
import shutil

import pandas as pd
from snakemake.utils import Paramspace

from tflow.artifacts import load_specs
from tflow.config import config_hash as hash_of, load_config
from tflow.stats import parse_cell

RUN = config["run_name"]
R = f"results/{RUN}"
SWEEP_COLUMNS = ["rank", "scale", "fusion"]
CELL_FREE = {"single", "textmas-long", "textmas-short48", "ac", "kv"}  # methods without a generator or adapter
TFLOW_METHODS = {"tflow", "tflow_zero_delta", "tflow_shuffled"}


def read_sweep(path):
    """A sweep TSV as a Paramspace (cells named like rank~8_scale~1.0_fusion~mean); bad rows fail here."""
    if not os.path.isfile(path):
        raise ValueError(f"sweep table {path} not found (config: ablations.<family>.sweep)")
    df = pd.read_csv(path, sep="\t")
    if list(df.columns) != SWEEP_COLUMNS:
        raise ValueError(f"{path}: columns must be {SWEEP_COLUMNS} (tab-separated), got {list(df.columns)}")
    if df.empty or df.duplicated().any():
        raise ValueError(f"{path}: needs at least one row and no duplicate rows")
    df["scale"] = df["scale"].astype(float)  # 1 and 1.0 name the same cell
    bad = df[(df["rank"] < 1) | (df["scale"] <= 0) | ~df["fusion"].isin(["mean", "max", "attention"])]
    if len(bad):
        raise ValueError(f"{path}: invalid rows (rank >= 1, scale > 0, fusion in mean|max|attention):\n{bad}")
    return Paramspace(df, filename_params="*")


MAIN_CELL = Paramspace(pd.DataFrame([config["main_cell"]])[SWEEP_COLUMNS].astype({"scale": float}), filename_params="*")
MAIN = next(iter(MAIN_CELL.instance_patterns))
SWEEPS = {fam: read_sweep(spec["sweep"]) for fam, spec in config.get("ablations", {}).items()}
CELLS = sorted({MAIN, *(c for ps in SWEEPS.values() for c in ps.instance_patterns)})


def cell_overrides(cell):
    """A sweep cell as run-config overrides: LoRA rank, alpha = 2 * rank * scale (TFlow: alpha/r = 2), fusion."""
    p = parse_cell(cell)
    rank, scale = int(p["rank"]), float(p["scale"])
    return [f"lora.rank={rank}", f"lora.alpha={2.0 * rank * scale}", f"fusion.name={p['fusion']}"]


def quote(args):
    return " ".join(shlex.quote(str(a)) for a in args)


def split_join(args):
    """Arguments as one string that shlex.split gives back (quoting only what needs it, for readable logs)."""
    return " ".join(a if a and not any(c in a for c in " \t\n'\"\\") else shlex.quote(a) for a in map(str, args))


def config_args():
    return quote(a for p in config["run_config"] for a in ("--config", p))


def train_launcher():
    """python, or torchrun over config['train_gpus'] ranks (data-parallel generator training)."""
    n = config.get("train_gpus", 1)
    return "python" if n == 1 else f"torchrun --standalone --nproc_per_node {n}"


def common_overrides():
    return list(config.get("overrides", []))


def generator_path(cell, seed):
    return f"{R}/generators/{cell}/seed~{seed}/generator.pt"


def static_lora_dir(seed):
    return f"{R}/static_lora/seed~{seed}"


def static_adapter_marker(seed):
    return f"{static_lora_dir(seed)}/adapter/tflow_static.json"


def eval_path(task, method, cell, seed):
    return f"{R}/eval/{task}/{method}/{cell}/seed~{seed}/metrics.json"


def family_tasks(fam):
    """A method family's tasks: its own `tasks`, else every task of the run."""
    return config["families"][fam].get("tasks", config["tasks"])


def eval_jobs():
    """(family, task, method, cell, seed, path) for every evaluation the tables and figures use."""
    jobs = []
    for fam, spec in config["families"].items():
        for method in spec["methods"]:
            cell = "none" if method in CELL_FREE else MAIN
            jobs += [(fam, t, method, cell, s, eval_path(t, method, cell, s)) for t in family_tasks(fam)
                     for s in config["seeds"]]
    for fam, ps in SWEEPS.items():
        jobs += [(fam, t, "tflow", c, s, eval_path(t, "tflow", c, s)) for c in ps.instance_patterns
                 for t in config["ablations"][fam]["tasks"] for s in config["seeds"]]
    return jobs


def data_manifest(task):
    return f"{R}/data/{task}.json"


def eval_settings():
    """The DAG's eval settings as run-config overrides (message_tokens is per method: eval_overrides)."""
    return [f"eval.{k}={'null' if v is None else v}" for k, v in config["eval"].items() if k != "message_tokens"]


def data_overrides(wildcards):
    """prepare_data's overrides: the subset of one task is the one its evaluations will draw."""
    return quote(common_overrides() + eval_settings() + config.get("task_overrides", {}).get(wildcards.task, []))


def eval_seed_scope():
    """The seed part of an evaluate job's log and benchmark names: its seed, or every seed
    (config eval_seeds_per_job: one job runs all seeds of a (task, method, cell) in one process)."""
    if config["eval_seeds_per_job"]:
        return "seeds~" + "-".join(str(s) for s in config["seeds"])
    return "seed~{seed}"


def eval_outputs():
    """The evaluate rule's metrics files, as patterns over task, method, cell (and seed when a job is one seed)."""
    seeds = config["seeds"] if config["eval_seeds_per_job"] else ["{seed}"]
    return [eval_path("{task}", "{method}", "{cell}", s) for s in seeds]


def job_seeds(wildcards):
    return config["seeds"] if config["eval_seeds_per_job"] else [wildcards.seed]


def eval_checkpoint(method, cell, seed):
    """What eval.checkpoint names for a method: a generator, the static-LoRA adapter folder, or nothing."""
    if method in TFLOW_METHODS:
        return generator_path(cell, seed)
    if method == "static_lora":
        return os.path.dirname(static_adapter_marker(seed))
    return None


def eval_inputs(wildcards):
    """The task's data manifest, the trained artifacts the job's method needs (generators or static
    adapters, one per seed of the job) and the run-config layers."""
    inputs = {"layers": config["run_config"], "data": data_manifest(wildcards.task)}
    seeds = job_seeds(wildcards)
    if wildcards.method in TFLOW_METHODS:
        inputs["checkpoint"] = [generator_path(wildcards.cell, s) for s in seeds]
    elif wildcards.method == "static_lora":
        inputs["checkpoint"] = [static_adapter_marker(s) for s in seeds]
    return inputs


def eval_overrides(wildcards):
    """The evaluate entry point's arguments: the shared key=value overrides of a (task, method, cell), then
    each seed's own (seed, folder, checkpoint), inline for a one-seed job or as --each runs."""
    m = wildcards.method
    shared = eval_settings() + [f"eval.task={wildcards.task}"]
    if m.startswith("textmas-"):
        shared += ["eval.method=textmas", f"eval.textmas_preset={m.split('-', 1)[1]}"]
        if m == "textmas-long" and config["eval"].get("message_tokens"):
            shared.append(f"eval.message_tokens={config['eval']['message_tokens']}")
    else:
        shared.append(f"eval.method={m}")
    if m in TFLOW_METHODS:
        shared += cell_overrides(wildcards.cell)
    elif m == "static_lora":
        shared += cell_overrides(MAIN)
    shared = common_overrides() + shared + config.get("task_overrides", {}).get(wildcards.task, [])

    def own(seed):
        args = [f"eval.seed={seed}", f"eval.out_dir={os.path.dirname(eval_path(wildcards.task, m, wildcards.cell, seed))}"]
        ckpt = eval_checkpoint(m, wildcards.cell, seed)
        return args + ([f"eval.checkpoint={ckpt}"] if ckpt else [])

    if not config["eval_seeds_per_job"]:
        return quote(shared + own(wildcards.seed))
    return quote(shared) + "".join(f" --each {shlex.quote(split_join(own(s)))}" for s in config["seeds"])


def train_overrides(wildcards, out_dir):
    """The training entry points' key=value arguments: the cell (the main cell for the static LoRA), seed, folder."""
    cell = getattr(wildcards, "cell", MAIN)
    return quote(common_overrides() + cell_overrides(cell) + [f"train.seed={wildcards.seed}", f"train.out_dir={out_dir}"])


def records_manifest():
    """Rows of the long-format records table: which evaluation belongs to which family and cell label."""
    return [{"family": fam, "task": t, "method": m, "cell": "default" if fam in config["families"] else c,
             "seed": int(s), "path": p} for fam, t, m, c, s, p in eval_jobs()]


def all_metrics():
    return sorted({p for *_, p in eval_jobs()})


def baselines():
    """family -> baseline: a method name (method families) or {'cell': <main cell>} (sweep families)."""
    out = {fam: spec["baseline"] for fam, spec in config["families"].items()}
    out.update({fam: {"cell": MAIN} for fam in SWEEPS})
    return out


def kernel_bench_csvs():
    """The committed kernel benchmark CSVs (CPU always; CUDA where one was measured)."""
    found = [f"results/reference/bench_kernels_{d}.csv" for d in ("cpu", "cuda")
             if os.path.exists(f"results/reference/bench_kernels_{d}.csv")]
    return found or ["results/reference/bench_kernels_cpu.csv"]


@functools.cache
def paper_specs():
    """config/paper.yaml, validated (tflow.artifacts.load_specs), read once per DAG construction."""
    return load_specs(config["paper_specs"])


def table_names():
    return [t["name"] for t in paper_specs().get("tables", [])]


def figure_names():
    return [f["name"] for f in paper_specs().get("figures", [])]


def config_hash():
    """Short hash of the resolved Snakemake config (recorded in every generated paper file)."""
    return hash_of(config)


def paper_targets():
    targets = [f"paper/tables/{t}.tex" for t in table_names()]
    targets += [f"paper/figures/{f}.{ext}" for f in figure_names() for ext in ("pdf", "png")]
    targets.append("paper/generated/macros.tex")
    if shutil.which("latexmk"):  # the PDF where LaTeX is installed (see README)
        targets.append("paper/main.pdf")
    return targets


def check_run_configs():
    """Load every distinct run config the DAG will use: a typo or wrong type fails here, naming the key.
    Families and ablations may only use the run's tasks."""
    for kind in ("families", "ablations"):
        for fam, spec in config.get(kind, {}).items():
            extra = sorted(set(spec.get("tasks", [])) - set(config["tasks"]))
            if extra:
                raise ValueError(f"config {kind}.{fam}.tasks: {extra} not in the run's tasks {config['tasks']}; "
                                 "add them to `tasks` or remove them from the family")
    for cell in CELLS:
        load_config(config["run_config"], common_overrides() + cell_overrides(cell) + ["train.seed=0"])
    message = config["eval"].get("message_tokens")
    load_config(config["run_config"], common_overrides() + eval_settings()
                + ([f"eval.message_tokens={message}"] if message else []))
    for task, extra in config.get("task_overrides", {}).items():
        load_config(config["run_config"], common_overrides() + list(extra))


check_run_configs()
