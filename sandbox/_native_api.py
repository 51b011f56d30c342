"""The only importer of sandbox._native: marshals frozen Python plans into C
structs, and turns -errno into typed exceptions."""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Sequence

from .errors import ExecError, NativeError, SandboxError

try:
    from . import _native
except ImportError as e:  # pragma: no cover - depends on the build
    raise SandboxError(f"sandbox._native is not built ({e}); rebuild: pip install -e .") from e

ffi, lib = _native.ffi, _native.lib
ABI_VERSION = 4
if lib.sbx_abi_version() != ABI_VERSION:  # pragma: no cover
    raise SandboxError(f"sandbox._native ABI {lib.sbx_abi_version()} != {ABI_VERSION}; "
                       "rebuild: pip install -e .")

# Mirrors enum sbx_step in csrc/sbx.h, in order.
STEPS = ["none", "clone", "join_netns", "loopback", "join_cgroup", "cgroupns", "propagation",
         "mount", "pivot_root", "hostname", "stdio", "capabilities", "no_new_privs",
         "close_fds", "chdir", "setgroups", "setgid", "setuid", "seccomp", "execve", "setns",
         "fork", "init"]
ERR_RECORD = struct.Struct("iii244s")

OP_MOUNT, OP_MKDIR, OP_FILE, OP_SYMLINK, OP_PIVOT, OP_UMOUNT = 1, 2, 3, 4, 5, 6
OP_ROOT, OP_MKNOD = 7, 8
# MountOp.at bits (enum sbx_mount_at): which paths resolve confined to the root.
AT_DST_IN_ROOT, AT_SRC_IN_ROOT, AT_REPLACE = 1, 2, 4
AT_KEEP = 8  # OCI block: keep what is there (sandbox/oci mount points)
INIT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sbx-init")
EXEC_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sbx-exec")


def check(ret: int, step: str, detail: str = "") -> int:
    if ret < 0:
        raise NativeError(-ret, step, detail)
    return ret


def parse_error(data: bytes) -> ExecError | None:
    """The child's error record, or None when the pipe closed clean (execve ran)."""
    if len(data) < ERR_RECORD.size:
        return None
    step, err, index, detail = ERR_RECORD.unpack(data[:ERR_RECORD.size])
    name = STEPS[step] if 0 <= step < len(STEPS) else f"step{step}"
    return ExecError(err, name, detail.split(b"\0", 1)[0].decode(errors="replace"))


@dataclass(frozen=True)
class MountOp:
    kind: int
    dst: str
    src: str | None = None
    fstype: str | None = None
    flags: int = 0
    data: bytes | str | None = None
    mode: int = 0
    at: int = 0


@dataclass(frozen=True)
class ProcSpec:
    argv: tuple[str, ...]
    env: tuple[str, ...]
    path: str
    cwd: str
    uid: int
    gid: int
    groups: tuple[int, ...]


class _Keep:
    """Keeps cffi allocations alive for the duration of one call."""

    def __init__(self):
        self.objs: list = []

    def s(self, v: str | bytes | None):
        if v is None:
            return ffi.NULL
        b = v.encode() if isinstance(v, str) else v
        o = ffi.new("char[]", b)
        self.objs.append(o)
        return o

    def argv(self, items: Sequence[str]):
        arr = ffi.new("char *[]", len(items) + 1)
        self.objs.append(arr)
        for i, it in enumerate(items):
            arr[i] = self.s(it)
        arr[len(items)] = ffi.NULL
        return arr

    def ints(self, vals: Sequence[int], ctype: str = "int[]"):
        arr = ffi.new(ctype, list(vals) or [0])
        self.objs.append(arr)
        return arr


def _fill_ops(keep: _Keep, ops: Sequence[MountOp]):
    arr = ffi.new("struct sbx_mount_op[]", max(len(ops), 1))
    keep.objs.append(arr)
    for i, op in enumerate(ops):
        c = arr[i]
        c.kind = op.kind
        c.src = keep.s(op.src)
        c.dst = keep.s(op.dst)
        c.fstype = keep.s(op.fstype)
        c.flags = op.flags
        data = op.data.encode() if isinstance(op.data, str) else op.data
        c.data = keep.s(data)
        c.len = len(data) if data else 0
        c.mode = op.mode
        c.at = op.at
    return arr


@dataclass(frozen=True)
class OciPlan:
    """struct sbx_oci (csrc/sbx.h, OCI block): what a config.json decides
    about PID 1 beyond the common plan. Built by sandbox/oci/plan.py."""
    clone_ns: int
    joins: tuple[tuple[int, int], ...] = ()     # (fd, CLONE_NEW* type), setns'd in order
    domainname: str | None = None
    rlimits: tuple[tuple[int, int, int], ...] = ()  # (RLIMIT_*, soft, hard)
    sysctl: tuple[tuple[str, str], ...] = ()    # ("/proc/sys/...", value)
    uid: int = 0
    gid: int = 0
    groups: tuple[int, ...] = ()
    umask: int = -1
    caps: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)  # bounding, eff, perm, inh, amb
    no_new_privs: bool = False
    seccomp: bytes | None = None                # struct sock_filter[] as bytes
    cwd: str = "/"
    keep_fd: int = -1


def _fill_oci(k: _Keep, o: OciPlan):
    c = ffi.new("struct sbx_oci *")
    k.objs.append(c)
    c.clone_ns = o.clone_ns
    c.join_fds = k.ints([fd for fd, _ in o.joins])
    c.join_types = k.ints([t for _, t in o.joins])
    c.njoin = len(o.joins)
    c.domainname = k.s(o.domainname)
    c.rlimit_types = k.ints([r[0] for r in o.rlimits])
    c.rlimit_vals = k.ints([v for r in o.rlimits for v in r[1:]], "uint64_t[]")
    c.nrlimits = len(o.rlimits)
    c.sysctl_paths = k.argv([p for p, _ in o.sysctl])
    c.sysctl_vals = k.argv([v for _, v in o.sysctl])
    c.nsysctl = len(o.sysctl)
    c.uid, c.gid = o.uid, o.gid
    c.groups = k.ints(o.groups, "unsigned int[]")
    c.ngroups = len(o.groups)
    c.umask = o.umask
    (c.caps_bounding, c.caps_effective, c.caps_permitted, c.caps_inheritable,
     c.caps_ambient) = o.caps
    c.no_new_privs = 1 if o.no_new_privs else 0
    if o.seccomp:
        buf = ffi.new("char[]", o.seccomp)
        k.objs.append(buf)
        c.seccomp = buf
        c.seccomp_len = len(o.seccomp) // 8
    c.cwd = k.s(o.cwd)
    c.keep_fd = o.keep_fd
    return c


def start(*, netns_fd: int, cgroup_fd: int, procs_fds: Sequence[int], hostname: str,
          ops: Sequence[MountOp], caps: int, init_fd: int, init_argv: Sequence[str],
          init_env: Sequence[str], stdio: tuple[int, int, int],
          console_fd: int = -1, oci: "OciPlan | None" = None) -> tuple[int, int, int]:
    """Clones PID 1. Returns (pid, pidfd, errfd). With console_fd (a unix
    socket) the child sends the master of its console pty over it; stdio is
    then unused."""
    k = _Keep()
    s = ffi.new("struct sbx_start *")
    s.netns_fd = netns_fd
    s.cgroup_fd = cgroup_fd
    s.procs_fds = k.ints(procs_fds)
    s.nprocs = len(procs_fds)
    s.hostname = k.s(hostname)
    s.ops = _fill_ops(k, ops)
    s.nops = len(ops)
    s.caps = caps
    s.init_fd = init_fd
    s.init_argv = k.argv(init_argv)
    s.init_envp = k.argv(init_env)
    s.stdin_fd, s.stdout_fd, s.stderr_fd = stdio
    s.console_fd = console_fd
    if oci is not None:
        s.oci = _fill_oci(k, oci)
    pidfd = ffi.new("int *", -1)
    errfd = ffi.new("int *", -1)
    pid = check(lib.sbx_start(s, pidfd, errfd), "clone")
    return pid, pidfd[0], errfd[0]


def exec_argv(proc: ProcSpec, caps: int, nprocs: int, late: int) -> list[str]:
    """The sbx-exec helper's plan, as its argv (csrc/exechelper.c): the kernel
    copies it into the helper's own address space at execve."""
    return ["sbx-exec", str(nprocs), str(late), str(caps), str(proc.uid), str(proc.gid), proc.cwd,
            proc.path, str(len(proc.groups)), *map(str, proc.groups), "--", *proc.argv]


def spawn_exec(*, exe_fd: int, ns_pidfd: int, procs_fds: Sequence[int], late: int, caps: int,
               proc: ProcSpec, stdio: tuple[int, int, int], report_fd: int) -> int:
    """vfork-execs the sbx-exec helper (exe_fd), which joins the sandbox of
    ns_pidfd and forks the process as our child. Returns the helper's pidfd
    (the caller reaps it); the process's pid and any failure arrive on
    report_fd's pipe (parse_report). The process itself joins the last `late`
    procs_fds (the memory cgroup), the helper the others."""
    k = _Keep()
    fds = [*stdio, report_fd, ns_pidfd, *procs_fds]
    pidfd = ffi.new("int *", -1)
    argv = k.argv(exec_argv(proc, caps, len(procs_fds), late))
    r = lib.sbx_spawn(exe_fd, argv, k.argv(proc.env), k.ints(fds), len(fds), pidfd)
    if r < 0:
        raise ExecError(-r, "fork", "sbx-exec")
    return pidfd[0]


def parse_report(record: bytes) -> tuple[int, ExecError | None]:
    """One record of sbx-exec's report: (host pid, None) when the process
    was created, (0, error) for a failed step."""
    step, err, index, _ = ERR_RECORD.unpack(record[:ERR_RECORD.size])
    if step == 0:
        return (index if index > 0 else 0), None
    return 0, parse_error(record)


def set_dumpable(on: bool) -> int:
    return check(lib.sbx_set_dumpable(1 if on else 0), "prctl")


def pidfd_signal(pidfd: int, sig: int) -> bool:
    """False when the process is already gone (ESRCH)."""
    r = lib.sbx_pidfd_signal(pidfd, sig)
    if r == -3:  # ESRCH
        return False
    check(r, "pidfd_send_signal")
    return True


def pidfd_wait(pidfd: int) -> int | None:
    code = ffi.new("int *")
    r = lib.sbx_pidfd_wait(pidfd, code)
    if r == -11:  # EAGAIN: still running
        return None
    check(r, "waitid")
    return code[0]


def open_in_root(rootfd: int, path: str, flags: int, resolve: int = 0) -> int:
    """openat2(rootfd, path) confined to rootfd (RESOLVE_IN_ROOT |
    RESOLVE_NO_MAGICLINKS | resolve); a CLOEXEC fd, or OSError."""
    r = lib.sbx_open_in_root(rootfd, os.fsencode(path), flags, resolve)
    if r < 0:
        raise OSError(-r, os.strerror(-r), path)
    return r


def setns(fd: int, nstype: int) -> None:
    check(lib.sbx_setns(fd, nstype), "setns")


def unshare(flags: int) -> None:
    check(lib.sbx_unshare(flags), "unshare")
