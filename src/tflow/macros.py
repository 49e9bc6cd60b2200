"""Prose macros of the paper (paper/generated/macros.tex), from the statistics frame, the run's facts
(facts.json: models, budgets, training, parameter counts) and the `macros:` specs of config/paper.yaml.

Every number and every verdict in the prose is a macro, so the text can only say what the data say:
`\\verdict...` is "higher than", "lower than" or "not distinguishable from" (p_Holm at 0.05), never a bare
"reaches X% against Y%"; `\\testable<Family>` says whether the family's test could reach significance at
its n at all. Names: letters only, <prefix><Metric><Task><Method>[<param><value>], digits spelled out
(gsm8k -> GsmEightK, 0.5 -> ZeroPointFive); the metric is lower-case when the prefix is empty:
\\accGsmEightKTflow, \\ctlDeltaGsmEightKTflowShuffled, \\verdictGsmEightKTflow. A value without data is "--"
so the paper still compiles; macros exist for every registered task.
"""
from __future__ import annotations

import re

import pandas as pd

from tflow.tex import ALPHA, check_keys, cell_params, escape, finite, header, num, p_text, select, table_rows

VALUE_METRICS = {  # macro metric -> how its text is made from a stats row
    "acc": lambda r: num(100 * r["score_mean"], 1),
    "ce": lambda r: num(r["score_mean"], 3),
    "tok": lambda r: num(r["tokens_mean"], 0),
    "recvtok": lambda r: num(r.get("receiver_tokens_mean", float("nan")), 0),
    "sec": lambda r: num(r["seconds_mean"], 2),
    "trunc": lambda r: num(100 * r.get("truncated_rate", float("nan")), 0),
    "delta": lambda r: _signed(r["delta"], r["metric"]),
    "deltaci": lambda r: (f"[{_signed(r['delta_ci_low'], r['metric'])}, {_signed(r['delta_ci_high'], r['metric'])}]"
                          if finite(r.get("delta_ci_low")) else "--"),
    "pholm": lambda r: p_text(r.get("p_holm")),
    "verdict": lambda r: {"higher": "higher than", "lower": "lower than",
                          "not distinguishable": "not distinguishable from"}.get(str(r.get("verdict")), "--"),
    "noninf": lambda r: ("non-inferior to" if bool(r.get("noninferior")) else "not shown non-inferior to")
    if finite(r.get("p_noninf_holm")) else "--",
}
COMPARISON = {"delta", "deltaci", "pholm", "verdict", "noninf"}
RATIO_COLUMNS = {"tok": "tokens_mean", "recvtok": "receiver_tokens_mean", "sec": "seconds_mean"}
DIGITS = "Zero One Two Three Four Five Six Seven Eight Nine".split()


def _signed(x, metric) -> str:
    if not finite(x):
        return "--"
    scale, digits = (100, 1) if metric == "accuracy" else (1, 3)
    return ("+" if x > 0 else "") + num(scale * x, digits)


def check_macro_specs(specs: dict) -> None:
    tables = {t["name"] for t in specs["tables"]}
    macros = specs["macros"] = specs.get("macros") or {}
    check_keys(macros, "macros", (), {"values", "ratios"})
    for group, req, opt in (("values", {"table", "metrics"}, {"prefix"}),
                            ("ratios", {"name", "table", "metric", "numerator", "denominator"}, {"digits", "percent"})):
        macros[group] = macros.get(group) or []
        for i, m in enumerate(macros[group]):
            where = f"macros.{group} spec #{i}"
            check_keys(m, where, req, opt)
            if m["table"] not in tables:
                raise ValueError(f"{where}: key 'table' names no table spec: {m['table']!r}")
            bad = set(m["metrics"] if group == "values" else [m["metric"]]) - set(
                VALUE_METRICS if group == "values" else RATIO_COLUMNS)
            if bad or not re.fullmatch(r"[A-Za-z]*", str(m.get("prefix", m.get("name", "")))):
                raise ValueError(f"{where}: bad metric {sorted(bad)} or non-letter prefix/name")


def camel(text) -> str:
    """'gsm8k' -> 'GsmEightK', 'textmas-short48' -> 'TextmasShortFourEight', '0.5' -> 'ZeroPointFive'."""
    words = re.findall(r"[A-Za-z]+|\d|\.", str(text))
    return "".join(DIGITS[int(w)] if w.isdigit() else "Point" if w == "." else w[0].upper() + w[1:] for w in words)


def macro_definitions(stats: pd.DataFrame, specs: dict, facts: dict | None = None) -> dict:
    """Ordered {name: value}; a name produced twice with different values raises ValueError."""
    from tflow.tasks import TASKS

    out: dict[str, str] = {}

    def put(name, value):
        if not re.fullmatch(r"[A-Za-z]+", name) or out.get(name, value) != value:
            raise ValueError(f"macro \\{name}: not letters-only or defined twice ({out.get(name)!r} vs {value!r})")
        out[name] = value

    tables = {t["name"]: t for t in specs.get("tables", [])}
    every = lambda spec: {**spec, "tasks": list(dict.fromkeys([*(spec.get("tasks") or []), *TASKS])),  # noqa: E731
                          "drop_empty": False}
    for entry in specs["macros"].get("values") or []:
        spec, prefix = every(tables[entry["table"]]), entry.get("prefix", "")
        rows, tasks = table_rows(stats, spec, specs)
        for key, _, found in rows:
            some = next((r for r, _ in found.values() if r is not None), None)
            tail = camel(spec.get("method", "tflow")) + "".join(camel(k) + camel(v) for k, v in cell_params(
                some).items()) if spec["row_by"] == "cell" else camel(key)
            for t in tasks:
                r, borrowed = found[t]
                for m in entry["metrics"]:
                    ok = r is not None and not (borrowed and m in COMPARISON) and not (
                        m in COMPARISON and bool(r.get("is_baseline")))
                    put((prefix + m.capitalize() if prefix else m) + camel(t) + tail,
                        VALUE_METRICS[m](r) if ok else "--")
    for entry in specs["macros"].get("ratios") or []:
        spec, col = every(tables[entry["table"]]), RATIO_COLUMNS[entry["metric"]]
        for t in spec["tasks"]:
            a, b = (select(stats, spec["family"], entry[k], t, spec.get("cells")) for k in ("numerator", "denominator"))
            ok = a is not None and b is not None and finite(a.get(col)) and finite(b.get(col)) and b[col] != 0
            v = a[col] / b[col] if ok else None
            text = "--" if v is None else f"{100 * (v - 1):+.1f}" if entry.get("percent") else \
                f"{v:.{entry.get('digits', 2)}f}"
            put(entry["name"] + camel(t), text)
    for t in dict.fromkeys([*(t for s in tables.values() for t in (s.get("tasks") or [])), *TASKS]):
        n = stats.loc[stats.task == t, "n_problems"].dropna()
        put("nProblems" + camel(t), num(n.max()) if len(n) else "--")
    put("nSeeds", str(int(stats.n_seeds.max())) if len(stats.n_seeds.dropna()) else "--")
    for fam in dict.fromkeys([*(t["family"] for t in tables.values()), *stats.family.unique()]):
        d = stats[stats.family == fam]
        comp = d[~d.is_baseline.astype(bool) & d.p_min.notna()] if "p_min" in d and len(d) else d.iloc[:0]
        put("pMin" + camel(fam), p_text(comp.p_min.max()) if len(comp) else "--")
        put("nCompared" + camel(fam), num(comp.n_paired_problems.min()) if len(comp) else "--")
        put("testable" + camel(fam), "--" if comp.empty else "can" if (comp.p_min.max() * len(comp)) < ALPHA else "cannot")
    for key, value in fact_macros(facts or {}).items():
        put(key, value)
    return out


def fact_macros(facts: dict) -> dict[str, str]:
    """The Setup paragraph's macros from facts.json (what was run: models, budgets, training, sizes)."""
    def text(x):
        return escape(x) if x not in (None, "") else "--"

    gen = facts.get("generator") or {}
    out = {"runScale": text(facts.get("scale")), "receiverModel": text(facts.get("receiver")),
           "senderModel": text(facts.get("sender")), "maxNewTokens": text(facts.get("max_new_tokens")),
           "decoding": text(facts.get("decoding")), "messageTokens": text(facts.get("message_tokens")),
           "trainSteps": text(facts.get("train_steps")), "trainBatch": text(facts.get("train_batch")),
           "trainMix": text(facts.get("mix")), "generatorVariant": text(gen.get("variant")),
           "genParams": num(gen["parameters"]) if finite(gen.get("parameters")) else "--",
           "genValues": num(gen["generated_values_per_query"]) if finite(gen.get("generated_values_per_query")) else "--",
           "sigLevel": str(ALPHA)}  # not \alpha: that is LaTeX's Greek letter
    for method, n in (facts.get("trained_parameters") or {}).items():
        out["params" + camel(method)] = num(n) if finite(n) else "--"
    return out


def render_macros(stats: pd.DataFrame, specs: dict, provenance: dict, facts: dict | None = None) -> str:
    defs = macro_definitions(stats, specs, facts)
    return header(provenance, "macros") + "".join(f"\\newcommand{{\\{k}}}{{{v}}}\n" for k, v in defs.items())
