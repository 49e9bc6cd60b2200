"""Generated tokens per second of the evaluation path (the receiver alone, `single`), under variants of its
settings, on the same problems in one process: the medium run's feasibility on 2 cores rests on it.

    python -m tflow.bench_throughput --config config/run/medium.yaml --n 32 \\
        --variant "before: eval.batch_size=8 eval.sort_by_length=false" \\
        --variant "after: eval.batch_size=16 eval.sort_by_length=true eval.cache=static" --out bench.json

Every variant answers the same seeded GSM8K subset greedily after one untimed warm-up; the variants run in
turn, `--rounds` times (rounds interleave them, so drift in the machine's speed hits each alike), and the
report gives each variant's generated tokens per second (median over rounds) and its ratio to the first.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import statistics
import time
from typing import Any, Sequence

from tflow.errors import cli
from tflow.utils import provenance, write_json_atomic

log = logging.getLogger(__name__)


def run_variant(cfg: Any, method: Any, task: Any, problems: list) -> dict[str, float]:
    """Answer every problem in the evaluation path's batches; generated tokens, seconds, tokens/s."""
    from tflow.evaluate import batches_of

    t0, generated = time.perf_counter(), 0
    for chunk in batches_of(problems, cfg.eval, task):
        generated += sum(o.generated_tokens for o in method.answer(chunk, [task.prompt(p) for p in chunk]))
    seconds = time.perf_counter() - t0
    return {"generated_tokens": generated, "seconds": seconds, "tokens_per_second": generated / seconds}


@cli
def main(argv: Sequence[str] | None = None) -> None:
    from tflow.config import load_config
    from tflow.methods import build_method
    from tflow.tasks import get_task, subset

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", default=[], help="run-config YAML layer (repeatable)")
    ap.add_argument("--variant", action="append", required=True, metavar="'NAME: K=V ...'")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", required=True)
    ap.add_argument("overrides", nargs="*", help="key=value shared by every variant")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    variants = {name.strip(): shlex.split(rest) for name, _, rest in (v.partition(":") for v in args.variant)}
    base = load_config(args.config, [*args.overrides, "eval.method=single", "eval.task=gsm8k", "eval.do_sample=false"])
    task = get_task("gsm8k")
    problems = [dataclasses.replace(p, view=task.sender_view(p))
                for p in subset(task.load(base.data.data_dir, base.eval.source)[0], args.n, base.eval.subset_seed)]
    method, _ = build_method(base)
    method.prepare(problems)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for r in range(args.rounds):
        for name, over in variants.items():
            cfg = load_config(args.config, [*args.overrides, "eval.method=single", "eval.task=gsm8k",
                                            "eval.do_sample=false", *over])
            method.cfg = cfg  # same loaded model; the variant's eval settings (batching, cache)
            res = run_variant(cfg, method, task, problems)
            results[name].append(res)
            log.info("round %d %s: %.1f generated tokens/s (%d tokens, %.1f s)", r, name, res["tokens_per_second"],
                     res["generated_tokens"], res["seconds"])
    first = next(iter(variants))
    summary = {name: {"tokens_per_second_median": statistics.median(x["tokens_per_second"] for x in runs),
                      "rounds": runs, "overrides": variants[name]} for name, runs in results.items()}
    for name in summary:
        summary[name]["ratio_to_first"] = summary[name]["tokens_per_second_median"] / summary[first]["tokens_per_second_median"]
    write_json_atomic(args.out, {"problems": args.n, "variants": summary, "config": args.config,
                                 "overrides": args.overrides, "provenance": provenance()})
    for name, s in summary.items():
        print(f"{name}: {s['tokens_per_second_median']:.1f} generated tokens/s (x{s['ratio_to_first']:.2f})")


if __name__ == "__main__":
    main()
