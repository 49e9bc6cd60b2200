"""Isolation of the sandbox process: namespaces, a minimal read-only root, and no privileges left.

`isolate` runs once in the sandbox process (trusted code, before any sample runs). Where the kernel allows it,
the process enters new mount, network, PID, IPC and UTS namespaces (as a normal user, inside a new user namespace),
sees only a read-only root made of the system libraries and this interpreter's folders (plus a private tmpfs
/tmp, a fresh /proc and five device nodes), and continues as PID 1 of its PID namespace while the starting
process only waits. As root it becomes nobody with no supplementary groups and then enters a user namespace of
its own. In every case it ends with no capabilities (bounding, ambient, inheritable, permitted, effective; a
normal user outside a user namespace cannot empty its bounding set, which no_new_privs makes moot), no new
privileges and not dumpable. Where namespaces are refused it drops privileges all the same; `isolate` returns
what it got, and the caller refuses to run samples when that is not enough. Limits for a normal user: its
supplementary groups stay (no user namespace can drop them), and without namespaces the sandbox can read what
that user can read.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import re
import resource
import sys
from pathlib import Path
from typing import Any

NOBODY = 65534
_NS = {"mnt": 0x20000, "uts": 0x04000000, "ipc": 0x08000000, "pid": 0x20000000, "net": 0x40000000}
_NEWUSER = 0x10000000
_RDONLY, _NOSUID, _NODEV, _NOEXEC, _REMOUNT, _BIND, _REC, _PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
_ST_TO_MS = ((2, _NOSUID), (4, _NODEV), (8, _NOEXEC), (1024, 1024), (2048, 2048), (4096, 1 << 21))  # statvfs -> mount
_STRICTATIME = 1 << 24
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache", "/etc/ld.so.conf",
          "/etc/ld.so.conf.d", "/etc/localtime")
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
_libc = ctypes.CDLL(None, use_errno=True)


def _ok(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _prctl(option: int, arg: int = 0) -> int:
    ul = ctypes.c_ulong
    return _libc.prctl(option, ul(arg), ul(0), ul(0), ul(0))


def _mount(src: str | None, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = (lambda s: None if s is None else s.encode())
    _ok(_libc.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {dst}")


def visible_paths() -> list[str]:
    """What the sandbox sees, read-only: system libraries, this interpreter's prefixes and its sys.path."""
    wanted = [*SYSTEM, sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix, *sys.path]
    out: list[str] = []
    for p in sorted({os.path.abspath(p) for p in wanted if p and os.path.lexists(p)}):
        if p == "/":
            raise OSError(f"refusing to show the whole file system to the sandbox ({p!r} is on sys.path)")
        if not any(p.startswith(q + "/") for q in out):
            out.append(p)
    return out


def _bind(src: str, dst: str, device: bool) -> None:
    """Bind src read-only at dst, keeping the flags a user namespace may not clear (device nodes: as they are)."""
    _mount(src, dst, None, _BIND)
    if not device:
        st = os.statvfs(dst).f_flag
        flags = _REMOUNT | _BIND | _RDONLY | _NOSUID | _NODEV | sum(ms for s, ms in _ST_TO_MS if st & s)
        _mount(None, dst, None, flags if st & (1024 | 4096) else flags | _STRICTATIME)


def _build_root(root: str, hide: list[str]) -> None:
    """A tmpfs at root holding the visible paths; folders on the way to them can be crossed, not listed; the
    folders in `hide` that fall inside a visible path are covered by an empty read-only tmpfs."""
    _mount("tmpfs", root, "tmpfs", _NOSUID | _NODEV, "mode=0755,size=4m")
    for d in ("proc", "tmp"):
        os.mkdir(f"{root}/{d}")
    _mount("tmpfs", f"{root}/tmp", "tmpfs", _NOSUID | _NODEV, "mode=1777,size=64m")
    made: list[str] = []
    for path in visible_paths() + [d for d in DEVICES if os.path.exists(d)]:
        dst = root + path
        for parent in reversed(list(Path(path).parents)[:-1]):
            if not os.path.isdir(f"{root}{parent}"):
                os.mkdir(f"{root}{parent}")
                made.append(f"{root}{parent}")
        if path in SYSTEM and os.path.islink(path):
            os.symlink(os.readlink(path), dst)
            continue
        if os.path.isdir(path):
            os.mkdir(dst)
        else:
            os.close(os.open(dst, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        _bind(path, dst, device=path in DEVICES)
    for d in made:
        os.chmod(d, 0o111)
    for h in hide:
        if os.path.isdir(root + os.path.abspath(h)):
            _mount("tmpfs", root + os.path.abspath(h), "tmpfs", _RDONLY | _NOSUID | _NODEV | _NOEXEC, "mode=0,size=4k")


def _enter_userns(flags: int) -> None:
    """unshare a new user namespace (plus flags) mapping only our own uid and gid onto themselves."""
    uid, gid = os.geteuid(), os.getegid()
    _prctl(4, 1)  # dumpable (setuid cleared it), or /proc/self/*_map stay root's; _drop_capabilities clears it
    _ok(_libc.unshare(_NEWUSER | flags), "unshare")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        fd = os.open(f"/proc/self/{name}", os.O_WRONLY)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)


def _become_pid1() -> None:
    """Fork into the new PID namespace; the process left outside only waits and exits with the child's status."""
    pid = os.fork()
    if pid:
        for fd in (0, 1):
            os.close(fd)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        os._exit(code if code >= 0 else 1)


def _pivot(root: str) -> None:
    _mount("proc", f"{root}/proc", "proc", _NOSUID | _NODEV | _NOEXEC)
    os.chdir(root)
    _ok(_libc.syscall(_PIVOT_ROOT[platform.machine()], b".", b"."), "pivot_root")
    _ok(_libc.umount2(b".", 2), "umount the old root")  # MNT_DETACH
    os.chdir("/")
    _mount(None, "/", None, _REMOUNT | _BIND | _RDONLY | _NOSUID | _NODEV)


def _drop_bounding() -> None:
    """Empty the bounding set (refused without CAP_SETPCAP; the report shows what is left)."""
    try:
        last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        last = 63
    for cap in range(last + 1):
        _prctl(24, cap)  # PR_CAPBSET_DROP


def _drop_capabilities() -> None:
    """Empty the bounding and ambient sets, then inheritable/permitted/effective; no new privileges, not dumpable."""
    _drop_bounding()
    _prctl(47, 4)  # PR_CAP_AMBIENT, CLEAR_ALL
    _ok(_libc.capset((ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()), "capset")
    _ok(_prctl(38, 1), "no_new_privs")
    _ok(_prctl(4, 0), "dumpable")


def _threads_of(uid: int) -> int:
    n = 0
    for d in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            s = (d / "status").read_text() if d.name.isdigit() else ""
            n += int(re.search(r"\nThreads:\s+(\d+)", s)[1]) if f"\nUid:\t{uid}\t" in s else 0
    return n


def isolate(tmp: str, nproc: int, hide: list[str], namespaces: bool = True) -> dict[str, Any]:
    """Isolate this process as far as the kernel allows (see the module doc; namespaces=False: as if it allowed
    none); the namespaces obtained.
    RLIMIT_NPROC: the sample user's tasks on the host plus nproc (seccomp refuses fork: this is a second wall)."""
    root_user = os.geteuid() == 0
    nproc_limit = (_threads_of(NOBODY if root_user else os.geteuid()) + nproc,) * 2
    if not root_user:
        resource.setrlimit(resource.RLIMIT_NPROC, nproc_limit)
    got: list[str] = []
    try:
        if namespaces:
            _ok(_libc.unshare(sum(_NS.values())), "unshare") if root_user else _enter_userns(sum(_NS.values()))
            got = list(_NS) + ([] if root_user else ["user"])
    except OSError:
        pass
    if got:
        os.mkdir(f"{tmp}/root")
        _mount(None, "/", None, _REC | _PRIVATE)
        _build_root(f"{tmp}/root", hide)
        _become_pid1()
        _pivot(f"{tmp}/root")
    if root_user:
        _drop_bounding()
        if not got:
            os.chown(tmp, NOBODY, NOBODY)
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
        resource.setrlimit(resource.RLIMIT_NPROC, nproc_limit)
        if got:
            with contextlib.suppress(OSError):
                _enter_userns(0)
                got.append("user")
    _drop_capabilities()
    return {"namespaces": sorted(got), "root": "minimal" if got else "host"}


def credentials() -> dict[str, Any]:
    """uid, gid, supplementary groups, capability sets and no_new_privs, as the kernel reports them."""
    status = dict(line.split(":\t", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":\t" in line)
    caps = {k: int(status[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
    return {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "caps": caps,
            "no_new_privs": int(status.get("NoNewPrivs", "0").strip())}
