"""The experiment's vocabulary, in one place: DAG method names, ablation cells, and the jobs and paths of
a DAG configuration (config/config.yaml). Torch-free: the workflow builds its DAG from it
(workflow/rules/common.smk only wraps it in input functions), and the collector, the statistics and
the tests read the same definitions.

- Methods. A DAG method name is a registered method (`tflow.methods.METHODS`) or `<method>-<preset>`
  (e.g. `textmas-short48`: method textmas with the preset's eval overrides). A method's spec says what
  it needs (nothing, a generator, or its own trained module) and whether it depends on the cell. A trained
  method's module belongs to its DAG name when its preset changes training (`lmnet-mlp` trains its own, with
  its overrides); a preset of evaluation settings only (`kv_hetero-aware`) evaluates the method's module.
- Cells. An ablation cell is a set of run-config values (e.g. lora.rank=8, lora.alpha=16.0) named by
  how it differs from the main cell: `main`, or `lora.alpha~16.0_lora.rank~8` (keys sorted, values in
  their run-config type). A method that does not depend on the cell runs in `none` (NO_CELL). Sweep
  tables are TSVs whose columns are run-config keys; an empty value (or a column a table lacks)
  takes the main cell's value. Adding an ablation axis is one TSV and one `ablations:` entry.
"""
from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tflow.config import RunConfig, load_config
from tflow.errors import ConfigError
from tflow.methods import METHODS, MethodSpec
from tflow.tasks import TASKS

NO_CELL = "none"  # the cell of a method that does not depend on the ablation cell
MAIN_CELL = "main"  # the run's main cell (config main_cell), e.g. TFlow's rank 4, alpha 8, mean fusion
_VALUE = re.compile(r"^[A-Za-z0-9.+-]+$")  # cell values appear in paths: no '_', '~' or '/'


# ----------------------------------------------------------------------------- methods
def dag_method(name: str) -> tuple[str, MethodSpec, list[str]]:
    """'textmas-short48' -> ('textmas', its spec, the preset's eval overrides); unknown names fail."""
    base, _, preset = name.partition("-")
    spec = METHODS[METHODS.check(base, "families.<family>.methods")]
    if preset and preset not in spec.presets:
        raise ConfigError(f"method {name!r}: {base} has no preset {preset!r}; presets: {list(spec.presets)}")
    return base, spec, [f"eval.method={base}", *spec.presets.get(preset, ())]


def trained_name(name: str) -> str:
    """Whose trained module a DAG method evaluates: a preset that changes training (e.g. `lmnet-mlp`:
    lmnet.edge=mlp) trains its own; a preset of evaluation settings only (e.g. `kv_hetero-aware`:
    eval.kv_context) evaluates its method's one module."""
    base, _, preset = name.partition("-")
    overrides = dag_method(name)[1].presets.get(preset, ())
    return name if any(not o.startswith("eval.") for o in overrides) else base


def dag_name(method: str, cfg: Mapping[str, Any] | DictConfig) -> str:
    """The DAG name of an evaluation run's method: `method-<preset>` for the first preset its config
    matches (`tflow.collect` labels runs found on disk with it), else the method."""
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    for preset, overrides in METHODS[method].presets.items():
        if all(str(OmegaConf.select(cfg, k)) == v for k, _, v in (o.partition("=") for o in overrides)):
            return f"{method}-{preset}"
    return method


# ----------------------------------------------------------------------------- cells
def canonical(key: str, value: Any) -> str:
    """`value` of run-config key `key` as its type prints it ('16' and 16 are 16.0 for a float key)."""
    probe = OmegaConf.structured(RunConfig)
    try:
        OmegaConf.update(probe, key, value, merge=True)
        typed = OmegaConf.select(probe, key, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"key '{key}' = {value!r}: {str(err).splitlines()[0]}") from None
    if isinstance(typed, (DictConfig, list)) or OmegaConf.is_list(typed):
        raise ConfigError(f"key '{key}': only single values can be swept, not {type(typed).__name__}")
    text = "null" if typed is None else str(typed).lower() if isinstance(typed, bool) else str(typed)
    if not _VALUE.match(text):
        raise ConfigError(f"key '{key}' = {text!r}: a cell value may use letters, digits, '.', '+' and '-' only")
    return text


def format_cell(diff: Mapping[str, Any]) -> str:
    """{run-config key: value} differing from the main cell -> the cell's name (MAIN_CELL when empty)."""
    if not diff:
        return MAIN_CELL
    return "_".join(f"{k}~{v}" for k, v in sorted(diff.items()))


def parse_cell(cell: str) -> dict[str, str]:
    """Inverse of format_cell: 'lora.alpha~16.0_lora.rank~8' -> {'lora.alpha': '16.0', 'lora.rank': '8'};
    MAIN_CELL -> {}. Values hold no '_', so each ends at the first '_' after its '~'."""
    if cell == MAIN_CELL:
        return {}
    parts = cell.split("~")
    if len(parts) < 2 or any(not p for p in parts):
        raise ConfigError(f"not a cell name (key~value_key~value or {MAIN_CELL!r}): {cell!r}")
    keys, values = [parts[0]], []
    for middle in parts[1:-1]:
        value, sep, key = middle.partition("_")
        if not sep or not key:
            raise ConfigError(f"not a cell name (key~value_key~value): {cell!r}")
        keys.append(key)
        values.append(value)
    values.append(parts[-1])
    if "_" in values[-1]:
        raise ConfigError(f"cell value contains '_': {cell!r}")
    return dict(zip(keys, values))


def read_sweep(path: str | Path, main: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """The cells of a sweep TSV, in row order: {cell name: {swept key: value}} (every key of the table,
    main values filled in). Errors name the file, the row and the key. `main(key)` gives main values."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep table {path} not found (config: ablations.<family>.sweep)")
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except Exception as err:  # noqa: BLE001 - any parse error is the table's
        raise ConfigError(f"{path}: not a tab-separated table ({err})") from None
    if df.empty or not len(df.columns):
        raise ConfigError(f"{path}: needs a header of run-config keys and at least one row")
    cells: dict[str, dict[str, str]] = {}
    for i, row in enumerate(df.to_dict("records")):
        where = f"{path} row {i + 2}"  # 1-based, after the header line
        try:
            values = {k: canonical(k, v) if str(v).strip() else main[k] for k, v in row.items()}
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        cell = format_cell({k: v for k, v in values.items() if v != main[k]})
        if cell in cells:
            raise ConfigError(f"{where}: duplicates an earlier row (cell {cell})")
        cells[cell] = values
    return cells


def quote(args: Sequence[Any]) -> str:
    """Arguments as one shell string (quoting only what needs it, for readable logs)."""
    return " ".join(a if a and not any(c in a for c in " \t\n'\"\\$;&|<>()*?[]{}`") else shlex.quote(a)
                    for a in map(str, args))


# ----------------------------------------------------------------------------- the DAG
KINDS = {"eval": "tflow.evaluate", "heldout": "tflow.heldout"}  # a family's kind -> the entry point of its jobs


@dataclass(frozen=True)
class EvalJob:
    family: str
    kind: str  # eval (answers, scored) | heldout (teacher-forced CE on reference solutions)
    task: str
    method: str  # DAG name
    cell: str
    seed: int
    path: str  # its metrics.json


class Experiment:
    """A validated DAG configuration: its cells, jobs, paths and every job's arguments."""

    def __init__(self, config: Mapping[str, Any]):
        # a config layered over config/config.yaml removes an inherited family or ablation with `<name>: null`
        config = {**config, **{k: {n: v for n, v in (config.get(k) or {}).items() if v is not None}
                                for k in ("families", "ablations")}}
        self.config = config
        self.root = f"results/{config['run_name']}"
        self.layers = list(config["run_config"])
        self.seeds = list(config["seeds"])
        self.tasks = list(config["tasks"])
        for t in self.tasks:
            TASKS.check(t, "tasks")
        self.main = {k: canonical(k, v) for k, v in (config.get("main_cell") or {}).items()}
        self._main_cfg = load_config(self.layers, self.common + [f"{k}={v}" for k, v in self.main.items()])
        self.sweeps = {fam: read_sweep(spec["sweep"], _MainValues(self))
                       for fam, spec in (config.get("ablations") or {}).items()}
        self.cells = sorted({MAIN_CELL, *(c for cells in self.sweeps.values() for c in cells)})
        self._check_families()
        self._check_run_configs()

    # -- settings
    @property
    def common(self) -> list[str]:
        return list(self.config.get("overrides") or [])

    def main_value(self, key: str) -> str:
        if key not in self.main:
            self.main[key] = canonical(key, OmegaConf.select(self._main_cfg, key, throw_on_missing=True))
        return self.main[key]

    def cell_values(self, cell: str) -> dict[str, str]:
        return {**self.main, **parse_cell(cell)}

    def cell_overrides(self, cell: str) -> list[str]:
        return [f"{k}={v}" for k, v in self.cell_values(cell).items()]

    def eval_settings(self) -> list[str]:
        return [f"eval.{k}={'null' if v is None else v}" for k, v in (self.config.get("eval") or {}).items()]

    def family_tasks(self, fam: str) -> list[str]:
        return list(self.config["families"][fam].get("tasks") or self.tasks)

    # -- paths
    def generator_path(self, cell: str, seed: int | str) -> str:
        return f"{self.root}/generators/{cell}/seed~{seed}/generator.pt"

    def trained_dir(self, method: str, seed: int | str) -> str:
        return f"{self.root}/trained/{method}/seed~{seed}"

    def trained_marker(self, method: str, seed: int | str) -> str:
        return f"{self.trained_dir(method, seed)}/trained.json"

    def eval_path(self, task: str, method: str, cell: str, seed: int | str, kind: str = "eval") -> str:
        return f"{self.root}/{kind}/{task}/{method}/{cell}/seed~{seed}/metrics.json"

    def data_manifest(self, task: str) -> str:
        return f"{self.root}/data/{task}.json"

    # -- jobs
    def method_cell(self, method: str) -> str:
        """The cell a method runs in inside a method family."""
        return MAIN_CELL if dag_method(method)[1].cell else NO_CELL

    def method_seeds(self, method: str) -> list[int]:
        """A method's seeds: all of them, except that under greedy decoding a method that trains nothing gives
        the same answers for every seed and runs once (seed: the first)."""
        sampled = bool((self.config.get("eval") or {}).get("do_sample", False))
        return self.seeds if sampled or dag_method(method)[1].needs != "none" else self.seeds[:1]

    def multi_seed_methods(self) -> list[str]:
        return sorted({j.method for j in self.eval_jobs() if len(self.method_seeds(j.method)) > 1})

    def eval_jobs(self) -> list[EvalJob]:
        """Every evaluation the tables and figures use (families at their cell, ablations at every cell)."""
        jobs = []
        for fam, spec in self.config["families"].items():
            kind = spec.get("kind", "eval")
            for m in spec["methods"]:
                c = self.method_cell(m)
                jobs += [EvalJob(fam, kind, t, m, c, s, self.eval_path(t, m, c, s, kind))
                         for t in self.family_tasks(fam) for s in self.method_seeds(m)]
        for fam, cells in self.sweeps.items():
            spec = self.config["ablations"][fam]
            m = spec.get("method", "tflow")
            jobs += [EvalJob(fam, "eval", t, m, c, s, self.eval_path(t, m, c, s))
                     for c in cells for t in spec["tasks"] for s in self.method_seeds(m)]
        return jobs

    def trained_methods(self) -> list[str]:
        """DAG names of this run's methods that train their own module (one training job per seed each)."""
        return sorted({trained_name(j.method) for j in self.eval_jobs() if dag_method(j.method)[1].needs == "trained"})

    def checkpoint(self, method: str, cell: str, seed: int | str) -> str | None:
        """What eval.checkpoint names for a method: its generator, its trained folder, or nothing."""
        spec = dag_method(method)[1]
        if spec.needs == "generator":
            return self.generator_path(cell, seed)
        if spec.needs == "trained":
            return self.trained_dir(trained_name(method), seed)
        return None

    def eval_inputs(self, task: str, method: str, cell: str, seeds: Sequence[int | str], kind: str = "eval"
                    ) -> dict[str, Any]:
        """An evaluate job's inputs: run-config layers, the task's data manifest, and per seed the generator
        or trained module its method needs."""
        inputs: dict[str, Any] = {"layers": self.layers, "data": self.data_manifest(task)}
        spec = dag_method(method)[1]
        if spec.needs == "generator":
            inputs["checkpoint"] = [self.generator_path(cell, s) for s in seeds]
        elif spec.needs == "trained":
            inputs["checkpoint"] = [self.trained_marker(trained_name(method), s) for s in seeds]
        return inputs

    def eval_overrides(self, task: str, method: str, cell: str, kind: str = "eval") -> list[str]:
        """The key=value overrides shared by every seed of an evaluation (task, method, cell); a held-out job's
        problems are its family's `n` (held-out jobs run every held-out family's largest n)."""
        _, spec, method_args = dag_method(method)
        cell_args = self.cell_overrides(cell) if spec.cell else self.cell_overrides(MAIN_CELL) \
            if spec.needs == "trained" else []
        extra = (self.config.get("method_overrides") or {}).get(method, [])
        held = [f"eval.n={self.heldout_n()}"] if kind == "heldout" else []
        return (self.common + self.eval_settings() + [f"eval.task={task}"] + method_args + cell_args + list(extra)
                + list((self.config.get("task_overrides") or {}).get(task, [])) + held)

    def heldout_n(self) -> int:
        return max(int(s.get("n") or 64) for s in self.config["families"].values() if s.get("kind") == "heldout")

    def seed_overrides(self, task: str, method: str, cell: str, seed: int | str, kind: str = "eval") -> list[str]:
        ckpt = self.checkpoint(method, cell, seed)
        out = str(Path(self.eval_path(task, method, cell, seed, kind)).parent)
        return [f"eval.seed={seed}", f"eval.out_dir={out}"] + ([f"eval.checkpoint={ckpt}"] if ckpt else [])

    def eval_args(self, task: str, method: str, cell: str, seeds: Sequence[int | str], kind: str = "eval") -> str:
        """The entry point's arguments: the shared overrides, then each seed's own (seed, folder, checkpoint),
        inline for one seed or as `--each` runs of one process."""
        shared = self.eval_overrides(task, method, cell, kind)
        if len(seeds) == 1:
            return quote(shared + self.seed_overrides(task, method, cell, seeds[0], kind))
        return quote(shared) + "".join(
            f" --each {shlex.quote(quote(self.seed_overrides(task, method, cell, s, kind)))}" for s in seeds)

    def train_overrides(self, cell: str, seed: int | str, out_dir: str) -> list[str]:
        """A training job's overrides: the cell (the main cell for a method's own module), seed, folder."""
        return self.common + self.cell_overrides(cell) + [f"train.seed={seed}", f"train.out_dir={out_dir}"]

    def method_train_overrides(self, method: str, seed: int | str, out_dir: str) -> list[str]:
        """A trained method's training job: the main cell, its preset's overrides (e.g. lmnet.edge=mlp), seed, folder."""
        preset = method.partition("-")[2]
        return self.train_overrides(MAIN_CELL, seed, out_dir) + list(dag_method(method)[1].presets.get(preset, ()))

    def trainer(self, method: str) -> str:
        spec = dag_method(method)[1]
        if spec.needs != "trained" or not spec.trainer:
            raise ConfigError(f"method {method!r} trains no module of its own")
        return spec.trainer

    def data_overrides(self, task: str) -> list[str]:
        """prepare_data's overrides: the subset of one task is the one its evaluations draw."""
        return self.common + self.eval_settings() + list((self.config.get("task_overrides") or {}).get(task, []))

    # -- clean timing (tflow.timing): the timed methods alone on the machine, on a fixed subset
    def timing_methods(self) -> list[str]:
        spec = self.config.get("timing") or {}
        return list(spec.get("methods") or self.config["families"]["main"]["methods"]) if spec else []

    def timing_path(self, method: str) -> str:
        return f"{self.root}/timing/{self.config['timing']['task']}/{method}.json"

    def timing_inputs(self, method: str) -> dict[str, Any]:
        spec = self.config["timing"]
        return self.eval_inputs(spec["task"], method, self.method_cell(method), self.seeds[:1])

    def timing_args(self, method: str) -> str:
        spec = self.config["timing"]
        cell = self.method_cell(method)
        over = self.eval_overrides(spec["task"], method, cell) + self.seed_overrides(spec["task"], method, cell, self.seeds[0])
        return quote(over + [f"eval.n={spec['n']}"]) + f" --repeats {int(spec.get('repeats', 3))}"

    # -- what was run (the paper's Setup paragraph; the facts rule adds the trained parameter counts)
    def facts(self) -> dict[str, Any]:
        cfg, ev = self._main_cfg, self.config.get("eval") or {}
        sender = cfg.model.sender or cfg.model.receiver
        long = load_config(self.layers, self.eval_overrides(self.tasks[0], "textmas-long", NO_CELL))
        from tflow.methods import TEXTMAS_PRESETS

        decoding = (f"sampled (temperature {ev.get('temperature')}, top-p {ev.get('top_p')})" if ev.get("do_sample")
                    else "greedy")
        return {"run": self.config["run_name"], "scale": self.config.get("description", ""),
                "receiver": cfg.model.receiver.name, "sender": sender.name, "decoding": decoding,
                "max_new_tokens": ev.get("max_new_tokens"),
                "message_tokens": long.eval.message_tokens or TEXTMAS_PRESETS["long"]["message_tokens"],
                "train_steps": cfg.train.steps, "train_batch": cfg.train.batch_size,
                "mix": ", ".join(f"{e.source} {e.weight:g}" for e in cfg.data.mix),
                "generator": {"variant": cfg.generator.variant}}

    def facts_inputs(self) -> dict[str, list[str]]:
        """What the facts rule reads the trained parameter counts from (train_summary.json beside each): the
        main generator and each trained method's module (first seed)."""
        out = {"trained": [self.trained_marker(m, self.seeds[0]) for m in self.trained_methods()]}
        if any(dag_method(j.method)[1].needs == "generator" for j in self.eval_jobs()):
            out["generator"] = [self.generator_path(MAIN_CELL, self.seeds[0])]
        return out

    # -- aggregation
    def records_manifest(self) -> list[dict[str, Any]]:
        """Rows of the long-format records table: which evaluation belongs to which family and cell, and
        the cell's values of the keys its family sweeps (the ablation tables' row labels)."""
        rows = []
        for j in self.eval_jobs():
            keys = list(next(iter(self.sweeps[j.family].values()))) if j.family in self.sweeps else []
            params = {k: self.cell_values(j.cell).get(k, self.main_value(k)) for k in keys}
            rows.append({"family": j.family, "task": j.task, "method": j.method, "cell": j.cell, "seed": j.seed,
                         "path": j.path, "cell_params": json.dumps(params),
                         "trained": dag_method(j.method)[1].needs != "none"})
        return rows

    def baselines(self) -> dict[str, Any]:
        """family -> baseline: a method name (method families) or {'cell': MAIN_CELL} (ablation families)."""
        out: dict[str, Any] = {fam: spec["baseline"] for fam, spec in self.config["families"].items()}
        out.update({fam: {"cell": MAIN_CELL} for fam in self.sweeps})
        return out

    # -- checks
    def _check_families(self) -> None:
        for kind in ("families", "ablations"):
            for fam, spec in (self.config.get(kind) or {}).items():
                extra = sorted(set(spec.get("tasks") or []) - set(self.tasks))
                if extra:
                    raise ConfigError(f"config {kind}.{fam}.tasks: {extra} not in the run's tasks {self.tasks}; "
                                      "add them to `tasks` or remove them from the family")
        for fam, spec in self.config["families"].items():
            for m in spec["methods"]:
                dag_method(m)
            if spec["baseline"] not in spec["methods"]:
                raise ConfigError(f"config families.{fam}.baseline {spec['baseline']!r} is not one of its methods")
            if spec.get("kind", "eval") not in KINDS:
                raise ConfigError(f"config families.{fam}.kind must be one of {list(KINDS)}")
        if set(self.config["families"]) & set(self.sweeps):
            raise ConfigError(f"families and ablations share names: {sorted(set(self.config['families']) & set(self.sweeps))}")
        for fam, spec in (self.config.get("ablations") or {}).items():
            if not dag_method(spec.get("method", "tflow"))[1].cell:
                raise ConfigError(f"config ablations.{fam}.method {spec.get('method')!r} does not depend on the cell")
        for m in self.config.get("method_overrides") or {}:
            dag_method(m)

    def _check_run_configs(self) -> None:
        """Load every distinct run config the DAG will use: a typo or wrong type fails here, naming the key
        (and, for a sweep cell, the table and row)."""
        load_config(self.layers, self.train_overrides(MAIN_CELL, 0, "unused"))
        for m in self.trained_methods():
            load_config(self.layers, self.method_train_overrides(m, 0, "unused"))
        for fam, cells in self.sweeps.items():
            for i, cell in enumerate(cells):
                try:
                    load_config(self.layers, self.train_overrides(cell, 0, "unused"))
                except ConfigError as err:
                    raise ConfigError(f"{self.config['ablations'][fam]['sweep']} row {i + 2} (cell {cell}): {err}") from None
        for kind, t, m in dict.fromkeys((j.kind, j.task, j.method) for j in self.eval_jobs()):
            load_config(self.layers, self.eval_overrides(t, m, self.method_cell(m), kind))


class _MainValues(Mapping[str, str]):
    """The main cell's value of any run-config key (read_sweep fills left-out columns from it)."""

    def __init__(self, exp: Experiment):
        self.exp = exp

    def __getitem__(self, key: str) -> str:
        return self.exp.main_value(key)

    def __iter__(self):
        return iter(self.exp.main)

    def __len__(self) -> int:
        return len(self.exp.main)
