# Evaluation: answers scored (kind eval, tflow.evaluate) or reference solutions scored teacher-forced (kind
# heldout, tflow.heldout); one job per seed, or per (kind, task, method, cell) running every seed of a method
# in one process (config eval_seeds_per_job); resumable per batch of problems (records.jsonl).


rule evaluate:
    input:
        unpack(eval_inputs),
    output:
        metrics=EXP.eval_path("{task}", "{method}", "{cell}", "{seed}", "{kind}"),
    params:
        config_args=config_args(),
        overrides=eval_args,
        entry=eval_entry,
    log:
        f"logs/{RUN}/{{kind}}/{{task}}/{{method}}/{{cell}}/seed~{{seed}}.log",
    benchmark:
        f"benchmarks/{RUN}/{{kind}}/{{task}}/{{method}}/{{cell}}/seed~{{seed}}.tsv"
    wildcard_constraints:
        kind=one_of(KINDS),
        task=one_of(EXP.tasks),
        method=one_of(ONE_SEED),
        cell=one_of([NO_CELL, *EXP.cells]),
        seed=r"\d+",
    threads: 1
    resources:
        gpu=config["gpus_per_job"],
    conda:
        "../../environment.yml"
    shell:
        "python -m {params.entry} {params.config_args} {params.overrides} --restart-on-change > {log} 2>&1"


if SEEDS_PER_JOB:

    rule evaluate_seeds:
        input:
            unpack(eval_inputs),
        output:
            metrics=[EXP.eval_path("{task}", "{method}", "{cell}", s, "{kind}") for s in EXP.seeds],
        params:
            config_args=config_args(),
            overrides=eval_args,
            entry=eval_entry,
        log:
            f"logs/{RUN}/{{kind}}/{{task}}/{{method}}/{{cell}}/{SEED_SCOPE}.log",
        benchmark:
            f"benchmarks/{RUN}/{{kind}}/{{task}}/{{method}}/{{cell}}/{SEED_SCOPE}.tsv"
        wildcard_constraints:
            kind=one_of(KINDS),
            task=one_of(EXP.tasks),
            method=one_of(MULTI_SEED),
            cell=one_of([NO_CELL, *EXP.cells]),
        threads: 1
        resources:
            gpu=config["gpus_per_job"],
        conda:
            "../../environment.yml"
        shell:
            "python -m {params.entry} {params.config_args} {params.overrides} --restart-on-change > {log} 2>&1"


if EXP.timing_methods():

    rule timing:
        input:
            unpack(timing_inputs),
        output:
            timing=EXP.timing_path("{method}"),
        params:
            config_args=config_args(),
            overrides=timing_args,
        log:
            f"logs/{RUN}/timing/{{method}}.log",
        wildcard_constraints:
            method=one_of(EXP.timing_methods()),
        threads: workflow.cores  # alone on the machine: nothing runs beside a timed method
        resources:
            gpu=config["gpus_per_job"],
        conda:
            "../../environment.yml"
        shell:
            "python -m tflow.timing {params.config_args} {params.overrides} --out {output.timing} > {log} 2>&1"
