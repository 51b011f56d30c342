"""`exec`: a new process in a running container, through the same static
helper as the Python API's exec (csrc/exechelper.c, sbx-exec): it joins the
container's namespaces through a pidfd of its init and the cgroups, and forks
the process as our child (CLONE_PARENT), so we can wait for its exit code.

The helper confines the process as an API exec: the capability mask of the
container's process (effective|permitted), no_new_privs and the built-in
seccomp filter (not the config's profile: noted in the README).
"""
from __future__ import annotations

import json
import os
import select
import signal

from .. import _native_api as native
from .exe import sealed
from .lifecycle import _write_pid_file
from .plan import DEFAULT_PATH, caps_mask, process
from .state import OciError, load

# csrc/exechelper.c SBX_EXEC_OCI_CAPS: caps is the config's set, bounding included.
OCI_CAPS = 1 << 63


def _proc_spec(c, args, process_file, cwd, env, user):
    d = c.data
    if process_file:
        try:
            with open(process_file) as f:
                p = process(json.load(f))
        except (OSError, ValueError) as e:
            raise OciError(f"process file {process_file}: {e}") from None
        caps = p.caps[1] | p.caps[2]
        argv, envl, wd, uid, gid, groups = p.args, p.env, p.cwd, p.uid, p.gid, p.groups
        terminal = p.terminal
    else:
        if not args:
            raise OciError("exec: no command given (args or --process)")
        argv, envl, wd = list(args), list(d.get("env") or []), d.get("cwd") or "/"
        uid, gid, groups, caps = d.get("uid", 0), d.get("gid", 0), tuple(d.get("groups") or ()), d.get("caps", 0)
        terminal = False
        if user:
            u, _, g = user.partition(":")
            uid, gid = int(u), int(g) if g else 0
    if cwd:
        wd = cwd
    for e in env or ():
        k = e.split("=", 1)[0]
        envl = [x for x in envl if x.split("=", 1)[0] != k] + [e]
    path = next((e[5:] for e in envl if e.startswith("PATH=")), DEFAULT_PATH)
    return native.ProcSpec(argv=tuple(argv), env=tuple(envl), path=path, cwd=wd, uid=uid,
                           gid=gid, groups=tuple(groups)), caps, terminal


def run_exec(root: str, cid: str, args, *, process_file=None, cwd=None, env=None, user=None,
             detach=False, pid_file=None, tty=False, console_socket=None) -> int:
    c = load(root, cid)
    if c.status() not in ("running", "created"):
        raise OciError("cannot exec in a stopped container")
    proc, caps, terminal = _proc_spec(c, args, process_file, cwd, env, user)
    if tty or terminal:
        raise OciError("exec with a terminal is not supported by sandbox-oci yet")
    ns_pidfd = os.pidfd_open(c.pid)
    fds = [ns_pidfd]
    try:
        if not c.alive():
            raise OciError("cannot exec in a stopped container")
        items = (c.data.get("cgroups") or {}).items()
        # The memory cgroup last, joined by the process itself (exechelper.c).
        mem = [d for n, d in items if "memory" in n.split(",")]
        dirs = [d for d in dict.fromkeys(d for _, d in items) if d not in mem] + mem
        late = len(mem)
        procs = [os.open(os.path.join(d, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC) for d in dirs]
        fds += procs
        exe = sealed(native.EXEC_PATH)
        fds.append(exe)
        r, w = os.pipe2(os.O_CLOEXEC)
        fds.append(r)
        try:
            helper = native.spawn_exec(exe_fd=exe, ns_pidfd=ns_pidfd, procs_fds=procs, late=late,
                                       caps=caps | OCI_CAPS, proc=proc, stdio=(0, 1, 2),
                                       report_fd=w)
        finally:
            os.close(w)
        try:
            select.select([helper], [], [])
            native.pidfd_wait(helper)
        finally:
            os.close(helper)
        data = b""
        while chunk := os.read(r, 4096):
            data += chunk
    finally:
        for fd in fds:
            os.close(fd)
    size = native.ERR_RECORD.size
    pid, err = 0, None
    for i in range(0, len(data) - size + 1, size):
        p, e = native.parse_report(data[i:i + size])
        pid = pid or p
        err = err or e
    if err is not None:
        if pid:
            _reap(pid)
        raise OciError(f"exec failed: {err}")
    if not pid:
        raise OciError("exec failed: no process")
    _write_pid_file(pid_file, pid)
    if detach:
        return 0
    return _reap(pid)


def _reap(pid: int) -> int:
    # Forward the usual termination signals to the process, as runc does.
    def fwd(signo, _frame):
        try:
            os.kill(pid, signo)
        except ProcessLookupError:
            pass
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(s, fwd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
