# Prepare data: load every evaluation set once per task (offline copy or hub, as configured) and
# record its source, version and the seeded subset every method and seed evaluates. A missing or
# broken data source fails here, before any model is loaded.


rule prepare_data:
    input:
        layers=EXP.layers,
    output:
        manifest=EXP.data_manifest("{task}"),
    params:
        config_args=config_args(),
        overrides=data_args,
    log:
        f"logs/{RUN}/prepare_data/{{task}}.log",
    wildcard_constraints:
        task=one_of(EXP.tasks),
    threads: 1
    conda:
        "../../environment.yml"
    shell:
        "python -m tflow.prepare {params.config_args} --tasks {wildcards.task} --out {output.manifest} "
        "{params.overrides} > {log} 2>&1"
