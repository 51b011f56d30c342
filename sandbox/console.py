"""`sandbox run` on a terminal: relays the operator's terminal to the
sandbox's own pty (the console, see Sandbox.start(console=True)), as
`docker run -t` does.

The operator's terminal goes raw for the duration, so every key — ^C, ^Z,
^\\ included — is a byte for the sandbox's line discipline, which signals the
sandbox's foreground job and nothing else. The sandbox never holds an fd of
the operator's terminal: only this relay touches it.

Neither side can stall the runtime: the operator's tty and stdout are used
through descriptions of our own (reopened non-blocking, so the operator's
shell never inherits O_NONBLOCK), each direction holds at most LIMIT bytes
and stops reading its source while full, so a slow side throttles the other
through the kernel's buffers instead of our memory.
"""
from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import stat
import struct
import termios
import tty

LIMIT = 64 * 1024
CHUNK = 16 * 1024


def _reopen(fd: int, flags: int) -> int | None:
    """A new open file description of fd's terminal or FIFO (not shared with
    whoever gave us fd), or None for a file, socket or device where that
    is not possible or not the same stream."""
    try:
        mode = os.fstat(fd).st_mode
        if not (os.isatty(fd) or stat.S_ISFIFO(mode)):
            return None
        return os.open(f"/proc/self/fd/{fd}", flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None


class _Pump:
    """Copies src -> dst through a bounded buffer, driven by readiness."""

    def __init__(self, loop, src: int, dst: int, on_eof):
        self.loop, self.src, self.dst = loop, src, dst
        self.buf = bytearray()
        self.eof = False
        self.on_eof = on_eof
        self.reading = self.writing = False
        self.drained = loop.create_future()

    def start(self) -> None:
        self._want_read(True)

    def _want_read(self, on: bool) -> None:
        if on and not self.reading and not self.eof:
            self.loop.add_reader(self.src, self._read)
            self.reading = True
        elif not on and self.reading:
            self.loop.remove_reader(self.src)
            self.reading = False

    def _want_write(self, on: bool) -> None:
        if on and not self.writing:
            self.loop.add_writer(self.dst, self._write)
            self.writing = True
        elif not on and self.writing:
            self.loop.remove_writer(self.dst)
            self.writing = False

    def _read(self) -> None:
        try:
            data = os.read(self.src, CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            # EIO: a pty master once every slave fd is closed (the sandbox is
            # gone), or a terminal that hung up. Either way: the end.
            if e.errno not in (errno.EIO, errno.EBADF):
                raise
            data = b""
        if not data:
            self.eof = True
            self._want_read(False)
            self.on_eof()
            self._check_drained()
            return
        self.buf += data
        if len(self.buf) >= LIMIT:
            self._want_read(False)
        self._write()

    def _write(self) -> None:
        while self.buf:
            try:
                n = os.write(self.dst, self.buf[:CHUNK])
            except (BlockingIOError, InterruptedError):
                self._want_write(True)
                return
            except OSError:
                # The reader is gone (EIO, EPIPE): nothing can be delivered.
                self.buf.clear()
                break
            del self.buf[:n]
        self._want_write(False)
        if not self.eof:
            self._want_read(True)
        self._check_drained()

    def _check_drained(self) -> None:
        if self.eof and not self.buf and not self.drained.done():
            self.drained.set_result(None)

    def stop(self) -> None:
        self._want_read(False)
        self._want_write(False)


class TerminalRelay:
    """`with TerminalRelay(master) as r:` raw operator terminal, relay running;
    the terminal's settings are restored on leaving, whatever the way out."""

    def __init__(self, master: int, stdin: int = 0, stdout: int = 1):
        self.master, self.stdin, self.stdout = master, stdin, stdout
        self._saved = None
        self._fds: list[int] = []
        self._pumps: list[_Pump] = []

    def __enter__(self) -> "TerminalRelay":
        loop = asyncio.get_running_loop()
        try:
            os.set_blocking(self.master, False)
            src = _reopen(self.stdin, os.O_RDONLY)
            if src is None:
                src = self.stdin   # reads only follow readiness: they do not block
            else:
                self._fds.append(src)
            dst = _reopen(self.stdout, os.O_WRONLY)
            if dst is not None:
                self._fds.append(dst)
            self.resize()
            self._saved = termios.tcgetattr(self.stdin)
            # TCSANOW: what the operator typed ahead is kept for the sandbox.
            tty.setraw(self.stdin, termios.TCSANOW)
            # Keys -> sandbox. At the operator's EOF (a hang-up) we stop
            # reading; the sandbox keeps its terminal until it exits.
            self.keys = _Pump(loop, src, self.master, lambda: None)
            # Sandbox -> screen: ends at EIO, when its last slave fd closed.
            # A stdout that cannot be reopened (a file, a socket) is written
            # as it is: blocking, which for a file never waits long.
            self.screen = _Pump(loop, self.master, dst if dst is not None else self.stdout,
                                lambda: self.keys.stop())
            self._pumps = [self.keys, self.screen]
            for p in self._pumps:
                p.start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def resize(self) -> None:
        """Copies the operator's window size onto the sandbox's pty; the
        sandbox's line discipline then sends SIGWINCH to its foreground job."""
        try:
            ws = fcntl.ioctl(self.stdin, termios.TIOCGWINSZ, b"\0" * 8)
            rows, cols = struct.unpack("HHHH", ws)[:2]
            if rows and cols:
                fcntl.ioctl(self.master, termios.TIOCSWINSZ, ws)
        except OSError:
            pass

    async def drain(self, timeout: float) -> None:
        """Waits until the sandbox's last output reached stdout (its pty
        reports EIO once every process holding the slave is gone), at most
        `timeout` seconds: a stdout nobody reads must not keep us here."""
        try:
            await asyncio.wait_for(asyncio.shield(self.screen.drained), timeout)
        except asyncio.TimeoutError:
            pass

    def __exit__(self, *exc) -> None:
        for p in self._pumps:
            p.stop()
        self._pumps = []
        if self._saved is not None:
            try:
                termios.tcsetattr(self.stdin, termios.TCSANOW, self._saved)
            except (OSError, termios.error):
                pass
            self._saved = None
        for fd in self._fds:
            os.close(fd)
        self._fds = []
