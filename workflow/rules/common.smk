# Helper functions of the workflow (the only place for Python functions, by convention).
import os
import shlex


def run_dir():
    return f"results/runs/{config['run_name']}"


def overrides(*extra):
    """key=value arguments for the package's entry points (config overrides + rule-specific)."""
    return " ".join(shlex.quote(o) for o in [*config.get("overrides", []), *extra])


def config_args():
    return " ".join(f"--config {shlex.quote(p)}" for p in config["run_config"])


def kernel_bench_csvs():
    """The committed kernel benchmark CSVs (CPU always; CUDA where one was measured)."""
    found = [f"results/reference/bench_kernels_{d}.csv" for d in ("cpu", "cuda")
             if os.path.exists(f"results/reference/bench_kernels_{d}.csv")]
    return found or ["results/reference/bench_kernels_cpu.csv"]
