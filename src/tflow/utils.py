"""Small shared helpers: atomic writes, provenance records, seeding (torch-free at import: the workflow
imports this module while it builds the DAG; torch is imported only by the helpers that need it)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Sequence

from tflow.errors import BusyError, CheckpointError

PROVENANCE_PACKAGES = ["torch", "transformers", "peft", "omegaconf", "gguf", "numpy", "tflow-repro"]


def default_file_mode() -> int:
    """The mode a plainly created file gets under the current umask (mkstemp's files are 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` (with the usual file mode) only if
    the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def torch_save_atomic(obj: Any, path: str | Path) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def torch_load(path: str | Path, what: str = "checkpoint") -> Any:
    """torch.load onto the CPU; a missing or unreadable (truncated, corrupt) file is a CheckpointError naming it."""
    import torch

    if not Path(path).is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError, ... by format and damage
        first = str(err).splitlines()[0] if str(err) else ""
        raise CheckpointError(f"{what} {path} cannot be read ({type(err).__name__}: {first}); it is truncated or "
                              "corrupt (an interrupted write or copy): delete it and write it again") from None


@contextlib.contextmanager
def folder_lock(folder: str | Path) -> Iterator[None]:
    """Hold `folder/.lock` exclusively for the block (fcntl.flock: the kernel drops it when the holder dies,
    however it dies) with the holder's PID inside; while another live process holds it, fail at once with a
    BusyError naming the folder and that PID. The file is removed on release."""
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, default_file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise BusyError(f"{folder} is in use by another run (PID {holder}, lock {path}); wait for it to finish, "
                            "or give this run another output folder") from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)  # a finishing holder removed that file after we opened it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):  # before unlocking: whoever opened this file meanwhile retries
            os.unlink(path)
        os.close(fd)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def git_commit() -> str:
    """The repository's HEAD commit (+ '-dirty' with uncommitted changes), or 'unknown'."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions(names: list[str] = PROVENANCE_PACKAGES) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def provenance(**extra: Any) -> dict[str, Any]:
    """What every result file records about how it was produced."""
    return {
        "git_commit": git_commit(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch_threads": _torch_threads(),
        **extra,
    }


def _torch_threads() -> int | None:
    torch = sys.modules.get("torch")  # only where torch is in use already
    return None if torch is None else torch.get_num_threads()


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def discard_stale(out: Path, names: Sequence[str], why: str) -> None:
    """Delete the named files/folders under `out` (results of another config), loudly: --restart-on-change."""
    import logging
    import shutil

    logging.getLogger("tflow").warning("%s: %s; --restart-on-change: discarding %s", out, why, list(names))
    for name in names:
        path = Path(out) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
