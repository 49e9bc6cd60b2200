# Aggregation and the paper: records -> statistics -> tables, figures, macros -> (PDF).


rule collect:
    input:
        metrics=all_metrics(),
    output:
        records=f"{R}/summary/records.csv",
    params:
        manifest=records_manifest(),
    log:
        f"logs/{RUN}/collect.log",
    conda:
        "../../environment.yml"
    script:
        "../scripts/collect_records.py"


rule stats:
    input:
        records=rules.collect.output.records,
    output:
        cells=f"{R}/stats/cells.csv",
        per_seed=f"{R}/stats/per_seed.csv",
    params:
        baselines=baselines(),
        n_boot=config["n_boot"],
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
        tex="paper/tables/{table}.tex",
    params:
        config_hash=config_hash(),
    log:
        f"logs/{RUN}/paper/table_{{table}}.log",
    wildcard_constraints:
        table="|".join(table_names()) or "no-table",
    conda:
        "../../environment.yml"
    shell:
        "python -m tflow.artifacts --stats {input.cells} --per-seed {input.per_seed} --specs {input.specs} "
        "--tables-dir paper/tables --only {wildcards.table} --rule make_table --config-hash {params.config_hash} "
        "> {log} 2>&1"


rule make_macros:
    input:
        cells=rules.stats.output.cells,
        per_seed=rules.stats.output.per_seed,
        specs=config["paper_specs"],
    output:
        tex="paper/generated/macros.tex",
    params:
        config_hash=config_hash(),
    log:
        f"logs/{RUN}/paper/macros.log",
    conda:
        "../../environment.yml"
    shell:
        "python -m tflow.artifacts --stats {input.cells} --per-seed {input.per_seed} --specs {input.specs} "
        "--macros {output.tex} --rule make_macros --config-hash {params.config_hash} > {log} 2>&1"


rule make_figure:
    input:
        cells=rules.stats.output.cells,
        per_seed=rules.stats.output.per_seed,
        specs=config["paper_specs"],
    output:
        pdf="paper/figures/{figure}.pdf",
        png="paper/figures/{figure}.png",
    params:
        config_hash=config_hash(),
    log:
        f"logs/{RUN}/paper/figure_{{figure}}.log",
    wildcard_constraints:
        figure="|".join(figure_names()) or "no-figure",
    conda:
        "../../environment.yml"
    shell:
        "python -m tflow.figures --stats {input.cells} --per-seed {input.per_seed} --specs {input.specs} "
        "--out-dir paper/figures --only {wildcards.figure} --rule make_figure --config-hash {params.config_hash} "
        "> {log} 2>&1"


rule paper_pdf:
    input:
        tex="paper/main.tex",
        preamble="paper/preamble.tex",
        macros=rules.make_macros.output.tex,
        tables=[f"paper/tables/{t}.tex" for t in table_names()],
        figures=[f"paper/figures/{f}.pdf" for f in figure_names()],
    output:
        pdf="paper/main.pdf",
    log:
        f"logs/{RUN}/paper/latexmk.log",
    conda:
        "../../environment.yml"
    shell:
        "cd paper && latexmk -pdf -interaction=nonstopmode -halt-on-error main.tex > ../{log} 2>&1"
