# The quickstart chain: train a generator briefly, then measure it.


rule train_generator:
    input:
        layers=config["run_config"],
    output:
        generator=f"results/runs/{config['run_name']}/generator.pt",
    params:
        config_args=config_args(),
        overrides=overrides(f"train.out_dir={run_dir()}"),
    log:
        f"logs/{config['run_name']}/train_generator.log",
    benchmark:
        f"benchmarks/{config['run_name']}/train_generator.tsv"
    threads: 2
    conda:
        "../../environment.yml"
    shell:
        "python -m tflow.train {params.config_args} {params.overrides} --no-progress > {log} 2>&1"


rule heldout_loss:
    input:
        generator=rules.train_generator.output.generator,
    output:
        json=f"results/{config['run_name']}/heldout.json",
    params:
        n=config["heldout_problems"],
        overrides=overrides(),
    log:
        f"logs/{config['run_name']}/heldout_loss.log",
    benchmark:
        f"benchmarks/{config['run_name']}/heldout_loss.tsv"
    threads: 2
    conda:
        "../../environment.yml"
    shell:
        "python -m tflow.heldout --checkpoint {input.generator} --n {params.n} --out {output.json} "
        "{params.overrides} > {log} 2>&1"


rule gsm8k_quickstart:
    input:
        generator=rules.train_generator.output.generator,
    output:
        summary=f"results/{config['run_name']}/gsm8k/summary.json",
        records=f"results/{config['run_name']}/gsm8k/records.jsonl",
    params:
        n=config["gsm8k_problems"],
        max_new_tokens=config["max_new_tokens"],
        out=lambda wildcards, output: os.path.dirname(output.summary),
        overrides=overrides(),
    log:
        f"logs/{config['run_name']}/gsm8k_quickstart.log",
    benchmark:
        f"benchmarks/{config['run_name']}/gsm8k_quickstart.tsv"
    threads: 2
    conda:
        "../../environment.yml"
    shell:
        "python -m tflow.quickstart --checkpoint {input.generator} --n {params.n} "
        "--max-new-tokens {params.max_new_tokens} --out {params.out} {params.overrides} > {log} 2>&1"
