"""The Snakemake workflow: lint clean, schema-validated config, expected DAG."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _snakemake(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_lint_is_clean():
    res = _snakemake("--lint")
    assert res.returncode == 0 and "Congratulations" in res.stdout + res.stderr, res.stdout + res.stderr


def test_dry_run_dag_shape(tmp_path):
    res = _snakemake("-n", "--quiet", "rules", "--directory", str(tmp_path), "--snakefile", str(ROOT / "Snakefile"),
                     "--configfile", str(ROOT / "config" / "config.yaml"),
                     "--config", f"run_config=[{ROOT / 'config/run/cpu.yaml'},{ROOT / 'config/run/quickstart.yaml'}]")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    counts = {line.split()[0]: int(line.split()[1]) for line in out.splitlines()
              if len(line.split()) == 2 and line.split()[1].isdigit()}
    assert counts == {"train_generator": 1, "heldout_loss": 1, "gsm8k_quickstart": 1, "all": 1, "total": 4}, out


def test_config_schema_rejects_unknown_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "config" / "config.yaml").read_text() + "heldout_problemz: 3\n")
    res = _snakemake("-n", "--configfile", str(bad))
    assert res.returncode != 0 and "heldout_problemz" in res.stdout + res.stderr
