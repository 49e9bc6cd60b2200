# TFlow reproduction as code. `snakemake --cores 2` runs the default configuration
# (config/config.yaml); `snakemake -n` shows what would run.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/quickstart.smk"
include: "workflow/rules/kernels.smk"


rule all:
    input:
        f"results/{config['run_name']}/heldout.json",
        f"results/{config['run_name']}/gsm8k/summary.json",
    default_target: True
