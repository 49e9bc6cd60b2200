"""Paper artifacts (tflow.artifacts tables, tflow.macros, tflow.figures) on synthetic stats frames covering
every spec family: long tables with CI, difference and p_Holm, ratio tables, captions that state what the
test can show at the run's n, verdict macros, and figures."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tflow import artifacts, figures
from tflow.artifacts import load_specs, render_table
from tflow.macros import macro_definitions, render_macros

ROOT = Path(__file__).resolve().parents[1]
SPECS_PATH = ROOT / "config" / "paper.yaml"
PROV = {"generated_by": "tflow.artifacts", "rule": "make_table", "inputs": ["s.csv", "p.csv"],
        "config_hash": "cafe1234beef"}
TASKS = ["gsm8k", "math500", "mmlu_redux", "humanevalplus", "mbppplus"]
SEEDS = 3
SPEC = yaml.safe_load(SPECS_PATH.read_text())
FAMILIES = {t["family"]: (t["rows"], t["rows"][0]) for t in SPEC["tables"] if t.get("rows")}
FAMILIES["main"] = (FAMILIES["main"][0], "single")
FAMILIES["controls"] = (FAMILIES["controls"][0], "tflow")
SWEEPS = {  # cell -> its swept run-config values (tflow.experiment names cells by their difference to main)
    "ablation_rank": {("main" if r == 4 else f"lora.alpha~{2.0 * r}_lora.rank~{r}"): {"lora.rank": str(r), "lora.alpha": str(2.0 * r)}
                      for r in (4, 8, 16, 32)},
    "ablation_scale": {("main" if a == 8.0 else f"lora.alpha~{a}"): {"lora.alpha": str(a)} for a in (2.0, 4.0, 8.0)},
    "ablation_fusion": {("main" if f == "mean" else f"fusion.name~{f}"): {"fusion.name": f} for f in ("mean", "max", "attention")},
    "ablation_generator": {("main" if v == "repro" else f"generator.variant~{v}"): {"generator.variant": v} for v in ("repro", "release")}}


def _row(rng, family, task, method, cell, baseline, score, params=None, metric="accuracy", n=50):
    p = float(rng.choice([0.0005, 0.03, 0.05, 0.07, 0.2]))  # 0.05 itself is not significant
    is_base = method == baseline or cell == baseline
    delta = np.nan if is_base else score - 0.4
    return dict(family=family, task=task, method=method, cell=cell, metric=metric, cell_params=json.dumps(params or {}),
                n_problems=n, n_seeds=SEEDS, score_mean=score, score_std=0.01 + 0.02 * rng.random(),
                score_ci_low=score - 0.05, score_ci_high=score + 0.05, tokens_mean=float(rng.integers(200, 5000)),
                receiver_tokens_mean=float(rng.integers(100, 2000)), seconds_mean=0.1 + 3 * rng.random(),
                truncated_rate=0.25, s_sender_prefill_mean=np.nan if method == "single" else rng.random(),
                s_sender_decode_mean=rng.random() if method.startswith("textmas") else np.nan,
                s_generator_mean=rng.random() if method.startswith("tflow") else np.nan, s_transform_mean=np.nan,
                s_receiver_prefill_mean=rng.random(), s_decode_mean=rng.random(), baseline=baseline,
                is_baseline=is_base, n_paired_problems=np.nan if is_base else n, delta=delta,
                delta_ci_low=delta - 0.1, delta_ci_high=delta + 0.1, p_perm=np.nan if is_base else p,
                p_holm=np.nan if is_base else p, p_min=np.nan if is_base else 2.0 ** (1 - n),
                p_noninf_holm=np.nan if is_base else 0.01, noninferior=not is_base,
                verdict="" if is_base else ("not distinguishable" if p >= 0.05 else "higher" if delta > 0 else "lower"))


@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(0)
    rows = []
    for fam, (methods, base) in FAMILIES.items():
        metric = "ce" if fam.startswith("heldout") else "accuracy"
        for t in TASKS:
            for m in methods:
                cell = "main" if m.startswith("tflow") or m == "static_lora" else "none"
                rows.append(_row(rng, fam, t, m, cell, base, round(float(rng.uniform(0.2, 0.8)), 3), metric=metric))
    for fam, cells in SWEEPS.items():
        for t in ("gsm8k", "math500"):
            for c, params in cells.items():
                rows.append(_row(rng, fam, t, "tflow", c, "main", round(float(rng.uniform(0.2, 0.8)), 3), params))
    stats = pd.DataFrame(rows)
    seeds = [dict(family=r.family, task=r.task, method=r.method, cell=r.cell, seed=s, metric=r.metric,
                  score=r.score_mean + 0.01 * (s - 1), tokens_mean=r.tokens_mean + 10 * s,
                  seconds_mean=r.seconds_mean + 0.01 * s) for r in stats.itertuples() for s in range(SEEDS)]
    return stats, pd.DataFrame(seeds)


@pytest.fixture(scope="module")
def specs():
    return load_specs(SPECS_PATH, list(SWEEPS), TASKS)


def _spec(specs, name):
    return next(t for t in specs["tables"] if t["name"] == name)


def _body(tex):
    """The data rows of a rendered table (every block), split into cells."""
    body = tex.split(r"\toprule")[1].split(r"\bottomrule")[0]
    return [[c.strip() for c in line.rstrip(" \\").split(" & ")] for line in body.strip().splitlines()[1:]
            if line.strip() and not line.startswith(r"\midrule")]


def test_every_table_spec_renders_with_rules_rows_and_header(frames, specs):
    stats, per_seed = frames
    for spec in specs["tables"]:
        tex = render_table(stats, spec, PROV, specs, per_seed)
        assert tex.startswith("% Generated by tflow.artifacts"), spec["name"]
        head = tex.split(r"\begin{table}")[0]
        assert "% config hash: cafe1234beef" in head and "% rule: make_table" in head and "s.csv, p.csv" in head
        assert all(k in tex for k in (r"\toprule", r"\bottomrule", rf"\label{{tab:{spec['name']}}}"))
        assert r"\begin{tabular}" in tex and tex.count("{") == tex.count("}"), spec["name"]
        if spec["kind"] == "ratios":
            assert len(_body(tex)) == len(spec["ratios"])
            continue
        n_rows = len(spec["rows"]) if spec["row_by"] == "method" else len(SWEEPS[spec["family"]])
        n_tasks = len(TASKS) if spec["row_by"] == "method" else 2
        assert len(_body(tex)) == n_rows * n_tasks, spec["name"]
    rank = _body(render_table(stats, _spec(specs, "ablation_rank"), PROV, specs))
    assert [r[1].split()[0] for r in rank[:4]] == ["4", "8", "16", "32"]  # numeric order, labelled from the cell
    assert "(ref.)" in rank[0][1] and all("(ref.)" not in r[1] for r in rank[1:4])  # the main cell is the baseline
    assert rank[0][4] == "ref." and rank[1][4].count("[") == 1  # difference column: ref., then value [CI]
    rank_tex = render_table(stats, _spec(specs, "ablation_rank"), PROV, specs)
    assert r"LoRA rank $r$ / LoRA $\alpha$" in rank_tex and "8 / 16.0" in rank_tex
    scale = render_table(stats, _spec(specs, "ablation_scale"), PROV, specs)
    assert [r[1] for r in _body(scale)[:3]] == ["2.0", "4.0", "8.0 (ref.)"] and "main cell (LoRA $\\alpha$ = 8.0)" in scale


def test_number_formats_ci_delta_and_bold_on_best_with_ties(frames, specs):
    stats, per_seed = frames
    st = stats.copy()
    sel = (st.family == "main") & (st.task == "gsm8k")
    st.loc[sel, "score_mean"] = [0.5, 0.7, 0.6, 0.7]  # textmas-long and tflow tie at the best accuracy
    st.loc[sel & (st.method == "tflow"), ["score_std", "tokens_mean", "seconds_mean", "delta", "delta_ci_low",
                                          "delta_ci_high", "score_ci_low", "score_ci_high"]] = \
        [0.0123, 12345.4, 1.234, 0.2, 0.05, 0.31, 0.61, 0.79]
    rows = _body(render_table(st, _spec(specs, "main"), PROV, specs, per_seed))[:4]
    assert [r[2].startswith(r"\textbf{70.0 ") for r in rows] == [False, True, False, True]
    tflow = rows[3]
    assert tflow[2] == r"\textbf{70.0 $\pm$ 1.2}" and tflow[3] == "[61.0, 79.0]" and tflow[4] == "+20.0 [5.0, 31.0]"
    assert tflow[6] == r"12{,}345 $\pm$ 10" and len(tflow) == 7  # seconds live in the clean-timing table
    assert rows[0][4] == "ref." and rows[0][5] == "--"  # the baseline row
    ce = _body(render_table(stats, _spec(specs, "heldout"), PROV, specs))  # CE: lower is better, 3 decimals
    scores = {r[1]: float(r[2].replace(r"\textbf{", "").split()[0]) for r in ce[:4]}
    assert min(scores, key=scores.get) in [r[1] for r in ce[:4] if r"\textbf" in r[2]]


def test_significance_mark_exactly_where_holm_p_below_005(frames, specs):
    stats, _ = frames
    spec = _spec(specs, "main")
    col = spec["columns"].index("p_holm") + 2
    rows = _body(render_table(stats, spec, PROV, specs))
    sub = stats[stats.family == "main"].set_index(["task", "method"])
    for i, r in enumerate(rows):
        task, method = TASKS[i // 4], spec["rows"][i % 4]
        p = sub.loc[(task, method), "p_holm"]
        assert r[col].endswith(r"$^{\dagger}$") == bool(p < 0.05), (task, method)
        if p < 0.001:
            assert r[col].startswith("$<$0.001")


def test_missing_cells_render_dashes_and_borrowed_rows(frames, specs):
    stats, _ = frames
    st = stats[~((stats.family == "main") & (stats.task == "math500") & (stats.method == "tflow"))]
    rows = _body(render_table(st, _spec(specs, "main"), PROV, specs))
    assert rows[7][2:] == ["--"] * 5 and rows[7][1] == "TFlow"
    spec = {**_spec(specs, "controls"), "rows": ["tflow", "single"], "fallback_family": "main"}
    ctl = _body(render_table(stats, spec, PROV, specs))
    assert ctl[1][1] == "Single agent" and ctl[1][4:] == ["--", "--"]  # borrowed: no comparison shown
    empty = render_table(stats.iloc[:0], _spec(specs, "ablation_fusion"), PROV, specs)  # no data at all
    assert r"\bottomrule" in empty


def test_caption_states_n_seeds_test_and_what_the_test_can_show(frames, specs):
    stats, _ = frames
    cap = render_table(stats, _spec(specs, "main"), PROV, specs).split(r"\caption{")[1].split(r"\label")[0]
    assert "GSM8K 50" in cap and "MBPP+ 50" in cap and f"seeds: {SEEDS}" in cap
    assert "paired sign-flip permutation test" in cap and "Holm" in cap and "training seeds" in cap
    assert "Single agent" in cap and "can reach significance" in cap
    small = stats.assign(p_min=np.where(stats.is_baseline, np.nan, 0.125), n_paired_problems=4)
    cap = render_table(small, _spec(specs, "main"), PROV, specs).split(r"\caption{")[1]
    assert "cannot test these claims" in cap and "0.125" in cap


def test_ratio_table_percent_changes(frames, specs):
    stats, _ = frames
    rows = _body(render_table(stats, _spec(specs, "costs"), PROV, specs))
    g = stats[(stats.family == "main") & (stats.task == "gsm8k")].set_index("method")
    want = 100 * (g.loc["tflow", "receiver_tokens_mean"] / g.loc["textmas-long", "receiver_tokens_mean"] - 1)
    assert rows[1][0].startswith("Tokens (receiver), TFlow vs TextMAS") and rows[1][1] == f"{want:+.1f}\\%"
    t = stats[(stats.family == "timing") & (stats.task == "gsm8k")].set_index("method")  # clean-timing family
    speed = t.loc["textmas-long", "seconds_mean"] / t.loc["tflow", "seconds_mean"]
    assert rows[4][1] == f"{speed:.2f}"


def test_escaping_of_labels(frames, specs):
    assert artifacts.escape("a_b & 50% #1 {x} ~^\\") == (r"a\_b \& 50\% \#1 \{x\} \textasciitilde{}"
                                                        r"\textasciicircum{}\textbackslash{}")
    assert artifacts.escape(r"zero $\Delta W$ 5%") == r"zero $\Delta W$ 5\%"
    stats, _ = frames
    sp = {**specs, "method_labels": {**specs["method_labels"], "single": "my_single & 100%"},
          "task_labels": {"gsm8k": "GSM#8K"}}
    tex = render_table(stats, _spec(specs, "main"), PROV, sp)
    assert r"my\_single \& 100\%" in tex and r"GSM\#8K" in tex and "my_single" not in tex


FACTS = {"scale": "at CPU scale", "receiver": "tiny", "sender": "tiny", "decoding": "greedy", "max_new_tokens": 8,
         "message_tokens": 64, "train_steps": 4, "train_batch": 2, "mix": "gsm8k 1",
         "generator": {"variant": "repro", "parameters": 1234567, "generated_values_per_query": 89},
         "trained_parameters": {"static_lora": 321}}


def test_macros_unique_deterministic_verdicts_and_cover_main_tex(frames, specs):
    stats, _ = frames
    text = render_macros(stats, specs, PROV, FACTS)
    assert text == render_macros(stats.sample(frac=1, random_state=1), specs, PROV, FACTS)  # row order irrelevant
    names = re.findall(r"\\newcommand\{\\([^}]*)\}", text)
    assert len(names) == len(set(names)) and all(re.fullmatch(r"[A-Za-z]+", n) for n in names)
    defs = macro_definitions(stats, specs, FACTS)
    r = stats[(stats.family == "main") & (stats.task == "gsm8k") & (stats.method == "tflow")].iloc[0]
    assert defs["accGsmEightKTflow"] == f"{100 * r.score_mean:.1f}"
    assert defs["verdictGsmEightKTflow"] == {"higher": "higher than", "lower": "lower than",
                                             "not distinguishable": "not distinguishable from"}[r.verdict]
    assert defs["verdictGsmEightKSingle"] == "--"  # the baseline is compared with nothing
    assert defs["genParams"] == "1{,}234{,}567" and defs["paramsStaticLora"] == "321" and defs["runScale"] == "at CPU scale"
    assert defs["testableMain"] == "can" and defs["nSeeds"] == str(SEEDS)
    # every macro of the paper is defined, also when a whole family and most data are missing
    tex = (ROOT / "paper" / "main.tex").read_text()
    standard = {"documentclass", "input", "title", "author", "date", "begin", "end", "maketitle", "section",
                "label", "ref", "caption", "centering", "includegraphics", "linewidth", "mathrm", "times", "tflow",
                "paragraph", "emph", "alpha"}
    used = set(re.findall(r"\\([A-Za-z]+)", tex)) - standard
    assert len(used) > 60 and used <= set(names), used - set(names)
    sparse = macro_definitions(stats[(stats.task == "gsm8k") & (stats.family != "heldout")], specs, {})
    assert used <= set(sparse) and sparse["accMathFiveZeroZeroTflow"] == "--" and sparse["testableHeldout"] == "--"
    with pytest.raises(ValueError, match="defined twice"):  # two entries colliding with different values
        macro_definitions(stats, {**specs, "macros": {"values": [{"table": "main", "metrics": ["acc"]},
                                                                 {"table": "comparators", "metrics": ["acc"]}]}})


def test_main_tex_inputs_every_table_and_figure(specs):
    """main.tex places the method families' tables and figures; generated/ablations.tex every ablation's."""
    tex = (ROOT / "paper" / "main.tex").read_text()
    assert r"\input{generated/macros.tex}" in tex and r"\input{preamble}" in tex and r"\input{generated/ablations}" in tex
    gen = artifacts.render_ablation_tex(specs, list(SWEEPS), PROV)
    tables = set(re.findall(r"\\input\{tables/([^}.]+)", tex)) | set(re.findall(r"\\input\{tables/([^}.]+)", gen))
    assert {t["name"] for t in specs["tables"]} == tables
    figs = set(re.findall(r"\\includegraphics[^{]*\{figures/([^}.]+)\.pdf", tex + gen))
    assert {f["name"] for f in specs["figures"]} == figs


def test_every_figure_spec_writes_pdf_and_png_with_provenance(frames, specs, tmp_path):
    from PIL import Image

    stats, per_seed = frames
    prov = {**PROV, "generated_by": "tflow.figures", "rule": "make_figure"}
    for spec in specs["figures"]:
        fig = figures.render_figure(stats, per_seed, spec, specs)
        pdf, png = figures.save_figure(fig, tmp_path, spec["name"], prov)
        assert pdf.read_bytes().startswith(b"%PDF") and pdf.stat().st_size > 1000
        assert b"cafe1234beef" in pdf.read_bytes() and b"make_figure" in pdf.read_bytes()
        meta = json.loads(Image.open(png).text["Description"])
        assert meta["config_hash"] == "cafe1234beef" and meta["rule"] == "make_figure" and png.stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{f['name']}.{e}" for f in specs["figures"]
                                                               for e in ("pdf", "png"))  # no temp files left


def test_heldout_figure_draws_paired_differences_to_the_baseline(frames, specs):
    """The held-out figure shows each method's difference to the baseline with its paired CI (what the tests
    use), not the marginal scores, and the baseline as the zero line."""
    stats, per_seed = frames
    spec = next(f for f in specs["figures"] if f["name"] == "heldout")
    fig = figures.render_figure(stats, per_seed, spec, specs)
    ax = fig.axes[0]
    task = spec["tasks"][0]
    want = stats[(stats.family == "heldout") & (stats.task == task) & ~stats.is_baseline.astype(bool)]
    want = want.set_index("method").loc[[m for m in spec["methods"] if m in set(want.method)]]
    drawn = [line.get_ydata()[0] for line in ax.lines if line.get_linestyle() == "None" and line.get_marker() != "_"]
    assert np.allclose(drawn, want.delta.to_numpy())
    zero = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert len(zero) == 1 and np.allclose(zero[0].get_ydata(), 0.0)
    caps = sorted({round(float(y), 6) for line in ax.lines if line.get_marker() == "_" for y in line.get_ydata()})
    assert set(np.round(want.delta_ci_low, 6)) <= set(caps) and set(np.round(want.delta_ci_high, 6)) <= set(caps)
    figures.plt.close(fig)


def test_figure_without_data_fails_naming_the_spec(frames, specs):
    stats, per_seed = frames
    fig_spec = {f["name"]: f for f in specs["figures"]}
    with pytest.raises(figures.FigureDataError, match=r"'ablation_fusion'.*ablation_fusion"):
        figures.render_figure(stats[stats.family != "ablation_fusion"], per_seed, fig_spec["ablation_fusion"], specs)
    with pytest.raises(figures.FigureDataError, match=r"'phase_time'.*per-phase"):
        no_phase = stats.drop(columns=[c for c in figures.PHASES if c in stats])
        figures.render_figure(no_phase, per_seed, fig_spec["phase_time"], specs)
    with pytest.raises(figures.FigureDataError, match=r"'frontier'.*tasks"):
        figures.render_figure(stats[stats.family != "main"], per_seed, fig_spec["frontier"], specs)


@pytest.mark.parametrize("edit, match", [
    (lambda s: s["tables"][0].update(colums=1), r"table spec 'main'.*colums"),
    (lambda s: s["tables"][0].pop("family"), r"table spec 'main'.*family"),
    (lambda s: s["tables"][0].update(columns=["score", "latency"]), r"'main'.*latency"),
    (lambda s: s["tables"][0].pop("rows"), r"table spec 'main'.*rows"),
    (lambda s: s["tables"][1]["ratios"][0].update(metric="flops"), r"'costs'.*metric"),
    (lambda s: s["figures"][0].update(kind="scatter"), r"figure spec 'frontier'.*kind"),
    (lambda s: s["figures"][0].update(colour="red"), r"figure spec 'frontier'.*colour"),
    (lambda s: s["figures"][0].pop("methods"), r"figure spec 'frontier'.*methods"),
    (lambda s: s["macros"]["values"][0].update(table="nope"), r"macros.values.*nope"),
    (lambda s: s.update(tabels=[]), r"tabels"),
    (lambda s: s["tables"].append(dict(s["tables"][0])), r"'main'.*name"),
])
def test_bad_spec_fails_naming_spec_and_key(tmp_path, edit, match):
    raw = yaml.safe_load(SPECS_PATH.read_text())
    edit(raw)
    path = tmp_path / "paper.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=match):
        load_specs(path)


def test_clis_write_atomically(frames, tmp_path):
    stats, per_seed = frames
    stats.to_csv(tmp_path / "cells.csv", index=False)
    per_seed.to_csv(tmp_path / "per_seed.csv", index=False)
    (tmp_path / "facts.json").write_text(json.dumps(FACTS))
    common = ["--stats", str(tmp_path / "cells.csv"), "--per-seed", str(tmp_path / "per_seed.csv"),
              "--specs", str(SPECS_PATH), "--config-hash", "abc123", "--tasks", *TASKS, "--ablations", *SWEEPS]
    artifacts.main(common + ["--tables-dir", str(tmp_path / "tables"), "--only", "controls", "--rule", "make_table"])
    assert [p.name for p in (tmp_path / "tables").iterdir()] == ["controls.tex"]
    tex = (tmp_path / "tables" / "controls.tex").read_text()
    assert "% config hash: abc123" in tex and "cells.csv" in tex and "make_table" in tex
    artifacts.main(common + ["--macros", str(tmp_path / "gen" / "macros.tex"), "--facts", str(tmp_path / "facts.json"),
                             "--rule", "make_macros"])
    assert r"\newcommand{\accGsmEightKTflow}" in (tmp_path / "gen" / "macros.tex").read_text()
    figures.main(common + ["--out-dir", str(tmp_path / "fig"), "--only", "ablation_scale", "--rule", "make_figure"])
    assert sorted(p.name for p in (tmp_path / "fig").iterdir()) == ["ablation_scale.pdf", "ablation_scale.png"]
    with pytest.raises(SystemExit):
        artifacts.main(common + ["--tables-dir", str(tmp_path / "tables"), "--only", "nope"])


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    """mkstemp creates 0600 files; generated results must be readable like any other file."""
    from tflow.utils import default_file_mode, write_text_atomic

    write_text_atomic(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == default_file_mode()
    assert list(tmp_path.iterdir()) == [tmp_path / "a.txt"]  # no temp file left behind
