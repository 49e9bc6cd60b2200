"""The generator's validation curve: where held-back validation CE stops improving, from train_log.jsonl files.

    python -m tflow.train --config ... train.validation_every=25      # logs validation CE every 25 steps
    python -m tflow.curve results/runs/x/train_log.jsonl [...] --out-dir results/runs/x [--tolerance 0.01]

For each log, the chosen number of steps is the first evaluated step whose validation CE is within
`tolerance` (relative) of the run's best; when the best is the last evaluated step the run was still
improving, and the summary says so instead of calling it a plateau. The validation problems are held back
from the training mix (`data.validation_size` per source), never test problems, so choosing steps on them
leaves the held-out and test evaluations clean. Writes curve.json and curve.pdf/.png (atomically, with
provenance).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Sequence

from tflow.errors import ConfigError, cli
from tflow.utils import provenance, write_json_atomic


def read_curve(path: str | Path) -> list[tuple[int, float]]:
    """(steps done, validation CE) of every validation record in a training log, in step order."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no training log there (train the generator with train.validation_every=N)")
    points = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not a JSON record ({e})") from None
        if "validation_ce" in rec and math.isfinite(rec["validation_ce"]):
            points[int(rec["steps_done"])] = float(rec["validation_ce"])
    if not points:
        raise ConfigError(f"{path}: no validation records (train with train.validation_every=N and a non-empty "
                          "validation set, data.validation_size > 0)")
    return sorted(points.items())


def choose_steps(points: Sequence[tuple[int, float]], tolerance: float) -> dict:
    """The first step within `tolerance` (relative) of the best validation CE, and whether the run plateaued."""
    best_step, best = min(points, key=lambda p: p[1])
    chosen = next(s for s, ce in points if ce <= best * (1 + tolerance))
    return {"best_step": best_step, "best_ce": best, "chosen_steps": chosen,
            "chosen_ce": dict(points)[chosen], "plateaued": chosen < points[-1][0], "tolerance": tolerance,
            "points": [{"steps": s, "validation_ce": ce} for s, ce in points]}


@cli
def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+", help="train_log.jsonl files (one line each in the figure)")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--tolerance", type=float, default=0.01, help="relative CE within which a step counts as best")
    ap.add_argument("--name", default="curve", help="stem of the written files")
    a = ap.parse_args(argv)
    if not 0 <= a.tolerance < 1:
        ap.error("--tolerance must be in [0, 1)")
    runs = {str(Path(p).parent): choose_steps(read_curve(p), a.tolerance) for p in a.logs}

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tflow.figures import OKABE_ITO, save_figure

    fig, ax = plt.subplots(figsize=(5.5, 3.6), layout="constrained")
    for i, (run, r) in enumerate(runs.items()):
        steps, ce = zip(*[(p["steps"], p["validation_ce"]) for p in r["points"]])
        color = OKABE_ITO[i % len(OKABE_ITO)]
        ax.plot(steps, ce, marker="o", color=color, label=Path(run).name or run)
        ax.axvline(r["chosen_steps"], color=color, ls=":", lw=1)
    ax.set_xlabel("training steps")
    ax.set_ylabel("validation CE (nats/token)")
    ax.set_title(f"Generator validation curve (dotted: first step within {a.tolerance:.0%} of the best)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    prov = {"generated_by": "tflow.curve", "inputs": list(a.logs), "tolerance": a.tolerance}
    save_figure(fig, a.out_dir, a.name, prov)
    write_json_atomic(Path(a.out_dir) / f"{a.name}.json", {"runs": runs, "provenance": provenance(), **prov})
    for run, r in runs.items():
        state = "plateaued" if r["plateaued"] else "still improving at its last evaluated step"
        print(f"{run}: {r['chosen_steps']} steps (validation CE {r['chosen_ce']:.4f}; best {r['best_ce']:.4f} at "
              f"step {r['best_step']}; {state})")


if __name__ == "__main__":
    main()
