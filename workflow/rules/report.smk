# Aggregation and the paper: records -> statistics -> tables, figures, macros -> (PDF). Tables, figures and
# statistics are marked for `snakemake --report report.html`, each with its caption.


rule collect:
    input:
        metrics=all_metrics(),
    output:
        records=f"{R}/summary/records.csv",
    params:
        manifest=EXP.records_manifest(),
    log:
        f"logs/{RUN}/collect.log",
    conda:
        "../../environment.yml"
    script:
        "../scripts/collect_records.py"


rule facts:
    input:
        unpack(facts_inputs),
    output:
        facts=f"{R}/stats/facts.json",
    params:
        facts=EXP.facts(),
    log:
        f"logs/{RUN}/facts.log",
    conda:
        "../../environment.yml"
    script:
        "../scripts/facts.py"


rule stats:
    input:
        records=rules.collect.output.records,
        timing=[EXP.timing_path(m) for m in EXP.timing_methods()],
    output:
        cells=report(f"{R}/stats/cells.csv", caption="../report/artifact.rst", category="Statistics"),
        per_seed=report(f"{R}/stats/per_seed.csv", caption="../report/artifact.rst", category="Statistics"),
    params:
        baselines=EXP.baselines(),
        n_boot=config["n_boot"],
        margin=config["noninferiority_margin"],
        timing_names=EXP.timing_methods(),
        caption="Per (family, task, method, cell): accuracy (seed mean, std, 95% bootstrap CI over problems), "
        "tokens and seconds, and the paired comparison with the family's baseline (delta, CI, p, p_Holm); "
        "per_seed.csv: the same per seed.",
    log:
        f"logs/{RUN}/stats.log",
    conda:
        "../../environment.yml"
    script:
        "../scripts/stats.py"


rule make_table:
    input:
        cells=rules.stats.output.cells,
        per_seed=rules.stats.output.per_seed,
        specs=config["paper_specs"],
    output:
        tex=report("paper/tables/{table}.tex", caption="../report/artifact.rst", category="Tables"),
    params:
        config_hash=config_hash(),
        tasks=run_tasks(),
        ablations=" ".join(EXP.sweeps),
        caption=lambda wildcards: artifact_caption("tables", wildcards.table),
    log:
        f"logs/{RUN}/paper/table_{{table}}.log",
    wildcard_constraints:
        table=one_of(table_names()),
    conda:
        "../../environment.yml"
    shell:
        "python -m tflow.artifacts --stats {input.cells} --per-seed {input.per_seed} --specs {input.specs} "
        "--tasks {params.tasks} --ablations {params.ablations} --tables-dir paper/tables --only {wildcards.table} "
        "--rule make_table --config-hash {params.config_hash} > {log} 2>&1"


rule make_macros:
    input:
        cells=rules.stats.output.cells,
        per_seed=rules.stats.output.per_seed,
        specs=config["paper_specs"],
        facts=rules.facts.output.facts,
    output:
        tex="paper/generated/macros.tex",
        ablations="paper/generated/ablations.tex",
    params:
        config_hash=config_hash(),
        tasks=run_tasks(),
        ablations=" ".join(EXP.sweeps),
    log:
        f"logs/{RUN}/paper/macros.log",
    conda:
        "../../environment.yml"
    shell:
        "python -m tflow.artifacts --stats {input.cells} --per-seed {input.per_seed} --specs {input.specs} "
        "--tasks {params.tasks} --ablations {params.ablations} --facts {input.facts} --macros {output.tex} "
        "--ablation-tex {output.ablations} --rule make_macros --config-hash {params.config_hash} > {log} 2>&1"


rule make_figure:
    input:
        cells=rules.stats.output.cells,
        per_seed=rules.stats.output.per_seed,
        specs=config["paper_specs"],
    output:
        pdf="paper/figures/{figure}.pdf",
        png=report("paper/figures/{figure}.png", caption="../report/artifact.rst", category="Figures"),
    params:
        config_hash=config_hash(),
        tasks=run_tasks(),
        ablations=" ".join(EXP.sweeps),
        caption=lambda wildcards: artifact_caption("figures", wildcards.figure),
    log:
        f"logs/{RUN}/paper/figure_{{figure}}.log",
    wildcard_constraints:
        figure=one_of(figure_names()),
    conda:
        "../../environment.yml"
    shell:
        "python -m tflow.figures --stats {input.cells} --per-seed {input.per_seed} --specs {input.specs} "
        "--tasks {params.tasks} --ablations {params.ablations} --out-dir paper/figures --only {wildcards.figure} "
        "--rule make_figure --config-hash {params.config_hash} > {log} 2>&1"


rule paper_pdf:
    input:
        tex="paper/main.tex",
        preamble="paper/preamble.tex",
        macros=rules.make_macros.output.tex,
        ablations=rules.make_macros.output.ablations,
        tables=[f"paper/tables/{t}.tex" for t in table_names()],
        figures=[f"paper/figures/{f}.pdf" for f in figure_names()],
    output:
        pdf=report("paper/main.pdf", caption="../report/artifact.rst", category="Paper"),
    params:
        caption="The generated paper: every number in its prose is a macro of paper/generated/macros.tex.",
    log:
        f"logs/{RUN}/paper/latexmk.log",
    conda:
        "../../environment.yml"
    shell:
        "cd paper && latexmk -pdf -interaction=nonstopmode -halt-on-error main.tex > ../{log} 2>&1"
