"""Entry points fail early and clearly on bad input (exit status 2, no traceback)."""
import subprocess
import sys


def _run(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120)


def test_infer_without_a_checkpoint_is_an_error(tmp_path):
    res = _run("tflow.infer", "--checkpoint", str(tmp_path / "missing.pt"), "--question", "What is 2+2?")
    assert res.returncode == 2
    assert "not found" in res.stderr and "untrained" in res.stderr and "Traceback" not in res.stderr


def test_train_config_typo_fails_before_compute(tmp_path):
    res = _run("tflow.train", "--config", "config/run/cpu.yaml", "train.stesp=3", f"train.out_dir={tmp_path}")
    assert res.returncode == 2 and "train.stesp" in res.stderr and "Traceback" not in res.stderr
    assert not any(tmp_path.iterdir())  # nothing written
