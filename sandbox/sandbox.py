"""Sandbox: one isolated Linux environment, the low-level API (SPEC §3)."""
from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import secrets
import signal as _signal
import socket
import time
from typing import TYPE_CHECKING, Any

from . import _native_api as native
from .config import DEFAULT_PATH, check_cmd, check_env, check_exec, check_port, check_signal
from .errors import ContainerError, ContainerExitError, ExecError, SandboxError, SandboxNotRunning
from .log import get_logger
from .logs import DEFAULT_LIMIT as DEFAULT_LOG_LIMIT, LogCapture
from .outbound import OutboundMixin
from .proxy.policy import Policy
from .pidfd import Pidfd, exec_report, read_error_pipe
from .process import ExecProcess, feed_stdin, open_reader, open_writer
from .security import DEFAULT_CAP_MASK
from .users import Identity, resolve

if TYPE_CHECKING:  # pragma: no cover
    from .runtime import Runtime

log = get_logger("sandbox")

# A state table: which transitions each public operation may make.
CREATED, RUNNING, STOPPED = "created", "running", "stopped"


def _kill_abandoned(job: asyncio.Future) -> None:
    """An exec whose caller went away: the process it started (if any) is
    killed; its watcher reaps it."""
    if job.cancelled() or job.exception() is not None:
        return
    watcher = job.result().watcher
    if watcher is not None:
        watcher.signal(_signal.SIGKILL)


class Sandbox(OutboundMixin):
    # Images (SPEC §11): the reference given to rt.sandbox(image=), and the
    # Image it resolved to at start (its config gives the defaults).
    _image_ref = None
    _image = None

    def __init__(self, runtime: "Runtime", name: str, *, rootfs: str | None, limits: Any,
                 log_limit: int = DEFAULT_LOG_LIMIT):
        self._rt = runtime
        self._name = name
        self._id = secrets.token_hex(8)
        self._rootfs = rootfs
        self._limits = limits
        self._state = CREATED
        self._pidfd: Pidfd | None = None
        self._pid = 0
        self._env: dict[str, str] = {}
        self._res = None                 # runtime-owned kernel resources (netns, cgroup)
        self._outcome: asyncio.Future | None = None
        self._destroy_msg: str | None = None
        self._destroying = False
        self._cleanup_task: asyncio.Task | None = None
        # Pipe readers of exited execs still draining what descendants write
        # (SPEC §10 "Output and descendants"); closed when the sandbox stops.
        self._drains: set = set()
        # exec() followers still running (their caller may have gone away).
        self._exec_jobs: set = set()
        self._logs = LogCapture(log_limit)
        self._lock = asyncio.Lock()
        self.enable_internet = True
        self._oom = False
        # Read by the proxy for every request (SandboxView): publish a new
        # frozen Policy to change behaviour; never mutate one.
        self.policy = Policy()
        self.ca = None

    # -- read-only facts (SPEC §3: assigning raises AttributeError) ------
    @property
    def id(self) -> str:
        return self._id

    @property
    def name(self) -> str:
        return self._name

    @property
    def state(self) -> str:
        return self._state

    @property
    def running(self) -> bool:
        return self._state == RUNNING

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def sandbox_id(self) -> str:
        return self.id

    @property
    def address(self) -> str | None:
        """The sandbox's IPv4 address on its veth (None when not running)."""
        res = self._res
        return res.net.address if res is not None and res.net is not None else None

    def __repr__(self) -> str:
        return f"<Sandbox {self.name} id={self.id} {self._state} pid={self._pid}>"

    def _outcome_future(self) -> asyncio.Future:
        if self._outcome is None:
            self._outcome = asyncio.get_running_loop().create_future()
        return self._outcome

    # -- console (a pty of the sandbox's own, as `docker run -t`) -----------
    _console_fd = -1

    @property
    def console_fd(self) -> int | None:
        """The master of the entrypoint's terminal after `start(console=True)`,
        else None. Owned by the Sandbox: it is closed when the sandbox's
        resources are released (right after it stops, or on destroy) — os.dup()
        it to keep reading the last output past the exit."""
        return self._console_fd if self._console_fd >= 0 else None

    def _close_console(self, fd: int) -> None:
        if self._console_fd == fd:
            self._console_fd = -1
        os.close(fd)

    # -- lifecycle ---------------------------------------------------------
    async def start(self, env=None, entrypoint=None, enable_internet: bool = True, *,
                    cwd: str | None = None, user: str | int | None = None,
                    stdio: tuple[int, int, int] | None = None, console: bool = False) -> None:
        """`console=True` (an extra of this runtime, not in the contract): the
        entrypoint runs on a new pty — its stdin/stdout/stderr and controlling
        terminal, in a session of its own — whose master is `console_fd`."""
        env = check_env(env)
        entry = check_cmd(entrypoint, "entrypoint") if entrypoint is not None else None
        if not isinstance(enable_internet, bool):
            raise TypeError("enable_internet must be a bool")
        if not isinstance(console, bool):
            raise TypeError("console must be a bool")
        if console and stdio is not None:
            raise ValueError("console and stdio exclude each other")
        if cwd is not None and (not isinstance(cwd, str) or "\0" in cwd):
            raise ValueError("cwd must be a str without NUL")
        async with self._lock:
            if self._state == RUNNING:
                raise SandboxError(f"sandbox {self.name} is already running")
            if self._destroying:
                raise SandboxError(f"sandbox {self.name} was destroyed")
            if self._cleanup_task is not None:
                await self._cleanup_task
            t0 = time.perf_counter()
            if self._image_ref is not None:
                # Pulled if needed; ImageError before the sandbox has any state.
                self._image = img = await self._rt._image_for(self)
                env = {**img.config.environment, **env}
                entry = entry if entry is not None else img.config.command
                cwd = cwd if cwd is not None else img.config.working_dir
                user = user if user is not None else img.config.user
            self._env = env
            self.enable_internet = enable_internet
            self._publish(enable_internet=enable_internet)
            self._oom = False
            if self._outcome is None or self._outcome.done():
                self._outcome = asyncio.get_running_loop().create_future()
            self._res = await self._rt._acquire(self, enable_internet)
            try:
                if console:
                    await self._spawn_console(entry, cwd, user)
                else:
                    await self._spawn(entry, cwd, user, stdio)
            except BaseException:
                # (None when PID 1 already ran and its exit released them)
                res, self._res = self._res, None
                if res is not None:
                    await self._rt._release(self, res)
                raise
            self._state = RUNNING
            log.debug("sandbox.start", sandbox=self.name, id=self.id, step="start", pid=self._pid,
                      ms=round((time.perf_counter() - t0) * 1000, 2))

    async def _spawn_console(self, entry, cwd, user) -> None:
        """_spawn with a console: the C child makes the pty on the sandbox's
        devpts and sends its master over a socket pair before it execs
        sbx-init, so once start succeeded the master is already queued."""
        sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            try:
                null = self._rt._devnull
                await self._spawn(entry, cwd, user, (null, null, null), console_fd=child.fileno())
            finally:
                child.close()
            try:
                _, fds, _, _ = socket.recv_fds(sock, 1, 1, socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
                for extra in fds[1:]:
                    os.close(extra)
                if not fds:
                    raise SandboxError(f"sandbox {self.name}: no console from its init")
            except BaseException as e:
                watcher = self._pidfd
                if watcher is not None:
                    watcher.signal(_signal.SIGKILL)
                    await asyncio.shield(watcher.exited)
                if isinstance(e, OSError):
                    raise SandboxError(f"sandbox {self.name}: no console from its init ({e})") from e
                raise
        finally:
            sock.close()
        fd = self._console_fd = fds[0]
        self._res.closers.append(lambda: self._close_console(fd))

    async def _spawn(self, entry, cwd, user, stdio, console_fd: int = -1) -> None:
        rt, res = self._rt, self._res
        if entry is not None:
            ident = self._who(user, self._rt._etc_users(self._rootfs, self._image))
            init_argv = ["sbx-init", "3", str(ident.uid), str(ident.gid), cwd or "/",
                         self._path(self._env), str(len(ident.groups)),
                         *map(str, ident.groups), "--", *entry]
            init_env = self._envlist(ident, {})
        else:
            init_argv, init_env = ["sbx-init", "3", "-"], []
        plan = rt._plan(self, res)
        devnull = rt._devnull
        log_w: tuple[int, ...] = ()
        if stdio is None:
            # API sandboxes: the entrypoint's output goes to its own log ring
            # (SPEC §10 "Entrypoint logs"), never to the runtime's stdio.
            if entry is not None:
                log_w = self._logs.open_pipes()
                stdio = (devnull, *log_w)
            else:
                stdio = (devnull, devnull, devnull)
        try:
            pid, pidfd, errfd = native.start(
                netns_fd=res.netns_fd, cgroup_fd=res.cgroup_fd,
                procs_fds=() if res.cgroup_fd >= 0 else res.procs_fds,
                hostname=self.name[:64], ops=plan, caps=DEFAULT_CAP_MASK, init_fd=rt._init_fd,
                init_argv=init_argv, init_env=init_env, stdio=stdio, console_fd=console_fd)
        except BaseException:
            self._logs.close()
            raise
        finally:
            for w in log_w:
                os.close(w)
        watcher = Pidfd(pidfd)
        try:
            err = native.parse_error(await read_error_pipe(errfd))
        except BaseException:
            watcher.signal(_signal.SIGKILL)
            await asyncio.shield(watcher.exited)
            self._logs.close()
            raise
        if err is not None:
            watcher.signal(_signal.SIGKILL)
            await watcher.exited
            self._logs.close()
            raise err
        self._pid = pid
        self._pidfd = watcher
        watcher.exited.add_done_callback(self._on_exit)

    def _path(self, *envs: dict) -> str:
        for e in reversed(envs):
            if "PATH" in e:
                return e["PATH"]
        return self._env.get("PATH", DEFAULT_PATH)

    def _envlist(self, ident: Identity, extra: dict) -> list[str]:
        env = {"PATH": DEFAULT_PATH, "HOME": ident.home, "HOSTNAME": self.name[:64]}
        env.update(self._env)
        env.update(extra)
        return [f"{k}={v}" for k, v in env.items()]

    def _on_exit(self, fut: asyncio.Future) -> None:
        code = fut.result() if not fut.cancelled() else 137
        self._state = STOPPED
        self._pidfd = None
        # Every process of the PID namespace died with its init: nothing is
        # left to drain.
        for r in list(self._drains):
            r.close()
        self._logs.finish()
        outcome = self._outcome_future()
        if not outcome.done():
            outcome.set_result((code, self._destroying, self._destroy_msg))
        log.debug("sandbox.exit", sandbox=self.name, step="exit", exit_code=code)
        res, self._res = self._res, None
        if code == 137 and res is not None and res.cgroup is not None:
            try:
                self._oom = res.cgroup.oom_killed()
            except OSError:
                pass
        if res is not None:
            self._cleanup_task = asyncio.ensure_future(self._rt._release(self, res))

    async def destroy(self, error: str | None = None) -> None:
        if error is not None and not isinstance(error, (str, BaseException)):
            raise TypeError("error must be a str")
        t0 = time.perf_counter()
        if not self._destroying:
            self._destroying = True
            self._destroy_msg = str(error) if error is not None else None
        pidfd = self._pidfd
        if pidfd is not None:
            pidfd.signal(_signal.SIGKILL)
            await asyncio.shield(pidfd.exited)
        if self._exec_jobs:
            # With PID 1 gone each ends at once (nothing left to wait for):
            # every helper and process of an abandoned exec is reaped.
            await asyncio.shield(asyncio.gather(*self._exec_jobs, return_exceptions=True))
        if self._cleanup_task is not None:
            await asyncio.shield(self._cleanup_task)
        elif self._res is not None:  # never started fully
            res, self._res = self._res, None
            await self._rt._release(self, res)
        if self._state == CREATED:
            self._state = STOPPED
            out = self._outcome_future()
            if not out.done():
                out.set_result((0, True, self._destroy_msg))
        # Its handler names stop resolving; the policy keeps no routes, so a
        # second destroy releases nothing twice.
        self._publish(routes=(), class_routes=())
        self._rt._forget(self)
        log.debug("sandbox.destroy", sandbox=self.name, step="destroy",
                  ms=round((time.perf_counter() - t0) * 1000, 2))

    async def monitor(self) -> None:
        code, destroyed, msg = await asyncio.shield(self._outcome_future())
        if destroyed:
            if msg is not None:
                raise ContainerError(msg)
            return None
        if code != 0:
            if self._oom:
                mem = self._limits.memory
                raise ContainerExitError(code, f"container exited with code {code}: "
                                               f"OOM-killed at its memory limit ({mem} bytes)")
            raise ContainerExitError(code)
        return None

    def logs(self, follow: bool = False):
        """The entrypoint's captured output as an async iterator of
        `(stream, bytes)`, oldest first; `follow=True` goes on until the
        sandbox stops. Bytes pushed out of the ring are counted in
        `log_dropped`."""
        if not isinstance(follow, bool):
            raise TypeError("follow must be a bool")
        return self._logs.iterate(follow)

    @property
    def log_dropped(self) -> dict[str, int]:
        """Bytes per stream dropped from the log ring (oldest first)."""
        return self._logs.dropped

    def signal(self, signo: int) -> None:
        signo = check_signal(signo)
        if self._pidfd is not None:
            self._pidfd.signal(signo)

    # -- exec --------------------------------------------------------------
    async def exec(self, cmd, *, stdin=None, stdout="pipe", stderr="pipe", cwd=None, env=None,
                   user=None) -> ExecProcess:
        a = check_exec(cmd, stdin, stdout, stderr, cwd, env, user)
        if self._state != RUNNING or self._pidfd is None:
            raise SandboxNotRunning(f"sandbox {self.name} is not running")
        ident = self._who(a.user, self._etc_users_live())
        proc = native.ProcSpec(argv=a.cmd, env=tuple(self._envlist(ident, a.env)),
                               path=self._path(self._env, a.env),
                               cwd=a.cwd or (self._image and self._image.config.working_dir) or "/",
                               uid=ident.uid, gid=ident.gid, groups=ident.groups)
        devnull = self._rt._devnull
        parent_fds: list[int] = []
        child_fds: list[int] = []
        try:
            if a.stdin is None:
                in_fd = devnull
            else:
                r, w = os.pipe2(os.O_CLOEXEC)
                in_fd, stdin_w = r, w
                child_fds.append(r)
                parent_fds.append(w)
            if a.stdout == "pipe":
                r, w = os.pipe2(os.O_CLOEXEC)
                out_fd, stdout_r = w, r
                child_fds.append(w)
                parent_fds.append(r)
            else:
                out_fd = devnull
            if a.stderr == "pipe":
                r, w = os.pipe2(os.O_CLOEXEC)
                err_fd, stderr_r = w, r
                child_fds.append(w)
                parent_fds.append(r)
            elif a.stderr == "combined":
                err_fd = out_fd
            else:
                err_fd = devnull
            # The report pipe: sbx-exec's "created pid N" and any failure.
            rep_r, rep_w = os.pipe2(os.O_CLOEXEC)
            child_fds.append(rep_w)
            parent_fds.append(rep_r)
            res = self._res
            helper = native.spawn_exec(
                exe_fd=self._rt._exec_fd, ns_pidfd=self._pidfd.fd, procs_fds=res.procs_fds,
                late=res.procs_late, caps=DEFAULT_CAP_MASK, proc=proc,
                stdio=(in_fd, out_fd, err_fd), report_fd=rep_w)
        except BaseException:
            for fd in parent_fds:
                os.close(fd)
            raise
        finally:
            for fd in child_fds:
                os.close(fd)
        parent_fds.remove(rep_r)             # exec_report closes it
        # Followed in a task of its own: if this call is cancelled, the task
        # still learns the pid (when the sandbox lets the process get that
        # far) and kills and reaps it, so nothing is left behind.
        job = asyncio.ensure_future(exec_report(helper, rep_r))
        self._exec_jobs.add(job)
        job.add_done_callback(self._exec_jobs.discard)
        try:
            rep = await asyncio.shield(job)
        except BaseException:
            for fd in parent_fds:
                os.close(fd)
            job.add_done_callback(_kill_abandoned)
            raise
        pid, watcher, err = rep.pid, rep.watcher, rep.error
        try:
            if watcher is None:
                # Joining or forking into a PID namespace whose init is gone
                # fails with ESRCH/ENOMEM: the sandbox stopped under us.
                if self._state != RUNNING or (
                        err is not None and err.step in ("setns", "fork")
                        and err.errno in (errno.ESRCH, errno.ENOMEM, errno.EINVAL)):
                    raise SandboxNotRunning(f"sandbox {self.name} is not running")
                raise err or ExecError(errno.ECHILD, "fork",
                                       f"sbx-exec ended with status {rep.helper_code}, no report")
            if err is not None:
                await watcher.exited
                raise err
            stdin_w_ = out_r = err_r = None
            if a.stdin is not None:
                parent_fds.remove(stdin_w)      # the transport owns it from here
                stdin_w_ = await open_writer(stdin_w)
            if a.stdout == "pipe":
                parent_fds.remove(stdout_r)
                out_r = await open_reader(stdout_r)
            if a.stderr == "pipe":
                parent_fds.remove(stderr_r)
                err_r = await open_reader(stderr_r)
        except BaseException:
            for fd in parent_fds:
                os.close(fd)
            if watcher is not None and not watcher.exited.done():
                watcher.signal(_signal.SIGKILL)    # reaped by its own watcher
            raise
        ns_pid = rep.ns_pid
        feeder = None
        if a.stdin is not None and a.stdin != "pipe":
            feeder = asyncio.ensure_future(feed_stdin(stdin_w_, a.stdin))
            stdin_w_ = None
        log.debug("sandbox.exec", sandbox=self.name, step="exec", pid=ns_pid, host_pid=pid)
        return ExecProcess(host_pid=pid, pid=ns_pid, pidfd=watcher, stdin=stdin_w_,
                           stdout=out_r, stderr=err_r, feeder=feeder, drains=self._drains)

    def _who(self, user, files: tuple[str, str]):
        """user= resolved in the sandbox's /etc; an image's User is the default
        and may be `uid:gid` (sandbox/images/image.py)."""
        if self._image is None:
            return resolve(user, *files)
        from .images import resolve_user
        return resolve_user(user if user is not None else self._image.config.user, *files)

    def _etc_users_live(self) -> tuple[str, str]:
        if self._rootfs is None and self._image is None:
            # The default /etc is generated by us and read-only inside: no need
            # to read it back through /proc on every exec.
            return self._rt._etc_users(None)
        # The sandbox's own files, hostile (SPEC §9): read confined to its root,
        # bounded, never blocking the loop (sandbox/safefs.py). Its root
        # through /proc/PID, checked against the pidfd: PID 1 still unreaped
        # after the open means the pid was not reused.
        from . import safefs
        pidfd = self._pidfd
        try:
            root = safefs.open_proc_root(self._pid, lambda: pidfd is not None and pidfd.signal(0))
        except OSError:
            raise SandboxNotRunning(f"sandbox {self.name} is not running") from None
        try:
            return (safefs.read_text_or_empty(root, "etc/passwd", log=log),
                    safefs.read_text_or_empty(root, "etc/group", log=log))
        finally:
            os.close(root)

    # -- ports ----------------------------------------------------------------
    def get_tcp_port(self, port: int):
        check_port(port)
        from .ports import TcpPort
        return TcpPort(self, port)
