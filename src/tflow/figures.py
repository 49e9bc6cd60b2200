"""Paper figures from the statistics frames, driven by the `figures:` specs of config/paper.yaml.

Kinds: `frontier` (accuracy vs processed tokens per method, a panel per task, log x; error bars: the
accuracy's bootstrap CI and the tokens' std over seeds), `ablation` (accuracy vs a swept parameter,
CI band, per-seed points; `categorical: true` for a non-numeric parameter), `phase_time` (stacked
per-phase seconds per problem per method, a panel per task). Each figure is written as a vector PDF
and a PNG of the same stem, atomically, with the provenance (rule, inputs, config hash) as metadata.
A spec without data fails naming the spec and what is missing. CLI:
  python -m tflow.figures --stats S.csv --per-seed P.csv --specs config/paper.yaml --out-dir paper/figures \
      --tasks T [T ...] [--ablations FAMILY ...] --rule R --config-hash H [--only NAME]
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402
import pandas as pd  # noqa: E402

from tflow.accounting import PHASES as PHASE_NAMES  # noqa: E402
from tflow.artifacts import load_specs, read_frame  # noqa: E402
from tflow.tex import cell_params, finite, label, order_key, swept_keys  # noqa: E402
from tflow.utils import atomic_path  # noqa: E402

OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
MARKERS = "osD^vP*X"
PHASES = {f"s_{phase}_mean": name for phase, name in PHASE_NAMES.items()}  # stats column -> legend


class FigureDataError(ValueError):
    """A figure spec has no data to draw."""


def _panels(spec, stats, specs, has_data):
    """The tasks of the spec with data (in spec order), a figure and one axis per task."""
    tasks = [t for t in spec["tasks"] if has_data(t)]
    if not tasks:
        raise FigureDataError(f"figure spec {spec['name']!r}: no data in family {spec['family']!r} for tasks "
                              f"{spec['tasks']} (methods {spec.get('methods') or [spec.get('method', 'tflow')]})")
    ncol = min(len(tasks), 3)
    nrow = math.ceil(len(tasks) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.4 * nrow + 0.8), squeeze=False, layout="constrained")
    for ax in axes.flat[len(tasks):]:
        ax.set_visible(False)
    for ax, t in zip(axes.flat, tasks):
        ax.set_title(label(specs, "task", t, tex=False))
        ax.grid(alpha=0.3)
    if spec.get("title"):
        fig.suptitle(spec["title"])
    return fig, list(zip(axes.flat, tasks))


def _accuracy_axis(ax) -> None:
    """Label an accuracy axis; keep a span of at least 0-10% (all-zero panels otherwise get +-0.04)."""
    lo, hi = ax.get_ylim()
    ax.set_ylim(max(min(lo, -2.0), -5.0), min(max(hi, 10.0), 105.0))
    ax.set_ylabel("Accuracy (%)")


def _rows(stats, spec, method, task):
    d = stats[(stats.family == spec["family"]) & (stats.method == method) & (stats.task == task)]
    return d[d.cell.astype(str).isin([str(c) for c in spec["cells"]])] if spec.get("cells") else d


def frontier(stats, per_seed, spec, specs):
    methods = spec["methods"]
    fig, panels = _panels(spec, stats, specs, lambda t: any(
        len(_rows(stats, spec, m, t).dropna(subset=["score_mean", "tokens_mean"])) for m in methods))
    handles = {}
    for ax, t in panels:
        for i, m in enumerate(methods):
            d = _rows(stats, spec, m, t).dropna(subset=["score_mean", "tokens_mean"])
            if d.empty:
                continue
            r = d.iloc[0]
            y = 100 * r["score_mean"]
            yerr = [[y - 100 * r["score_ci_low"]], [100 * r["score_ci_high"] - y]] if finite(r.get("score_ci_low")) else None
            xerr = None
            if per_seed is not None:
                s = per_seed[(per_seed.family == r["family"]) & (per_seed.task == t) & (per_seed.method == m)
                             & (per_seed.cell.astype(str) == str(r["cell"]))].tokens_mean
                xerr = [s.std(ddof=1)] if len(s) > 1 and finite(s.std(ddof=1)) else None
            handles[m] = ax.errorbar([r["tokens_mean"]], [y], xerr=xerr, yerr=yerr, fmt=MARKERS[i % len(MARKERS)],
                                     color=OKABE_ITO[i % len(OKABE_ITO)], capsize=3, markersize=7)
        xs = [h[0].get_xdata()[0] for h in ax.containers] if ax.containers else [1.0]
        ax.set_xscale("log")
        lo, hi = min(xs) / 1.6, max(xs) * 1.6  # at least one labelled tick in every panel, none overlapping
        ax.set_xlim(lo, hi)
        subs = (1.0,) if hi / lo > 300 else (1.0, 2.0, 5.0) if hi / lo > 12 else (1.0, 2.0, 3.0, 5.0)
        ax.xaxis.set_major_locator(LogLocator(subs=subs))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("Processed tokens per problem (log scale)")
        _accuracy_axis(ax)
    fig.legend([handles[m] for m in methods if m in handles],
               [label(specs, "method", m, tex=False) for m in methods if m in handles],
               loc="outside lower center", ncol=min(len(handles), 4), frameon=False)
    return fig


def ablation(stats, per_seed, spec, specs):
    """Accuracy against the first swept key of the family (or `param`); non-numeric values are categories."""
    method, order = spec.get("method", "tflow"), spec.get("order")
    fig, panels = _panels(spec, stats, specs, lambda t: len(_rows(stats, spec, method, t).dropna(subset=["score_mean"])))
    family = stats[(stats.family == spec["family"]) & (stats.method == method)]
    param = next(iter(swept_keys(family, spec)), None)
    values = {str(r["cell"]): cell_params(r).get(param) for _, r in family.iterrows()}
    categorical = spec.get("categorical")
    if categorical is None:  # numbers on a numeric axis, names as categories
        categorical = not all(_is_number(v) for v in values.values())
    for ax, t in panels:
        d = _rows(stats, spec, method, t).dropna(subset=["score_mean"]).copy()
        d["value"] = [values.get(c) for c in d.cell.astype(str)]
        if d.value.isna().any():
            raise FigureDataError(f"figure spec {spec['name']!r}: cells {list(d.cell[d.value.isna()])} of task {t!r} "
                                  f"have no parameter {param!r}")
        d = d.iloc[sorted(range(len(d)), key=lambda i: order_key(d.value.iloc[i], order))]
        pos = {v: (i if categorical else float(v)) for i, v in enumerate(d.value)}
        x = np.array([pos[v] for v in d.value])
        y, lo, hi = 100 * d.score_mean.to_numpy(), 100 * d.score_ci_low.to_numpy(), 100 * d.score_ci_high.to_numpy()
        if categorical:
            ax.errorbar(x, y, yerr=[y - lo, hi - y], fmt="o", color=OKABE_ITO[0], capsize=4, label="mean (95% CI)")
        else:
            ax.plot(x, y, "o-", color=OKABE_ITO[0], label="mean over seeds")
            ax.fill_between(x, lo, hi, color=OKABE_ITO[0], alpha=0.2, label="95% CI (bootstrap)")
        if per_seed is not None:
            s = per_seed[(per_seed.family == spec["family"]) & (per_seed.method == method) & (per_seed.task == t)]
            s = s[s.cell.astype(str).isin(d.cell.astype(str))]
            if len(s):
                xs = np.array([pos[values[c]] for c in s.cell.astype(str)])
                jit = (np.arange(len(s)) % 5 - 2) * 0.03 if categorical else 0.0
                ax.scatter(xs + jit, 100 * s.score, s=14, color=OKABE_ITO[1], marker="D", alpha=0.8,
                           zorder=3, label="seed")
        if categorical:
            ax.set_xticks(list(pos.values()), list(pos))
        elif spec.get("xscale") in ("log", "log2"):
            ax.set_xscale("log", base=2 if spec["xscale"] == "log2" else 10)
            ax.set_xticks(list(pos.values()), list(pos))
        ax.set_xlabel(label(specs, "param", param, tex=False))
        _accuracy_axis(ax)
        ax.legend(fontsize="small")
    return fig


def phase_time(stats, per_seed, spec, specs):
    cols = [c for c in PHASES if c in stats.columns]
    if not cols:
        raise FigureDataError(f"figure spec {spec['name']!r}: the stats frame has no per-phase timing columns "
                              f"(expected some of {list(PHASES)})")
    methods = spec["methods"]

    def has(t):
        return any(_rows(stats, spec, m, t)[cols].notna().any().any() for m in methods)

    try:
        fig, panels = _panels(spec, stats, specs, has)
    except FigureDataError as e:
        raise FigureDataError(f"{e}: every per-phase timing ({', '.join(cols)}) is missing") from None
    for ax, t in panels:
        bottom = np.zeros(len(methods))
        for j, c in enumerate(cols):
            h = np.array([_rows(stats, spec, m, t)[c].iloc[0] if len(_rows(stats, spec, m, t)) else np.nan
                          for m in methods], dtype=float)
            h = np.nan_to_num(h)
            ax.bar(range(len(methods)), h, bottom=bottom, color=OKABE_ITO[j], label=PHASES[c], edgecolor="white")
            bottom += h
        ax.set_xticks(range(len(methods)), [label(specs, "method", m, tex=False) for m in methods],
                      rotation=30, ha="right")
        ax.set_ylabel("Seconds per problem (s)")
        ax.grid(axis="x", visible=False)
    handles, labels = panels[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(cols), frameon=False)
    return fig


def _is_number(value) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


def scores(stats, per_seed, spec, specs):
    """Held-out family, a panel per task: each method's paired difference to the family's baseline with its 95%
    CI (what the tests use; the methods' marginal CIs overlap because problems differ in difficulty), the
    baseline as the zero line with its own score in the legend. Without differences: the scores and their CIs."""
    methods = spec["methods"]
    fig, panels = _panels(spec, stats, specs, lambda t: any(
        len(_rows(stats, spec, m, t).dropna(subset=["score_mean"])) for m in methods))
    for ax, t in panels:
        shown = [(i, m, _rows(stats, spec, m, t).dropna(subset=["score_mean"])) for i, m in enumerate(methods)]
        shown = [(i, m, d.iloc[0]) for i, m, d in shown if len(d)]
        ce = shown[0][2]["metric"] == "ce"
        k, unit = (1.0, "nats/token") if ce else (100.0, "points")
        base = [(m, r) for _, m, r in shown if bool(r.get("is_baseline"))]
        others = [s for s in shown if not bool(s[2].get("is_baseline"))]
        paired = bool(base) and all(finite(r.get("delta")) for _, _, r in others)
        if paired:
            (bm, br), shown = base[0], others
            ax.axhline(0.0, color="0.4", lw=1, ls="--", label=f"{label(specs, 'method', bm, tex=False)} "
                                                                f"({k * br['score_mean']:.3g})")
        for j, (i, m, r) in enumerate(shown):
            y, lo, hi = ((r["delta"], r["delta_ci_low"], r["delta_ci_high"]) if paired
                         else (r["score_mean"], r["score_ci_low"], r["score_ci_high"]))
            ax.errorbar([j], [k * y], yerr=[[k * (y - lo)], [k * (hi - y)]], fmt=MARKERS[i % 8],
                        color=OKABE_ITO[i % len(OKABE_ITO)], capsize=4, markersize=7)
        ax.set_xticks(range(len(shown)), [label(specs, "method", m, tex=False) for _, m, _ in shown], rotation=20,
                      ha="right")
        ax.set_xlim(-0.5, len(shown) - 0.5)
        if paired:
            ax.legend(loc="best", fontsize=8, frameon=False)
        if ax.get_subplotspec().is_first_col():  # one y label per row of panels
            what = "CE" if ce else "Accuracy"
            ax.set_ylabel(f"{what} difference ({unit})" if paired else ("CE (nats/token)" if ce else "Accuracy (%)"))
    return fig


KINDS = {"frontier": frontier, "ablation": ablation, "phase_time": phase_time, "scores": scores}


def render_figure(stats: pd.DataFrame, per_seed: pd.DataFrame | None, spec: dict, specs: dict):
    if stats is None or stats.empty:
        raise FigureDataError(f"figure spec {spec['name']!r}: the stats frame is empty")
    return KINDS[spec["kind"]](stats, per_seed, spec, specs)


def save_figure(fig, out_dir, name: str, provenance: dict) -> list[Path]:
    """Write <name>.pdf and <name>.png atomically (temp file with the same suffix, then os.replace)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = json.dumps(provenance, sort_keys=True)
    written = []
    for ext, md in (("pdf", {"Subject": meta, "Creator": "tflow.figures", "CreationDate": None}),
                    ("png", {"Description": meta, "Software": "tflow.figures"})):
        with atomic_path(out_dir / f"{name}.{ext}", suffix=f".{ext}") as tmp:  # savefig reads the suffix
            fig.savefig(tmp, format=ext, metadata=md, dpi=200)
        written.append(out_dir / f"{name}.{ext}")
    plt.close(fig)
    return written


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stats", required=True)
    ap.add_argument("--per-seed")
    ap.add_argument("--specs", required=True)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--rule", default="manual")
    ap.add_argument("--config-hash", default="unknown")
    ap.add_argument("--only", help="write only this figure")
    ap.add_argument("--tasks", nargs="+", required=True, help="the run's tasks (specs default to them)")
    ap.add_argument("--ablations", nargs="*", default=[], help="the run's ablation families")
    a = ap.parse_args(argv)
    specs, stats, per_seed = load_specs(a.specs, a.ablations, a.tasks), read_frame(a.stats), read_frame(a.per_seed)
    todo = [f for f in specs["figures"] if a.only in (None, f["name"])]
    if not todo:
        ap.error(f"no figure spec named {a.only!r} in {a.specs}")
    prov = {"generated_by": "tflow.figures", "rule": a.rule, "config_hash": a.config_hash,
            "inputs": [p for p in (a.stats, a.per_seed, a.specs) if p]}
    for f in todo:
        for path in save_figure(render_figure(stats, per_seed, f, specs), a.out_dir, f["name"], prov):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
