# Prepare data: load every evaluation set once per task (offline copy or hub, as configured) and
# record its source, version and the seeded subset every method and seed evaluates. A missing or
# broken data source fails here, before any model is loaded.


rule prepare_data:
    input:
        layers=config["run_config"],
    output:
        manifest=f"{R}/data/{{task}}.json",
    params:
        config_args=config_args(),
        overrides=data_overrides,
    log:
        f"logs/{RUN}/prepare_data/{{task}}.log",
    wildcard_constraints:
        task="|".join(config["tasks"]),
    threads: 1
    conda:
        "../../environment.yml"
    shell:
        "python -m tflow.prepare {params.config_args} --tasks {wildcards.task} --out {output.manifest} "
        "{params.overrides} > {log} 2>&1"
