"""Exit status through a pidfd watched by the event loop: readable once the
process is a zombie, then reaped with waitid(P_PIDFD). No polling, no
SIGCHLD handler, no PID reuse race."""
from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

from . import _native_api as native
from .errors import ExecError


class Pidfd:
    """Owns one pidfd. `exited` resolves with the exit code (128+N for a signal)."""

    def __init__(self, pidfd: int, loop: asyncio.AbstractEventLoop | None = None):
        self.fd = pidfd
        self._loop = loop or asyncio.get_running_loop()
        self.exited: asyncio.Future[int] = self._loop.create_future()
        self._loop.add_reader(pidfd, self._ready)

    def _ready(self) -> None:
        try:
            code = native.pidfd_wait(self.fd)
        except OSError as e:  # ECHILD: someone else reaped it; nothing to learn
            code = 128 + 9 if e.errno else 255
        if code is None:
            return
        self._finish(code)

    def _finish(self, code: int) -> None:
        self._loop.remove_reader(self.fd)
        os.close(self.fd)
        self.fd = -1
        if not self.exited.done():
            self.exited.set_result(code)

    def poll(self) -> None:
        """Reaps now if the process has exited (no wait for the loop)."""
        if self.fd >= 0:
            self._ready()

    def signal(self, signo: int) -> bool:
        """Queues signo; False when the process has already exited."""
        if self.fd < 0:
            return False
        return native.pidfd_signal(self.fd, signo)

    def close(self) -> None:
        """Stops watching (the process is not waited for)."""
        if self.fd >= 0:
            self._loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1
        if not self.exited.done():
            self.exited.cancel()


async def read_error_pipe(fd: int) -> bytes:
    """Reads the child's error pipe to EOF without blocking the loop."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    buf = bytearray()
    done = loop.create_future()

    def ready():
        try:
            while True:
                chunk = os.read(fd, 512)
                if not chunk:
                    break
                buf.extend(chunk)
        except BlockingIOError:
            return
        except OSError as e:
            if not done.done():
                done.set_exception(e)
            return
        if not done.done():
            done.set_result(None)

    loop.add_reader(fd, ready)
    try:
        ready()
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return bytes(buf)


async def read_records(fd: int, size: int, on_record, max_records: int) -> None:
    """Reads fixed-size records from a pipe until EOF without blocking the
    loop, calling on_record(bytes) as soon as each one is complete; closes
    fd. At most max_records are kept: what a misbehaving writer sends beyond
    is read and dropped, so memory stays bounded."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    buf = bytearray()
    seen = 0
    try:
        while True:
            try:
                chunk = os.read(fd, 4096)
            except BlockingIOError:
                ready = loop.create_future()
                loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
                try:
                    await ready
                finally:
                    loop.remove_reader(fd)
                continue
            if not chunk:
                return
            if seen >= max_records:
                continue
            buf += chunk
            while len(buf) >= size and seen < max_records:
                record = bytes(buf[:size])
                del buf[:size]
                seen += 1
                on_record(record)
    finally:
        os.close(fd)


def ns_pid(pidfd: int) -> int:
    """The PID inside the process's own namespace, from our own fdinfo of its
    pidfd (no read of anything the process controls); 0 once it was reaped."""
    try:
        with open(f"/proc/self/fdinfo/{pidfd}", "rb") as f:
            for line in f:
                if line.startswith(b"NSpid:"):
                    return max(0, int(line.split()[-1]))
    except (OSError, ValueError):
        pass
    return 0


@dataclass
class ExecReport:
    """What sbx-exec and the process it started reported (csrc/exechelper.c)."""
    pid: int = 0                  # host pid of the process, 0 if none was created
    ns_pid: int = 0
    watcher: Pidfd | None = None  # reaps the process
    error: ExecError | None = None
    helper_code: int = -1


async def exec_report(helper_pidfd: int, report_fd: int) -> ExecReport:
    """Follows one exec to its end, asynchronously: the report pipe to EOF
    (the helper exited and the process exec'd, failed or died) and the
    helper's exit. The process's pidfd is opened the moment its pid arrives:
    it is our child (CLONE_PARENT), so nobody else can reap it and its pid
    cannot be reused before we do. Whatever the sandbox does (SIGSTOP
    included) only delays this coroutine, never the event loop."""
    helper = Pidfd(helper_pidfd)
    rep = ExecReport()

    def on_record(record: bytes) -> None:
        pid, err = native.parse_report(record)
        if pid and not rep.pid:
            rep.pid = pid
            try:
                fd = os.pidfd_open(pid)
            except OSError as e:
                # (EMFILE, say) Still our unreaped child, so its pid is its
                # own: kill it and reap it off the loop.
                os.kill(pid, 9)
                asyncio.ensure_future(asyncio.to_thread(os.waitpid, pid, 0))
                rep.error = ExecError(e.errno, "fork", "pidfd_open")
                return
            rep.ns_pid = ns_pid(fd)
            rep.watcher = Pidfd(fd)
        elif err is not None and rep.error is None:
            rep.error = err

    # two records at most: the helper's, and the process's if it failed
    await read_records(report_fd, native.ERR_RECORD.size, on_record, max_records=2)
    helper.poll()     # it has usually exited by now: reap without another loop turn
    rep.helper_code = await helper.exited
    return rep
