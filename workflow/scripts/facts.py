"""Snakemake glue: what the run ran (tflow.experiment.Experiment.facts) plus the trained parameter counts
from the training summaries (the main generator's, and each trained method's) -> facts.json."""
import json
import logging
import sys
from pathlib import Path

from tflow.utils import provenance, write_json_atomic

sys.stderr = open(snakemake.log[0], "w")  # noqa: F821 (snakemake object injected by script:)
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
facts = dict(snakemake.params.facts)  # noqa: F821
for path in snakemake.input.get("generator", []):  # noqa: F821
    summary = json.loads((Path(path).parent / "train_summary.json").read_text())
    facts["generator"] = {**facts["generator"], "parameters": summary["trainable_parameters"],
                          "generated_values_per_query": summary.get("generated_values_per_query")}
facts["trained_parameters"] = {}
for path in snakemake.input.get("trained", []):  # noqa: F821
    summary = json.loads((Path(path).parent / "train_summary.json").read_text())
    dag_name = Path(path).parent.parent.name  # trained/<DAG method>/seed~0: lmnet and lmnet-mlp apart
    facts["trained_parameters"][dag_name] = summary["trainable_parameters"]
facts["provenance"] = provenance()
write_json_atomic(snakemake.output.facts, facts)  # noqa: F821
logging.info("facts: %s", facts)
