# Evaluation: one job per (task, method, cell, seed); resumable per problem (records.jsonl).


rule evaluate:
    input:
        unpack(eval_inputs),
    output:
        metrics=f"{R}/eval/{{task}}/{{method}}/{{cell}}/seed~{{seed}}/metrics.json",
    params:
        config_args=config_args(),
        overrides=eval_overrides,
    log:
        f"logs/{RUN}/eval/{{task}}/{{method}}/{{cell}}/seed~{{seed}}.log",
    benchmark:
        f"benchmarks/{RUN}/eval/{{task}}/{{method}}/{{cell}}/seed~{{seed}}.tsv"
    wildcard_constraints:
        task="|".join(config["tasks"]),
        method="[a-z0-9_-]+",
        cell="|".join(["none", *CELLS]),
        seed=r"\d+",
    threads: 1
    resources:
        gpu=config["gpus_per_job"],
    conda:
        "../../environment.yml"
    shell:
        "python -m tflow.evaluate {params.config_args} {params.overrides} --restart-on-change > {log} 2>&1"
