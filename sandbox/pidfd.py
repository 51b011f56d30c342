"""Exit status through a pidfd watched by the event loop: readable once the
process is a zombie, then reaped with waitid(P_PIDFD). No polling, no
SIGCHLD handler, no PID reuse race."""
from __future__ import annotations

import asyncio
import os

from . import _native_api as native


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
