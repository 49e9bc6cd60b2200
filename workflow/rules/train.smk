# Training stages: the shared sender-condition cache, then one generator per sweep cell and seed, and
# one module per seed for every method that trains its own (tflow.methods.METHODS: needs="trained",
# e.g. the static LoRA), at the main cell's settings and budget.


rule cache_conditions:
    input:
        layers=EXP.layers,
    output:
        manifest=f"{R}/conditions.json",
    params:
        config_args=config_args(),
        seeds=" ".join(str(s) for s in EXP.seeds),
        overrides=quote(EXP.common),
    log:
        f"logs/{RUN}/cache_conditions.log",
    benchmark:
        f"benchmarks/{RUN}/cache_conditions.tsv"
    threads: 1
    resources:
        gpu=config["gpus_per_job"],
    conda:
        "../../environment.yml"
    shell:
        "python -m tflow.train {params.config_args} {params.overrides} --no-progress "
        "--cache-only {output.manifest} --seeds {params.seeds} > {log} 2>&1"


rule train_generator:
    input:
        layers=EXP.layers,
        conditions=rules.cache_conditions.output.manifest,
    output:
        generator=EXP.generator_path("{cell}", "{seed}"),
    params:
        config_args=config_args(),
        overrides=train_generator_args,
        launcher=train_launcher(),
    log:
        f"logs/{RUN}/train_generator/{{cell}}/seed~{{seed}}.log",
    benchmark:
        f"benchmarks/{RUN}/train_generator/{{cell}}/seed~{{seed}}.tsv"
    wildcard_constraints:
        cell=one_of(EXP.cells),
        seed=r"\d+",
    threads: 1
    resources:
        gpu=config["gpus_per_job"] * config["train_gpus"],
    conda:
        "../../environment.yml"
    shell:
        "{params.launcher} -m tflow.train {params.config_args} {params.overrides} --no-progress --restart-on-change "
        "> {log} 2>&1"


rule train_method:
    input:
        layers=EXP.layers,
    output:
        marker=EXP.trained_marker("{method}", "{seed}"),
    params:
        config_args=config_args(),
        overrides=train_method_args,
        trainer=trainer,
    log:
        f"logs/{RUN}/train_method/{{method}}/seed~{{seed}}.log",
    benchmark:
        f"benchmarks/{RUN}/train_method/{{method}}/seed~{{seed}}.tsv"
    wildcard_constraints:
        method=one_of(EXP.trained_methods()),
        seed=r"\d+",
    threads: 1
    resources:
        gpu=config["gpus_per_job"],
    conda:
        "../../environment.yml"
    shell:
        "python -m {params.trainer} {params.config_args} {params.overrides} --no-progress --restart-on-change "
        "> {log} 2>&1"
