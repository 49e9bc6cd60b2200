# TFlow reproduction as code. `snakemake --cores 2` runs the default configuration (config/config.yaml:
# the CPU-scale reproduction) and ends with paper/ holding every table, figure and macro;
# `snakemake -n` shows what would run; `snakemake --configfile config/paper_scale.yaml` is the paper scale.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


for _key in ("families", "ablations"):  # `<name>: null` in a layered --configfile removes an inherited entry
    config[_key] = {k: v for k, v in (config.get(_key) or {}).items() if v is not None}
validate(config, "workflow/schemas/config.schema.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/kernels.smk"


rule all:
    input:
        paper_targets(),
    default_target: True
