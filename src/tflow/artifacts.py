"""Paper tables and prose macros from the statistics frame, driven by config/paper.yaml.

The stats frame (tflow.stats.summarize) has one row per (family, task, method, cell); the per-seed
frame (tflow.stats.per_seed) one per seed. `load_specs` validates the YAML, `render_table` and
`render_macros` return LaTeX whose first lines are a % provenance header (rule, inputs, config hash).
Labels are escaped for LaTeX except inside $...$; captions are raw LaTeX. A spec's tasks default to the
run's (`--tasks`); every ablation family of the run (`--ablations`) gets a table and a figure, from its
spec in the YAML or, when it has none, a default one (so a new ablation axis needs no paper spec). CLI:
  python -m tflow.artifacts --stats S.csv --per-seed P.csv --specs config/paper.yaml --tasks T [T ...] \
      [--ablations FAMILY ...] [--tables-dir paper/tables [--only NAME]] [--macros paper/generated/macros.tex] \
      [--ablation-tex paper/generated/ablations.tex] --rule R --config-hash H
"""
from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import yaml


METRICS = {"accuracy": ("acc_mean", r"Acc.\ (\%)"), "tokens": ("tokens_mean", "Tokens"),
           "seconds": ("seconds_mean", "Time (s)")}
MACRO_METRICS = {"acc": "acc_mean", "tok": "tokens_mean", "sec": "seconds_mean", "delta": "delta", "pholm": "p_holm"}
SIG_MARK, ALPHA = r"$^{\dagger}$", 0.05
TEST = (r"paired sign-flip permutation test over problems on seed-averaged differences, Holm-corrected "
        r"within the table; 95\% CIs: percentile bootstrap over problems")
DIGITS = "Zero One Two Three Four Five Six Seven Eight Nine".split()
LABEL_MAPS = ("method_labels", "task_labels", "param_labels")
TABLE_KEYS = ({"name", "family", "caption"},
              {"rows", "row_by", "method", "param", "cells", "order", "baseline", "baseline_mark",
               "fallback_family", "drop_empty", "columns"})
FIGURE_KEYS = ({"name", "kind", "family"},
               {"title", "methods", "method", "param", "categorical", "order", "xscale", "cells", "tasks"})
FIGURE_KINDS = {"frontier": {"methods"}, "ablation": set(), "phase_time": {"methods"}}
_ESC = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}",
        ">": r"\textgreater{}"}


# ----------------------------------------------------------------------------- specs
def _check(obj, where, required, optional=()):
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(obj).__name__}")
    if unknown := sorted(set(obj) - set(required) - set(optional)):
        raise ValueError(f"{where}: unknown key(s) {unknown} (allowed: {sorted({*required, *optional})})")
    if missing := sorted(set(required) - set(obj)):
        raise ValueError(f"{where}: missing field(s) {missing}")


def load_specs(path, ablations=(), tasks=None) -> dict:
    """Read and validate the paper specs; fills defaults (row_by, metrics, tasks when `tasks` is given) and
    adds a table and a figure for every ablation family in `ablations` that the YAML does not spell out.
    ValueError names the spec and key."""
    specs = yaml.safe_load(Path(path).read_text()) or {}
    _check(specs, str(path), (), {"tables", "figures", "macros", *LABEL_MAPS})
    for key in LABEL_MAPS:
        if not isinstance(specs.setdefault(key, {}) or {}, dict):
            raise ValueError(f"{path}: key {key!r} must map names to labels")
    for kind in ("table", "figure"):
        specs[f"{kind}s"] = specs.get(f"{kind}s") or []
        have = {s.get("name") for s in specs[f"{kind}s"] if isinstance(s, dict)}
        specs[f"{kind}s"] += [ablation_spec(kind, fam) for fam in ablations if fam not in have]
    for kind, (req, opt) in (("table", TABLE_KEYS), ("figure", FIGURE_KEYS)):
        names = set()
        for i, s in enumerate(specs[f"{kind}s"]):
            where = f"{kind} spec {s.get('name', f'#{i}')!r}" if isinstance(s, dict) else f"{kind} spec #{i}"
            _check(s, where, req, opt)
            if not re.fullmatch(r"[A-Za-z0-9_-]+", str(s["name"])) or s["name"] in names:
                raise ValueError(f"{where}: key 'name' must be a unique file stem")
            names.add(s["name"])
            if kind == "table":
                s.setdefault("columns", {})
                _check(s["columns"], f"{where}: columns", (), {"tasks", "metrics"})
                if tasks is not None:
                    s["columns"].setdefault("tasks", list(tasks))
                if bad := set(s["columns"].setdefault("metrics", ["accuracy"])) - set(METRICS):
                    raise ValueError(f"{where}: key 'columns.metrics' has unknown metric(s) {sorted(bad)}")
                need = {"method": "rows", "cell": None}.get(s.setdefault("row_by", "method"), "row_by")
                if need == "row_by":
                    raise ValueError(f"{where}: key 'row_by' must be 'method' or 'cell'")
            else:
                if s["kind"] not in FIGURE_KINDS:
                    raise ValueError(f"{where}: key 'kind' must be one of {sorted(FIGURE_KINDS)}")
                if tasks is not None:
                    s.setdefault("tasks", list(tasks))
                need = next(iter(FIGURE_KINDS[s["kind"]] - set(s)), None)
            if need and not s.get(need):
                raise ValueError(f"{where}: missing field '{need}'")
    tables = {t["name"] for t in specs["tables"]}
    macros = specs["macros"] = specs.get("macros") or {}
    _check(macros, "macros", (), {"values", "ratios"})
    for group, req, opt in (("values", {"table", "metrics"}, {"prefix"}),
                            ("ratios", {"name", "table", "metric", "numerator", "denominator"}, {"digits"})):
        macros[group] = macros.get(group) or []
        for i, m in enumerate(macros[group]):
            where = f"macros.{group} spec #{i}"
            _check(m, where, req, opt)
            if m["table"] not in tables:
                raise ValueError(f"{where}: key 'table' names no table spec: {m['table']!r}")
            bad = set(m["metrics"] if group == "values" else [m["metric"]]) - set(MACRO_METRICS)
            if bad or not re.fullmatch(r"[A-Za-z]*", str(m.get("prefix", m.get("name", "")))):
                raise ValueError(f"{where}: bad metric {sorted(bad)} or non-letter prefix/name")
    return specs


def ablation_spec(kind: str, family: str) -> dict:
    """The default table or figure of an ablation family the paper specs do not spell out."""
    if kind == "table":
        return {"name": family, "family": family, "row_by": "cell", "method": "tflow", "drop_empty": True,
                "caption": f"Ablation {escape(family)}: TFlow's accuracy (\\%) in each cell, the other settings at "
                           "the main cell's values."}
    return {"name": family, "kind": "ablation", "family": family, "method": "tflow", "title": f"Ablation {family}"}


def cell_params(row) -> dict:
    """The swept run-config values of a stats row's cell ({key: value}, in the sweep table's column order)."""
    raw = None if row is None else row.get("cell_params")
    return json.loads(raw) if isinstance(raw, str) and raw else {}


def swept_keys(rows: pd.DataFrame, spec: dict) -> list[str]:
    """The keys an ablation spec shows: its `param`, else every key its family's cells sweep."""
    if spec.get("param"):
        return [spec["param"]]
    return list(dict.fromkeys(k for _, r in rows.iterrows() for k in cell_params(r)))


def cell_label(row, keys: list[str]) -> str:
    """A cell's values of `keys`, joined with ' / ' (the cell name when it has none)."""
    values = cell_params(row)
    return " / ".join(str(values[k]) for k in keys) if all(k in values for k in keys) and keys else str(row["cell"])


# ----------------------------------------------------------------------------- helpers
def escape(text) -> str:
    """Escape LaTeX special characters, leaving $...$ math segments as written."""
    parts = re.split(r"(\$[^$]+\$)", str(text))
    return "".join(p if re.fullmatch(r"\$[^$]+\$", p) else "".join(_ESC.get(c, c) for c in p) for p in parts)


def label(specs, kind, key, tex=True) -> str:
    text = (specs.get(f"{kind}_labels") or {}).get(key, key)
    return escape(text) if tex else str(text)


def order_key(value, order=None):
    if order and value in order:
        return (0, order.index(value), "")
    try:
        return (1, float(value), "")
    except (TypeError, ValueError):
        return (2, 0.0, str(value))


def finite(x) -> bool:
    return x is not None and isinstance(x, (int, float, np.number)) and math.isfinite(x)


def header(provenance: dict, what: str) -> str:
    return "\n".join([f"% Generated by {provenance.get('generated_by', 'tflow.artifacts')} ({what}); do not edit.",
                      f"% rule: {provenance.get('rule', 'manual')}",
                      f"% inputs: {', '.join(map(str, provenance.get('inputs', []))) or '-'}",
                      f"% config hash: {provenance.get('config_hash', 'unknown')}"]) + "\n"


def select(stats, family, method, task, cells=None):
    """The one stats row of (family, method, task) [restricted to `cells`], or None."""
    d = stats[(stats.family == family) & (stats.method == method) & (stats.task == task)]
    if cells:
        d = d[d.cell.astype(str).isin([str(c) for c in cells])]
    if len(d) > 1:
        raise ValueError(f"{len(d)} cells {list(d.cell)} for family {family!r}, method {method!r}, task {task!r}: "
                         "add `cells:` to the spec")
    return None if d.empty else d.iloc[0]


def table_rows(stats, spec, specs):
    """[(key, tex label, {task: (row or None, borrowed)})] and the task columns of a table spec."""
    fam, tasks = spec["family"], list(spec["columns"]["tasks"])
    if spec["row_by"] == "cell":
        d = stats[(stats.family == fam) & (stats.method == spec.get("method", "tflow"))]
        keys = swept_keys(d, spec)
        first = {c: d[d.cell.astype(str) == c].iloc[0] for c in dict.fromkeys(d.cell.astype(str))}
        cells = [c for c in first if not spec.get("cells") or c in spec["cells"]]
        cells.sort(key=lambda c: tuple(order_key(cell_params(first[c]).get(k, c), spec.get("order")) for k in keys))
        rows = [(c, escape(cell_label(first[c], keys)),
                 {t: (select(d, fam, d.method.iloc[0], t, [c]), False) for t in tasks}) for c in cells]
    else:
        rows = []
        for m in spec["rows"]:
            found = {t: (select(stats, fam, m, t, spec.get("cells")), False) for t in tasks}
            for t in [t for t in tasks if found[t][0] is None and spec.get("fallback_family")]:
                found[t] = (select(stats, spec["fallback_family"], m, t, spec.get("cells")), True)
            rows.append((m, label(specs, "method", m), found))
    if spec.get("drop_empty"):
        tasks = [t for t in tasks if any(f[t][0] is not None for _, _, f in rows)]
    return rows, tasks


def _num(x, digits=0):
    return f"{x:,.{digits}f}".replace(",", "{,}")


def fmt(metric, row, std=None):
    """(mean text, std text or None) of an accuracy/tokens/seconds value; '--' when missing."""
    mean = None if row is None else row.get(METRICS[metric][0])
    if not finite(mean):
        return "--", None
    scale, digits = {"accuracy": (100, 1), "tokens": (1, 0), "seconds": (1, 2)}[metric]
    std = row.get("acc_std") if metric == "accuracy" else std
    return _num(scale * mean, digits), (_num(scale * std, digits) if finite(std) else None)


# ----------------------------------------------------------------------------- tables
def render_table(stats: pd.DataFrame, spec: dict, provenance: dict, specs: dict | None = None,
                 per_seed: pd.DataFrame | None = None) -> str:
    """One booktabs table; tokens/seconds std over seeds come from `per_seed` when given."""
    specs = specs or {}
    rows, tasks = table_rows(stats, spec, specs)
    metrics = spec["columns"]["metrics"]
    seed_std = {}
    if per_seed is not None and not per_seed.empty:
        g = per_seed.assign(cell=per_seed.cell.astype(str)).groupby(["family", "task", "method", "cell"])
        seed_std = g[["tokens_mean", "seconds_mean"]].std(ddof=1).to_dict("index")
    family_base = stats.loc[stats.family == spec["family"], "baseline"].dropna() if "baseline" in stats else []
    base = spec.get("baseline") or (str(family_base.iloc[0]) if len(family_base) else None)
    keys = [k for k, _, _ in rows if base is not None and k == base]
    if not keys and "is_baseline" in stats:  # the rows summarize() marked as the family's reference
        keys = [k for k, _, f in rows if any(r is not None and not b and bool(r.get("is_baseline"))
                                             for r, b in f.values())]
    is_base = {k: k in keys for k, _, _ in rows}
    if spec["row_by"] == "cell":
        base = keys[0] if keys else None
    cells = {}  # (row key, task, metric) -> (mean, std, significant)
    for key, _, found in rows:
        for t in tasks:
            r, borrowed = found[t]
            for m in metrics:
                sd = seed_std.get((r["family"], t, r["method"], str(r["cell"])), {}) if r is not None else {}
                mean, std = fmt(m, r, sd.get(METRICS[m][0]))
                p = None if r is None or borrowed else r.get("p_holm")
                cells[key, t, m] = (mean, std, m == metrics[0] and finite(p) and p < ALPHA)
    lines = [header(provenance, f"table {spec['name']}"), r"\begin{table}[t]", r"\centering",
             r"\caption{" + _caption(stats, spec, specs, rows, tasks, base, any(is_base.values())) + "}",
             rf"\label{{tab:{spec['name']}}}"]
    ncol = len(tasks) * len(metrics)  # shrunk to the line width only when wider (\width: natural width)
    lines += [r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%",
              r"\begin{tabular}{l" + "r" * ncol + "}", r"\toprule"]
    first = (" / ".join(label(specs, "param", k) for k in swept_keys(
        stats[(stats.family == spec["family"]) & (stats.method == spec.get("method", "tflow"))], spec))
        if spec["row_by"] == "cell" else "Method")
    tl = [label(specs, "task", t) for t in tasks]
    if len(metrics) > 1:
        k = len(metrics)
        lines.append(" & " + " & ".join(rf"\multicolumn{{{k}}}{{c}}{{{x}}}" for x in tl) + r" \\")
        lines.append(" ".join(rf"\cmidrule(lr){{{2 + i * k}-{1 + (i + 1) * k}}}" for i in range(len(tasks))))
        lines.append(first + " & " + " & ".join(METRICS[m][1] for _ in tasks for m in metrics) + r" \\")
    else:
        lines.append(first + " & " + " & ".join(tl) + r" \\")
    lines.append(r"\midrule")
    acc = {(k, t): float(cells[k, t, "accuracy"][0].replace("{,}", "")) for k, _, _ in rows for t in tasks
           if "accuracy" in metrics and cells[k, t, "accuracy"][0] != "--"}  # ties on the printed value
    best = {t: max((v for (_, t2), v in acc.items() if t2 == t), default=None) for t in tasks}
    mark = spec.get("baseline_mark", " (ref.)")
    for key, lab, _ in rows:
        out = [lab + (escape(mark) if is_base[key] else "")]
        for t in tasks:
            for m in metrics:
                mean, std, sig = cells[key, t, m]
                if m == "accuracy" and best[t] is not None and acc.get((key, t)) == best[t]:
                    mean = rf"\textbf{{{mean}}}"
                out.append(mean + (rf" $\pm$ {std}" if std else "") + (SIG_MARK if sig else ""))
        lines.append(" & ".join(out) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def _caption(stats, spec, specs, rows, tasks, base, base_shown):
    used = [r for _, _, f in rows for t in tasks for r, b in [f[t]] if r is not None and not b]
    n = {t: max((int(r["n_problems"]) for r in used if r["task"] == t and finite(r["n_problems"])), default=None)
         for t in tasks}
    seeds = sorted({int(r["n_seeds"]) for r in used if finite(r["n_seeds"])})
    probs = ", ".join(f"{label(specs, 'task', t)} {_num(v)}" for t, v in n.items() if v is not None) or "--"
    nseed = "--" if not seeds else str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}--{seeds[-1]}"
    base_row = next((r for _, _, f in rows for r, _ in f.values() if r is not None and str(r["cell"]) == str(base)),
                    None)
    base_label = ("the baseline" if base is None else label(specs, "method", base) if spec["row_by"] == "method"
                  else "the main cell (" + ", ".join(f"{label(specs, 'param', k)} = {escape(v)}"
                                                     for k, v in cell_params(base_row).items()) + ")")
    ref = f" {escape(spec.get('baseline_mark', '(ref.)').strip())} marks the baseline row." if base_shown else ""
    return (f"{str(spec['caption']).strip()} Problems per task: {probs}; seeds: {nseed}. {SIG_MARK}: accuracy "
            rf"differs from {base_label} at $p_{{\mathrm{{Holm}}}} < {ALPHA}$ ({TEST}).{ref}")


# ----------------------------------------------------------------------------- macros
def camel(text) -> str:
    """'gsm8k' -> 'GsmEightK', 'textmas-short48' -> 'TextmasShortFourEight', '0.5' -> 'ZeroPointFive'."""
    words = re.findall(r"[A-Za-z]+|\d|\.", str(text))
    return "".join(DIGITS[int(w)] if w.isdigit() else "Point" if w == "." else w[0].upper() + w[1:] for w in words)


def macro_value(metric, x) -> str:
    if not finite(x):
        return "--"
    if metric == "pholm":
        return "$<$0.001" if x < 0.001 else f"{x:.3f}"
    return f"{100 * x:+.1f}" if metric == "delta" else _num(x * (100 if metric == "acc" else 1),
                                                            {"acc": 1, "tok": 0, "sec": 2}[metric])


def macro_definitions(stats: pd.DataFrame, specs: dict) -> dict:
    """Ordered {name: value}; a name produced twice with different values raises ValueError. Macros exist for
    every registered task (the prose may name tasks this run lacks; their values are '--')."""
    from tflow.tasks import TASKS

    out = {}

    def put(name, value):
        if not re.fullmatch(r"[A-Za-z]+", name) or out.get(name, value) != value:
            raise ValueError(f"macro \\{name}: not letters-only or defined twice ({out.get(name)!r} vs {value!r})")
        out[name] = value

    tables = {t["name"]: t for t in specs.get("tables", [])}
    macros = specs.get("macros") or {}
    every = lambda spec: {**spec, "columns": {**spec.get("columns", {}), "tasks": list(  # noqa: E731
        dict.fromkeys([*spec.get("columns", {}).get("tasks", []), *TASKS]))}}
    for entry in macros.get("values") or []:
        spec, prefix = every(tables[entry["table"]]), entry.get("prefix", "")
        rows, tasks = table_rows(stats, spec, specs)
        for key, _, found in rows:
            some = next((r for r, _ in found.values() if r is not None), None)
            tail = camel(spec.get("method", "tflow")) + "".join(camel(k) + camel(v) for k, v in cell_params(
                some).items()) if spec["row_by"] == "cell" else camel(key)
            for t in tasks:
                for m in entry["metrics"]:
                    r = found[t][0]
                    val = None if r is None or (found[t][1] and m in ("delta", "pholm")) else r.get(MACRO_METRICS[m])
                    put((prefix + m.capitalize() if prefix else m) + camel(t) + tail, macro_value(m, val))
    for entry in macros.get("ratios") or []:
        spec = every(tables[entry["table"]])
        col = MACRO_METRICS[entry["metric"]]
        for t in spec["columns"]["tasks"]:
            num, den = (select(stats, spec["family"], entry[k], t, spec.get("cells"))
                        for k in ("numerator", "denominator"))
            ok = num is not None and den is not None and finite(num.get(col)) and finite(den.get(col)) and den[col] != 0
            put(entry["name"] + camel(t), f"{num[col] / den[col]:.{entry.get('digits', 2)}f}" if ok else "--")
    for t in dict.fromkeys([*(t for s in tables.values() for t in s["columns"].get("tasks", [])), *TASKS]):
        n = stats.loc[stats.task == t, "n_problems"].dropna()
        put("nProblems" + camel(t), _num(n.max()) if len(n) else "--")
    put("nSeeds", str(int(stats.n_seeds.max())) if len(stats.n_seeds.dropna()) else "--")
    return out


def render_macros(stats: pd.DataFrame, specs: dict, provenance: dict) -> str:
    defs = macro_definitions(stats, specs)
    return header(provenance, "macros") + "".join(f"\\newcommand{{\\{k}}}{{{v}}}\n" for k, v in defs.items())


# ----------------------------------------------------------------------------- CLI
def read_frame(path) -> pd.DataFrame | None:
    return None if path is None else pd.read_csv(path, dtype={"cell": str})


def render_ablation_tex(specs: dict, families: list[str], provenance: dict) -> str:
    """LaTeX that places every ablation family's table and figure (paper/main.tex inputs it)."""
    tables = {t["family"]: t for t in specs["tables"] if t.get("row_by") == "cell"}
    figs = {f["family"]: f for f in specs["figures"] if f["kind"] == "ablation"}
    out = [header(provenance, "ablation section body")]
    for fam in families:
        if fam in tables:
            out.append(f"\\input{{tables/{tables[fam]['name']}}}")
        if fam in figs:
            f = figs[fam]
            out += [r"\begin{figure}[t]", r"  \centering", f"  \\includegraphics[width=\\linewidth]{{figures/{f['name']}.pdf}}",
                    f"  \\caption{{{escape(f.get('title') or fam)}: accuracy in each cell, mean over seeds with its 95\\% "
                    "bootstrap CI; seeds as points.}", f"  \\label{{fig:{f['name']}}}", r"\end{figure}"]
    if not families:
        out.append("This run sweeps no ablation cells.")
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    from tflow.utils import write_text_atomic

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, kw in [("--stats", {"required": True}), ("--per-seed", {}), ("--specs", {"required": True}),
                     ("--tables-dir", {}), ("--macros", {}), ("--ablation-tex", {}), ("--rule", {"default": "manual"}),
                     ("--config-hash", {"default": "unknown"}), ("--only", {"help": "write only this table"}),
                     ("--tasks", {"nargs": "+", "required": True, "help": "the run's tasks (specs default to them)"}),
                     ("--ablations", {"nargs": "*", "default": [], "help": "the run's ablation families"})]:
        ap.add_argument(flag, **kw)
    a = ap.parse_args(argv)
    if not (a.tables_dir or a.macros or a.ablation_tex) or (a.only and not a.tables_dir):
        ap.error("give --tables-dir (optionally with --only), --macros and/or --ablation-tex")
    specs, stats, per_seed = load_specs(a.specs, a.ablations, a.tasks), read_frame(a.stats), read_frame(a.per_seed)
    prov = {"generated_by": "tflow.artifacts", "rule": a.rule, "config_hash": a.config_hash,
            "inputs": [p for p in (a.stats, a.per_seed, a.specs) if p]}
    if a.tables_dir:
        todo = [t for t in specs["tables"] if a.only in (None, t["name"])]
        if not todo:
            ap.error(f"no table spec named {a.only!r} in {a.specs}")
        for t in todo:
            write_text_atomic(Path(a.tables_dir) / f"{t['name']}.tex", render_table(stats, t, prov, specs, per_seed))
            print(f"wrote {Path(a.tables_dir) / (t['name'] + '.tex')}")
    if a.macros:
        write_text_atomic(a.macros, render_macros(stats, specs, prov))
        print(f"wrote {a.macros}")
    if a.ablation_tex:
        write_text_atomic(a.ablation_tex, render_ablation_tex(specs, a.ablations, prov))
        print(f"wrote {a.ablation_tex}")


if __name__ == "__main__":
    main()
