"""create / start / kill / delete: the runtime spec's lifecycle, each a
separate short-lived process; what connects them is the state dir (state.py).

create clones PID 1 through the common executor (csrc/clone.c sbx_start with
an OciPlan) and returns once it waits on the exec fifo; start opens the fifo
for reading, which lets it exec the process. The CLI is never the container's
parent for long: like runc, the exit status belongs to whoever reaps it
(containerd's shim is a subreaper); `state` only says stopped.
"""
from __future__ import annotations

import os
import select
import signal
import socket
import time

from .. import _native_api as native
from . import hooks, mounts, plan
from .cgroup import Cgroups, resolve_path, wait_gone
from .exe import sealed
from .signals import signal_init
from .state import Container, OciError, load, new_dir, proc_start_time, remove_dir


def _write_pid_file(path: str | None, pid: int) -> None:
    if not path:
        return
    path = os.path.abspath(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(str(pid))
    os.rename(tmp, path)


def _read_all(fd: int) -> bytes:
    out = b""
    while chunk := os.read(fd, 4096):
        out += chunk
    return out


def _open_ns(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise OciError(f"namespace path {path}: {e.strerror}") from None


def create(root: str, cid: str, bundle: str | None, pid_file: str | None,
           console_socket: str | None) -> Container:
    bundle = os.path.abspath(bundle or os.getcwd())
    if not os.path.isdir(bundle):
        raise OciError(f"bundle {bundle} does not exist")
    cfg = plan.load_config(bundle)
    proc = plan.process(cfg.get("process"))
    linux = cfg.get("linux") or {}
    ns = plan.namespaces(linux)
    plan.validate(cfg, ns)
    rootfs = plan.rootfs_of(cfg, bundle)
    if proc.terminal and not console_socket:
        raise OciError("cannot allocate tty if runc will detach without setting console socket")
    if console_socket and not proc.terminal:
        raise OciError("cannot use console socket if runc will not detach or allocate tty")
    c = new_dir(root, cid)
    fds: list[int] = []
    cg = None
    pidfd = -1
    try:
        lock = c.lock()
        fds.append(lock)
        cg = Cgroups.create(resolve_path(linux.get("cgroupsPath"), cid), linux.get("resources"))
        c.data = {"ociVersion": cfg.get("ociVersion"), "id": cid, "pid": 0, "bundle": bundle,
                  "rootfs": rootfs, "annotations": cfg.get("annotations") or {},
                  "created": time.time(), "cgroups": cg.dirs,
                  "hooks": cfg.get("hooks") or {},
                  "caps": proc.caps[1] | proc.caps[2], "uid": proc.uid, "gid": proc.gid,
                  "groups": list(proc.groups), "env": proc.env, "cwd": proc.cwd}
        c.save()  # from here on `delete --force` finds the cgroup even if we die
        os.mkfifo(c.fifo, 0o622)
        os.chmod(c.fifo, 0o622)  # past the umask: a non-root process opens it to wait
        fifo = os.open(c.fifo, os.O_PATH | os.O_CLOEXEC)
        fds.append(fifo)
        ops = mounts.plan(cfg, bundle, rootfs, plan.cgroup_mount_ops(cg.dirs))
        joins, netns_fd = [], -1
        for t, path in ns.paths:
            fd = _open_ns(path)
            fds.append(fd)
            if t == plan.NS["network"]:
                netns_fd = fd
            elif t == plan.NS["pid"]:
                # pid_for_children: this process's next child is born there.
                native.setns(fd, t)
            else:
                joins.append((fd, t))
        oci = plan.oci_plan(cfg, proc, ns, joins, fifo)
        init_fd = sealed(native.INIT_PATH)
        fds.append(init_fd)
        console_fd = -1
        if console_socket:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(console_socket)
            except OSError as e:
                s.close()
                raise OciError(f"console socket {console_socket}: {e.strerror}") from None
            console_fd = s.detach()
            fds.append(console_fd)
        procs = cg.procs_fds()
        fds += procs
        pid, pidfd, errfd = native.start(
            netns_fd=netns_fd, cgroup_fd=-1, procs_fds=procs, hostname=cfg.get("hostname") or None,
            ops=ops, caps=0, init_fd=init_fd, init_argv=["sbx-init", "3", "@oci", "--", *proc.args],
            init_env=proc.env, stdio=(0, 1, 2), console_fd=console_fd, oci=oci)
        try:
            err = native.parse_error(_read_all(errfd))
        finally:
            os.close(errfd)
        if err is not None:
            raise OciError(f"container init: {err}")
        st = proc_start_time(pid)
        if st is None:
            raise OciError("container init exited during create")
        if proc.oom_score_adj is not None:
            with open(f"/proc/{pid}/oom_score_adj", "w") as f:
                f.write(str(proc.oom_score_adj))
        c.data.update(pid=pid, start_time=st[0])
        c.save()
        state = c.spec_state()
        hooks.run(cfg.get("hooks"), "prestart", state)
        hooks.run(cfg.get("hooks"), "createRuntime", state)
        hooks.run(cfg.get("hooks"), "createContainer", state)
        _write_pid_file(pid_file, pid)
    except BaseException:
        if pidfd >= 0:
            native.pidfd_signal(pidfd, signal.SIGKILL)
        if cg is not None:
            try:
                cg.kill_all()
                cg.remove()
            except (OSError, OciError):
                pass
        remove_dir(c)
        raise
    finally:
        if pidfd >= 0:
            os.close(pidfd)
        for fd in fds:
            os.close(fd)
    return c


def start(root: str, cid: str) -> None:
    c = load(root, cid)
    lock = c.lock()
    try:
        st = c.status()
        if st == "stopped":
            raise OciError("cannot start a container that has stopped")
        if st != "created":
            raise OciError("cannot start an already running container")
        pidfd = os.pidfd_open(c.pid)
        try:
            if not c.alive():
                raise OciError("cannot start a container that has stopped")
            fifo = os.open(c.fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                p = select.poll()
                p.register(fifo, select.POLLIN)
                p.register(pidfd, select.POLLIN)
                while True:
                    ready = dict(p.poll())
                    if fifo in ready and os.read(fifo, 1):
                        break
                    if ready:  # the init exited, or closed the fifo without its byte
                        raise OciError("container init exited before start")
            finally:
                os.close(fifo)
            os.unlink(c.fifo)
        finally:
            os.close(pidfd)
        hooks.run(c.data.get("hooks"), "poststart", c.spec_state(), fatal=False)
    finally:
        os.close(lock)


def destroy(c: Container) -> None:
    """Kill what runs, remove the cgroups, run poststop, remove the state."""
    cg = Cgroups(c.data.get("cgroups") or {})
    if c.alive():
        try:
            signal_init(c, signal.SIGKILL)
        except OciError:
            pass
        wait_gone([c.pid], time.monotonic() + 10)
    cg.kill_all()
    cg.remove()
    state = c.spec_state()
    state["status"] = "stopped"
    hooks.run(c.data.get("hooks"), "poststop", state, fatal=False)
    remove_dir(c)


def delete(root: str, cid: str, force: bool) -> None:
    try:
        c = load(root, cid)
    except OciError:
        if not force:
            raise
        # runc: --force on a missing container is no error; a dir a crashed
        # create left without state.json goes too.
        d = os.path.join(root, cid)
        if os.path.isdir(d):
            remove_dir(Container(root, cid, {}))
        return
    lock = c.lock()
    try:
        st = c.status()
        if st not in ("stopped", "created") and not force:
            raise OciError(f"cannot delete container {cid} that is not stopped: {st}")
        destroy(c)
    finally:
        os.close(lock)
