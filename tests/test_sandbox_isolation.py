"""What a program in the code sandbox sees: each isolation layer checked from inside, one program, one runner."""
from __future__ import annotations

import os
import platform
import struct
import sys
from pathlib import Path

import pytest

from tflow.tasks.plain import loads_plain
from tflow.tasks.sandbox import UNAVAILABLE, Runner, Sandbox

pytestmark = pytest.mark.skipif(not (sys.platform == "linux" and platform.machine() == "x86_64"),
                                reason="the code sandbox's seccomp filter is written for Linux x86_64")
PROBE = '''import io, os
def f(hidden, visible):
    def attempt(fn):
        try:
            return fn()
        except Exception as err:
            return type(err).__name__
    status = io.open("/proc/self/status").read().splitlines()
    return {
        "list_root": attempt(lambda: os.listdir("/root")),
        "shadow": attempt(lambda: io.open("/etc/shadow", "rb").read()),
        "processes": len([p for p in os.listdir("/proc") if p.isdigit()]),
        "interfaces": sorted(ln.split(":")[0].strip() for ln in io.open("/proc/net/dev").read().splitlines()[2:]),
        "uid": os.getuid(),
        "status": sorted(ln for ln in status if ln.split(":")[0] in ("CapInh", "CapPrm", "CapEff", "CapBnd",
                                                                     "CapAmb", "NoNewPrivs", "Seccomp")),
        "write_tmp": attempt(lambda: io.open("/tmp/x", "w")),
        "hidden": attempt(lambda: os.listdir(hidden)),
        "visible": attempt(lambda: io.open(visible).read()),
    }
'''


def run_probe(runner: Runner, *args: str) -> dict:
    chunks: list[bytes] = []

    def feed(chunk: bytes) -> tuple[bool, int]:
        chunks.append(chunk)
        return False, 0  # a small output: nothing for the check to wait for

    request = {"code": PROBE, "entry_point": "f", "inputs": [list(args)], "limits": [5.0], "not_none": False}
    end = runner.run(request, 10, feed)
    stream = b"".join(chunks)
    assert not (end["killed"] or end["stopped"] or end["overflow"]), end
    assert stream[:19] == b"r" + bytes(8) + b"x" + bytes(8) + b"o", stream[:40]  # ready, loaded, one output
    return loads_plain(stream[27:])


def test_sandbox_sees_only_its_own_world(tmp_path, monkeypatch):
    """No /root, no shadow file, no other process, loopback only, no capabilities, seccomp on, no writes even in
    /tmp, and a hidden folder inside a visible one stays empty while its sibling file is readable."""
    visible = tmp_path / "visible"
    (visible / "gt").mkdir(parents=True)
    (visible / "gt" / "task.gt").write_text("expected outputs")
    (visible / "note.txt").write_text("fine to read")
    for p in (visible, visible / "gt"):
        p.chmod(0o755)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(visible)])))

    def probe_with(hide: list) -> dict:
        runner = Runner(Sandbox(), hide=hide)
        try:
            assert runner.hello["refused"] is None, runner.hello
            return run_probe(runner, str(visible / "gt"), str(visible / "note.txt"))
        finally:
            runner.close()

    seen = probe_with([visible / "gt"])
    assert probe_with([])["hidden"] == ["task.gt"]  # control: not hidden, the folder shows its file
    assert seen["list_root"] in ("PermissionError", "FileNotFoundError")  # crossable only if python lives there
    assert seen["shadow"] == "FileNotFoundError"
    assert seen["processes"] == 2 and seen["interfaces"] == ["lo"]  # the runner (PID 1) and this process
    assert seen["status"] == ["CapAmb:\t0000000000000000", "CapBnd:\t0000000000000000", "CapEff:\t0000000000000000",
                              "CapInh:\t0000000000000000", "CapPrm:\t0000000000000000", "NoNewPrivs:\t1", "Seccomp:\t2"]
    assert seen["write_tmp"] == "PermissionError" and seen["hidden"] == "PermissionError"
    assert seen["visible"] == "fine to read"
    assert seen["uid"] == (65534 if os.geteuid() == 0 else os.geteuid())


def test_root_without_namespaces_drops_to_nobody_or_refuses():
    """Without namespaces root still becomes nobody with nothing left, and refuses every sample when nobody cannot
    read this interpreter's library (here: it lives under /root, 0700)."""
    if os.geteuid() != 0:
        pytest.skip("as root only")
    runner = Runner(Sandbox(namespaces=False))
    runner.close()
    hello = runner.hello
    assert hello["namespaces"] == [] and hello["uid"] == 65534 and not any(hello["caps"].values())
    stdlib = Path(os.__file__).resolve().parent
    others_read = stdlib.stat().st_mode & 0o004 and all(p.stat().st_mode & 0o001 for p in [stdlib, *stdlib.parents])
    assert hello["refused"] == (None if others_read else UNAVAILABLE[2])
