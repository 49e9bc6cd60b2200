"""Snakemake glue: every evaluation's records into one long-format CSV (tflow.collect.records_frame)."""
import logging
import sys

from tflow.collect import records_frame
from tflow.utils import write_text_atomic

sys.stderr = open(snakemake.log[0], "w")  # noqa: F821 (snakemake object injected by script:)
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
df = records_frame(snakemake.params.manifest)  # noqa: F821
write_text_atomic(snakemake.output.records, df.to_csv(index=False))  # noqa: F821
logging.info("%d records from %d evaluations", len(df), len(snakemake.params.manifest))  # noqa: F821
