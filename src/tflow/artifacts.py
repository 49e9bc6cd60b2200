"""Paper tables from the statistics frame, driven by config/paper.yaml (macros: tflow.macros).

The stats frame (tflow.stats.summarize) has one row per (family, task, method, cell); the per-seed frame
(tflow.stats.per_seed) one per seed. A table is long: a block of rows per task, one row per method (or per
ablation cell), and columns from `columns:` — the score (accuracy in %, or the held-out CE) with its std
over seeds, its 95% CI, the difference to the family's baseline with its CI, p_Holm (a dagger below
0.05), the non-inferiority p_Holm, processed tokens (every agent; or the receiver's alone), seconds and
the truncation rate. A `ratios` table puts cost ratios (e.g. TFlow / TextMAS tokens, by either token
definition) in a column per task. Every caption states the problems, seeds, the test and whether the test
could reach significance at that n. Files start with a % provenance header (rule, inputs, config hash).
A spec's tasks default to the run's (`--tasks`); every ablation family (`--ablations`) gets a table and a
figure, from its spec in the YAML or a default one (a new ablation axis needs no paper spec). CLI:
  python -m tflow.artifacts --stats S.csv --per-seed P.csv --specs config/paper.yaml --tasks T [T ...] \\
      [--ablations FAMILY ...] [--facts F.json] [--tables-dir paper/tables [--only NAME]] \\
      [--macros paper/generated/macros.tex] [--ablation-tex paper/generated/ablations.tex] --rule R --config-hash H
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from tflow.macros import check_macro_specs, render_macros
from tflow.tex import (ALPHA, SIG_MARK, check_keys, cell_label, cell_params, escape, finite, header, label, num, order_key,
                       p_text, select, swept_keys, table_rows)

COLUMNS = {  # name -> header (score's header depends on the metric)
    "score": None, "ci": r"95\% CI", "delta": r"$\Delta$ vs ref. [95\% CI]", "p_holm": r"$p_{\mathrm{Holm}}$",
    "noninf": r"non-inf.\ $p_{\mathrm{Holm}}$", "tokens": "Tokens (all)", "receiver_tokens": "Tokens (receiver)",
    "seconds": "Time (s)", "truncation": r"Trunc.\ (\%)"}
SCORE = {"accuracy": (r"Acc.\ (\%)", 100.0, 1, max), "ce": ("CE (nats)", 1.0, 3, min)}  # header, scale, digits, best
RATIO_METRICS = {"tokens": "tokens_mean", "receiver_tokens": "receiver_tokens_mean", "seconds": "seconds_mean"}
TEST = (r"paired sign-flip permutation test over problems on seed-averaged differences, Holm-corrected "
        r"within the table; 95\% CIs: percentile bootstrap over problems, and over training seeds for methods "
        r"that train")
LABEL_MAPS = ("method_labels", "task_labels", "param_labels")
TABLE_KEYS = ({"name", "family", "caption"},
              {"kind", "rows", "row_by", "method", "param", "cells", "order", "baseline_mark", "fallback_family",
               "drop_empty", "columns", "tasks", "ratios"})
FIGURE_KEYS = ({"name", "kind", "family"},
               {"title", "methods", "method", "param", "categorical", "order", "xscale", "cells", "tasks"})
FIGURE_KINDS = {"frontier": {"methods"}, "ablation": set(), "phase_time": {"methods"}, "scores": {"methods"}}


# ----------------------------------------------------------------------------- specs
def load_specs(path, ablations=(), tasks=None) -> dict:
    """Read and validate the paper specs; fill defaults (kind, row_by, columns, tasks when `tasks` is given) and
    add a table and a figure for every ablation family in `ablations` the YAML does not spell out. ValueError
    names the spec and key."""
    specs = yaml.safe_load(Path(path).read_text()) or {}
    check_keys(specs, str(path), (), {"tables", "figures", "macros", *LABEL_MAPS})
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
            check_keys(s, where, req, opt)
            if not re.fullmatch(r"[A-Za-z0-9_-]+", str(s["name"])) or s["name"] in names:
                raise ValueError(f"{where}: key 'name' must be a unique file stem")
            names.add(s["name"])
            if tasks is not None:
                s.setdefault("tasks", list(tasks))
            if kind == "table":
                _check_table(s, where)
            elif s["kind"] not in FIGURE_KINDS:
                raise ValueError(f"{where}: key 'kind' must be one of {sorted(FIGURE_KINDS)}")
            elif need := next(iter(FIGURE_KINDS[s["kind"]] - set(s)), None):
                raise ValueError(f"{where}: missing field '{need}'")
    check_macro_specs(specs)
    return specs


def _check_table(s: dict, where: str) -> None:
    if s.setdefault("kind", "results") == "ratios":
        for j, r in enumerate(s.get("ratios") or [None]):
            check_keys(r, f"{where}: ratios #{j}", {"label", "numerator", "denominator", "metric"}, {"percent", "family"})
            if r["metric"] not in RATIO_METRICS:
                raise ValueError(f"{where}: ratios #{j}: metric must be one of {sorted(RATIO_METRICS)}")
        return
    if s["kind"] != "results":
        raise ValueError(f"{where}: key 'kind' must be 'results' or 'ratios'")
    if bad := set(s.setdefault("columns", ["score", "ci", "delta", "p_holm"])) - set(COLUMNS):
        raise ValueError(f"{where}: key 'columns' has unknown column(s) {sorted(bad)}; choose from {sorted(COLUMNS)}")
    if s.setdefault("row_by", "method") not in ("method", "cell"):
        raise ValueError(f"{where}: key 'row_by' must be 'method' or 'cell'")
    if s["row_by"] == "method" and not s.get("rows"):
        raise ValueError(f"{where}: missing field 'rows'")


def ablation_spec(kind: str, family: str) -> dict:
    """The default table or figure of an ablation family the paper specs do not spell out."""
    if kind == "table":
        return {"name": family, "family": family, "row_by": "cell", "method": "tflow", "drop_empty": True,
                "columns": ["score", "ci", "delta", "p_holm"],
                "caption": f"Ablation {escape(family)}: TFlow in each cell, the other settings at the main cell's."}
    return {"name": family, "kind": "ablation", "family": family, "method": "tflow", "title": f"Ablation {family}"}


# ----------------------------------------------------------------------------- results tables
def _cell(col: str, r, metric: str, borrowed: bool, seed_std: dict) -> str:
    """One table cell's text for stats row `r` ('--' where there is nothing)."""
    if r is None:
        return "--"
    _, scale, digits, _ = SCORE.get(metric, SCORE["accuracy"])
    if col == "score":
        std = f" $\\pm$ {num(scale * r['score_std'], digits)}" if finite(r.get("score_std")) else ""
        return num(scale * r["score_mean"], digits) + std
    if col == "ci":
        return f"[{num(scale * r['score_ci_low'], digits)}, {num(scale * r['score_ci_high'], digits)}]" \
            if finite(r.get("score_ci_low")) else "--"
    if col in ("delta", "p_holm", "noninf") and (borrowed or bool(r.get("is_baseline"))):
        return "ref." if bool(r.get("is_baseline")) and col == "delta" and not borrowed else "--"
    if col == "delta":
        if not finite(r.get("delta")):
            return "--"
        sign = "+" if r["delta"] > 0 else ""
        return (f"{sign}{num(scale * r['delta'], digits)} [{num(scale * r['delta_ci_low'], digits)}, "
                f"{num(scale * r['delta_ci_high'], digits)}]")
    if col == "p_holm":
        return p_text(r.get("p_holm")) + (SIG_MARK if finite(r.get("p_holm")) and r["p_holm"] < ALPHA else "")
    if col == "noninf":
        return p_text(r.get("p_noninf_holm"))
    if col == "truncation":
        return num(100 * r.get("truncated_rate", np.nan), 0)
    key = {"tokens": "tokens_mean", "receiver_tokens": "receiver_tokens_mean", "seconds": "seconds_mean"}[col]
    std = seed_std.get(key)
    digits = 2 if col == "seconds" else 0
    return num(r.get(key, np.nan), digits) + (f" $\\pm$ {num(std, digits)}" if finite(std) else "")


def render_table(stats: pd.DataFrame, spec: dict, provenance: dict, specs: dict | None = None,
                 per_seed: pd.DataFrame | None = None) -> str:
    """One booktabs table (a `results` or a `ratios` spec); token/second std over seeds from `per_seed`."""
    specs = specs or {}
    if spec.get("kind") == "ratios":
        return render_ratios(stats, spec, provenance, specs)
    rows, tasks = table_rows(stats, spec, specs)
    cols = list(spec["columns"])
    seed_std = {}
    if per_seed is not None and not per_seed.empty:
        g = per_seed.assign(cell=per_seed.cell.astype(str)).groupby(["family", "task", "method", "cell"])
        seed_std = g[[c for c in ("tokens_mean", "seconds_mean") if c in per_seed]].std(ddof=1).to_dict("index")
    used = [r for _, _, f in rows for t in tasks for r, b in [f[t]] if r is not None]
    metric = str(used[0]["metric"]) if used and "metric" in used[0] else "accuracy"
    metric = metric if metric in SCORE else "accuracy"  # e.g. the timing family: no score column
    mark = spec.get("baseline_mark", " (ref.)")
    lines = [header(provenance, f"table {spec['name']}"), r"\begin{table}[t]", r"\centering",
             r"\caption{" + _caption(stats, spec, specs, rows, tasks, metric) + "}", rf"\label{{tab:{spec['name']}}}",
             r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%",
             r"\begin{tabular}{ll" + "r" * len(cols) + "}", r"\toprule"]
    first = (" / ".join(label(specs, "param", k) for k in swept_keys(
        stats[(stats.family == spec["family"]) & (stats.method == spec.get("method", "tflow"))], spec))
        if spec["row_by"] == "cell" else "Method")
    heads = [SCORE[metric][0] if c == "score" else COLUMNS[c] for c in cols]
    lines.append("Task & " + first + " & " + " & ".join(heads) + r" \\")
    for t in tasks:
        lines.append(r"\midrule")
        found = {key: f[t] for key, _, f in rows}
        scores = {k: r["score_mean"] for k, (r, _) in found.items() if r is not None and finite(r.get("score_mean"))}
        best = SCORE[metric][3](scores.values()) if scores else None
        for i, (key, lab, _) in enumerate(rows):
            r, borrowed = found[key]
            is_base = r is not None and not borrowed and bool(r.get("is_baseline"))
            sd = seed_std.get((r["family"], t, r["method"], str(r["cell"])), {}) if r is not None else {}
            cells = []
            for c in cols:
                text = _cell(c, r, metric, borrowed, sd)
                if c == "score" and r is not None and best is not None and _same(r["score_mean"], best, metric):
                    text = rf"\textbf{{{text}}}"
                cells.append(text)
            task_label = label(specs, "task", t) if i == 0 else ""
            lines.append(" & ".join([task_label, lab + (escape(mark) if is_base else ""), *cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def _same(value, best, metric) -> bool:
    """Ties on the printed value count as best."""
    _, scale, digits, _ = SCORE[metric]
    return round(scale * value, digits) == round(scale * best, digits)


def power_note(stats: pd.DataFrame, family: str) -> str:
    """What the family's comparisons can show at their n: the smallest p, and whether Holm can reach alpha."""
    d = stats[(stats.family == family) & ~stats.is_baseline.astype(bool)] if "is_baseline" in stats else stats.iloc[:0]
    d = d[d.p_min.notna()] if "p_min" in d else d.iloc[:0]
    if d.empty:
        return ""
    n, pmin, m = int(d.n_paired_problems.min()), float(d.p_min.max()), len(d)
    verdict = ("so a difference can reach significance" if m * pmin < ALPHA else
               r"so \emph{no} difference in this table can reach significance: it cannot test these claims")
    return (f" With {n} paired problems the permutation test's smallest p-value is {p_text(pmin)}; Holm over the "
            f"table's {m} comparisons needs {m}$\\times${p_text(pmin)} $<$ {ALPHA}, {verdict}.")


def _caption(stats, spec, specs, rows, tasks, metric):
    used = [r for _, _, f in rows for t in tasks for r, b in [f[t]] if r is not None and not b]
    n = {t: max((int(r["n_problems"]) for r in used if r["task"] == t and finite(r["n_problems"])), default=None)
         for t in tasks}
    seeds = sorted({int(r["n_seeds"]) for r in used if finite(r["n_seeds"])})
    probs = ", ".join(f"{label(specs, 'task', t)} {num(v)}" for t, v in n.items() if v is not None) or "--"
    nseed = "--" if not seeds else str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}--{seeds[-1]}"
    base = next((r for r in used if bool(r.get("is_baseline"))), None)
    base_label = ("the baseline" if base is None else label(specs, "method", base["method"])
                  if spec["row_by"] == "method" else "the main cell (" + ", ".join(
                      f"{label(specs, 'param', k)} = {escape(v)}" for k, v in cell_params(base).items()) + ")")
    what = "accuracy" if metric == "accuracy" else "cross-entropy"
    return (f"{str(spec['caption']).strip()} Problems per task: {probs}; seeds: {nseed}; mean $\\pm$ std over seeds. "
            f"Differences are to {base_label}; {SIG_MARK}: {what} differs at $p_{{\\mathrm{{Holm}}}} < {ALPHA}$ "
            f"({TEST}).{power_note(stats, spec['family'])}")


# ----------------------------------------------------------------------------- ratio tables
def ratio_value(stats, family, numerator, denominator, task, column):
    num_row, den_row = (select(stats, family, m, task) for m in (numerator, denominator))
    if num_row is None or den_row is None or not finite(num_row.get(column)) or not finite(den_row.get(column)) \
            or den_row[column] == 0:
        return None
    return float(num_row[column] / den_row[column])


def render_ratios(stats: pd.DataFrame, spec: dict, provenance: dict, specs: dict) -> str:
    """Cost ratios per task: numerator / denominator of a metric (or its percent change)."""
    def value(r, t):
        return ratio_value(stats, r.get("family", spec["family"]), r["numerator"], r["denominator"], t,
                           RATIO_METRICS[r["metric"]])

    tasks = [t for t in spec.get("tasks") or [] if any(value(r, t) is not None for r in spec["ratios"])]
    lines = [header(provenance, f"table {spec['name']}"), r"\begin{table}[t]", r"\centering",
             r"\caption{" + str(spec["caption"]).strip() + "}", rf"\label{{tab:{spec['name']}}}",
             r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%",
             r"\begin{tabular}{l" + "r" * len(tasks) + "}", r"\toprule",
             "Ratio & " + " & ".join(label(specs, "task", t) for t in tasks) + r" \\", r"\midrule"]
    for r in spec["ratios"]:
        vals = [value(r, t) for t in tasks]
        text = [("--" if v is None else f"{100 * (v - 1):+.1f}\\%" if r.get("percent") else f"{v:.2f}") for v in vals]
        lines.append(" & ".join([escape(r["label"]), *text]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- ablation section
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


# ----------------------------------------------------------------------------- CLI
def read_frame(path) -> pd.DataFrame | None:
    return None if path is None else pd.read_csv(path, dtype={"cell": str})


def main(argv=None) -> None:
    from tflow.utils import write_text_atomic

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, kw in [("--stats", {"required": True}), ("--per-seed", {}), ("--specs", {"required": True}),
                     ("--tables-dir", {}), ("--macros", {}), ("--ablation-tex", {}), ("--facts", {}),
                     ("--rule", {"default": "manual"}), ("--config-hash", {"default": "unknown"}),
                     ("--only", {"help": "write only this table"}),
                     ("--tasks", {"nargs": "+", "required": True, "help": "the run's tasks (specs default to them)"}),
                     ("--ablations", {"nargs": "*", "default": [], "help": "the run's ablation families"})]:
        ap.add_argument(flag, **kw)
    a = ap.parse_args(argv)
    if not (a.tables_dir or a.macros or a.ablation_tex) or (a.only and not a.tables_dir):
        ap.error("give --tables-dir (optionally with --only), --macros and/or --ablation-tex")
    specs, stats, per_seed = load_specs(a.specs, a.ablations, a.tasks), read_frame(a.stats), read_frame(a.per_seed)
    prov = {"generated_by": "tflow.artifacts", "rule": a.rule, "config_hash": a.config_hash,
            "inputs": [p for p in (a.stats, a.per_seed, a.specs, a.facts) if p]}
    if a.tables_dir:
        todo = [t for t in specs["tables"] if a.only in (None, t["name"])]
        if not todo:
            ap.error(f"no table spec named {a.only!r} in {a.specs}")
        for t in todo:
            write_text_atomic(Path(a.tables_dir) / f"{t['name']}.tex", render_table(stats, t, prov, specs, per_seed))
            print(f"wrote {Path(a.tables_dir) / (t['name'] + '.tex')}")
    if a.macros:
        facts = json.loads(Path(a.facts).read_text()) if a.facts else {}
        write_text_atomic(a.macros, render_macros(stats, specs, prov, facts))
        print(f"wrote {a.macros}")
    if a.ablation_tex:
        write_text_atomic(a.ablation_tex, render_ablation_tex(specs, a.ablations, prov))
        print(f"wrote {a.ablation_tex}")


if __name__ == "__main__":
    main()
