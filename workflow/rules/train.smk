# Training stages: the shared sender-condition cache, then one generator per sweep cell and seed,
# and the static-LoRA control (one per seed, the main cell's rank and budget).


rule cache_conditions:
    input:
        layers=config["run_config"],
    output:
        manifest=f"{R}/conditions.json",
    params:
        config_args=config_args(),
        seeds=" ".join(str(s) for s in config["seeds"]),
        overrides=quote(common_overrides()),
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
        layers=config["run_config"],
        conditions=rules.cache_conditions.output.manifest,
    output:
        generator=f"{R}/generators/{{cell}}/seed~{{seed}}/generator.pt",
    params:
        config_args=config_args(),
        overrides=lambda wildcards, output: train_overrides(wildcards, os.path.dirname(output.generator)),
        launcher=train_launcher(),
    log:
        f"logs/{RUN}/train_generator/{{cell}}/seed~{{seed}}.log",
    benchmark:
        f"benchmarks/{RUN}/train_generator/{{cell}}/seed~{{seed}}.tsv"
    wildcard_constraints:
        cell="|".join(CELLS),
        seed=r"\d+",
    threads: 1
    resources:
        gpu=config["gpus_per_job"] * config["train_gpus"],
    conda:
        "../../environment.yml"
    shell:
        "{params.launcher} -m tflow.train {params.config_args} {params.overrides} --no-progress --restart-on-change "
        "> {log} 2>&1"


rule train_static_lora:
    input:
        layers=config["run_config"],
    output:
        adapter=static_adapter_marker("{seed}"),
    params:
        config_args=config_args(),
        overrides=lambda wildcards: train_overrides(wildcards, static_lora_dir(wildcards.seed)),
    log:
        f"logs/{RUN}/train_static_lora/seed~{{seed}}.log",
    benchmark:
        f"benchmarks/{RUN}/train_static_lora/seed~{{seed}}.tsv"
    wildcard_constraints:
        seed=r"\d+",
    threads: 1
    resources:
        gpu=config["gpus_per_job"],
    conda:
        "../../environment.yml"
    shell:
        "python -m tflow.static_lora {params.config_args} {params.overrides} --no-progress --restart-on-change > {log} 2>&1"
