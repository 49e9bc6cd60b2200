"""Snakemake glue: per-cell statistics and per-seed accuracies from the records (tflow.stats)."""
import logging
import sys

import pandas as pd

from tflow.stats import per_seed, summarize
from tflow.timing import timing_rows
from tflow.utils import write_text_atomic

sys.stderr = open(snakemake.log[0], "w")  # noqa: F821 (snakemake object injected by script:)
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
records = pd.read_csv(snakemake.input.records, dtype={"cell": str})  # noqa: F821
cells = summarize(records, snakemake.params.baselines, n_boot=snakemake.params.n_boot,  # noqa: F821
                  margin=snakemake.params.margin)  # noqa: F821
timing = timing_rows(snakemake.input.timing, snakemake.params.timing_names)  # noqa: F821 (clean wall-clock)
cells = pd.concat([cells, pd.DataFrame(timing)], ignore_index=True) if timing else cells
write_text_atomic(snakemake.output.cells, cells.to_csv(index=False))  # noqa: F821
write_text_atomic(snakemake.output.per_seed, per_seed(records).to_csv(index=False))  # noqa: F821
logging.info("%d cells from %d records", len(cells), len(records))
