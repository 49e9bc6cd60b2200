# Evaluation: one job per (task, method, cell, seed), or per (task, method, cell) running every seed in one
# process (config eval_seeds_per_job); resumable per problem (records.jsonl).


rule evaluate:
    input:
        unpack(eval_inputs),
    output:
        metrics=eval_outputs(),
    params:
        config_args=config_args(),
        overrides=eval_args,
    log:
        f"logs/{RUN}/eval/{{task}}/{{method}}/{{cell}}/{eval_seed_scope()}.log",
    benchmark:
        f"benchmarks/{RUN}/eval/{{task}}/{{method}}/{{cell}}/{eval_seed_scope()}.tsv"
    wildcard_constraints:
        task=one_of(EXP.tasks),
        method="[a-z0-9_-]+",
        cell=one_of([NO_CELL, *EXP.cells]),
        seed=r"\d+",
    threads: 1
    resources:
        gpu=config["gpus_per_job"],
    conda:
        "../../environment.yml"
    shell:
        "python -m tflow.evaluate {params.config_args} {params.overrides} --restart-on-change > {log} 2>&1"
