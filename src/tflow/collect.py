"""Collect evaluation results: every metrics.json under a folder into one table.

    python -m tflow.collect results/eval [--csv results/eval/summary.csv] [--markdown summary.md]

One row per evaluation run (task, method, preset, n, accuracy, base/plus pass@1 for code,
truncation rate, processed tokens per problem by agent, seconds per problem by phase). Ratios
between methods are computed on the same task and subset only.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import pandas as pd

from tflow.experiment import dag_name
from tflow.utils import write_text_atomic


def label(m: dict) -> str:
    """The run's DAG method name (e.g. textmas-short48: the method and the preset its config matches)."""
    return dag_name(m["method"], m["config"])


def collect(root: str | Path) -> pd.DataFrame:
    rows = []
    for path in sorted(Path(root).rglob("metrics.json")):
        m = json.loads(path.read_text())
        row = {"task": m["task"], "method": label(m), "n": m["n"], "accuracy": m["accuracy"],
               "truncated": m["truncated_rate"], "processed_tokens": m["processed_tokens"]["mean"],
               "receiver_tokens": sum(m["tokens_per_agent"]["mean"].get("receiver", {}).values()),
               "seconds": m["seconds"]["mean"], "data_version": m["data"].get("version", ""), "path": str(path.parent)}
        if "pass@1" in m:
            row["base_pass@1"] = m["pass@1"]["base"]
        for phase, sec in m["seconds_per_phase"]["mean"].items():
            row[f"s_{phase}"] = sec
        rows.append(row)
    return pd.DataFrame(rows)


def records_frame(manifest: Sequence[dict]) -> pd.DataFrame:
    """The long-format per-problem table the statistics read: one row per (family, task, method, cell,
    seed, problem). `manifest` rows name family, task, method, cell, seed, the metrics.json path, whether
    the method trains (`trained`) and the cell's swept values; the records are read from the records.jsonl
    beside it (checked complete against metrics.json). Held-out records carry `ce` instead of `correct`."""
    rows = []
    for entry in manifest:
        folder = Path(entry["path"]).parent
        m = json.loads(Path(entry["path"]).read_text())
        recs = [json.loads(x) for x in (folder / "records.jsonl").read_text().splitlines() if x.strip()]
        by_id = {r["task_id"]: r for r in recs}
        missing = [t for t in m["data"]["task_ids"] if t not in by_id]
        if missing:
            raise ValueError(f"{folder}: {len(missing)} problems of metrics.json have no record (e.g. {missing[0]})")
        for tid in m["data"]["task_ids"]:
            r = by_id[tid]
            row = {k: entry[k] for k in ("family", "task", "method", "cell", "seed")}
            row.update(task_id=tid, cell_params=entry.get("cell_params", "{}"), trained=bool(entry.get("trained")))
            if "ce" in r:  # held-out: the receiver's cross-entropy on the reference solution
                row.update(ce=r["ce"], scored_tokens=r["tokens_scored"], seconds=r.get("seconds_total"))
            else:
                receiver = r["tokens"].get("receiver", {})
                row.update(correct=bool(r["correct"]), processed_tokens=r["processed_tokens"],
                           receiver_tokens=receiver.get("prompt", 0) + receiver.get("generated", 0),
                           seconds=sum(r["seconds"].values()), truncated=bool(r["truncated"]))
                if isinstance(r.get("detail"), dict) and "base" in r["detail"]:
                    row["base_correct"] = r["detail"]["base"] == "pass"
                row.update({f"s_{k}": v for k, v in r["seconds"].items()})
            rows.append(row)
    return pd.DataFrame(rows)


def ratios(df: pd.DataFrame, num: str, den: str) -> pd.DataFrame:
    """Per task: processed tokens num/den and wall-clock den/num (speed-up of num over den)."""
    a = df[df.method == num].set_index("task")
    b = df[df.method == den].set_index("task")
    both = a.index.intersection(b.index)
    return pd.DataFrame({"n": a.loc[both, "n"], f"tokens {num}/{den}": a.loc[both, "processed_tokens"] / b.loc[both, "processed_tokens"],
                         f"wall-clock {den}/{num}": b.loc[both, "seconds"] / a.loc[both, "seconds"]})


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root")
    ap.add_argument("--csv")
    ap.add_argument("--markdown")
    args = ap.parse_args(argv)
    df = collect(args.root)
    if df.empty:
        raise SystemExit(f"no metrics.json under {args.root}")
    cols = [c for c in ["task", "method", "n", "accuracy", "base_pass@1", "truncated", "processed_tokens",
                        "receiver_tokens", "seconds"] if c in df]
    table = df[cols].sort_values(["task", "method"]).to_markdown(index=False, floatfmt=".3f")
    text = table
    if {"tflow", "textmas-long"} <= set(df.method):
        text += "\n\n" + ratios(df, "tflow", "textmas-long").to_markdown(floatfmt=".3f")
    print(text)
    if args.csv:
        write_text_atomic(args.csv, df.to_csv(index=False))
    if args.markdown:
        write_text_atomic(args.markdown, text + "\n")


if __name__ == "__main__":
    main()
