"""Relaying bytes between two TCP sockets in the kernel: `splice(2)` through a pipe.

Used for HTTPS passed through untouched and for a WebSocket after its `101`: once the
policy decision is made, the proxy has nothing to read in those bytes, so they go
socket -> pipe -> socket without ever being copied into Python. Memory stays bounded by
the two pipes (PIPE_SIZE each), and back-pressure is the kernel's: a direction whose
receiver does not read stops taking bytes from its sender once its pipe is full.

Only plain TCP sockets qualify (a TLS-terminated side must go through Python); the
caller falls back to the copying relay otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import socket
from typing import Optional

__all__ = ["splice_fds", "PIPE_SIZE"]

PIPE_SIZE = 1 << 20                 # bytes in flight per direction
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_GONE = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ETIMEDOUT, errno.EHOSTUNREACH})


def _pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    with contextlib.suppress(OSError):  # a smaller pipe only costs more wake-ups
        fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
    return r, w


def _shut_wr(fd: int) -> None:
    s = socket.socket(fileno=os.dup(fd))
    try:
        s.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        s.close()


async def _ready(loop: asyncio.AbstractEventLoop, fd: int, write: bool) -> None:
    fut: asyncio.Future[None] = loop.create_future()
    add, remove = (loop.add_writer, loop.remove_writer) if write else (loop.add_reader, loop.remove_reader)
    add(fd, lambda: fut.done() or fut.set_result(None))
    try:
        await fut
    finally:
        remove(fd)


async def _direction(src: int, dst: int, idle: float, write_timeout: float,
                     last: list[float], count: list[int]) -> None:
    loop = asyncio.get_running_loop()
    r, w = _pipe()
    try:
        queued = 0
        while True:
            try:
                n = os.splice(src, w, PIPE_SIZE, flags=_FLAGS)
            except BlockingIOError:
                n = -1
            except OSError as exc:
                if exc.errno in _GONE:
                    n = 0  # the sender reset: treat as its end
                else:
                    raise
            if n == 0:  # the sender's end (nothing is queued here: flushed below each turn)
                _shut_wr(dst)  # half-close: the other direction may still be talking
                return
            if n > 0:
                queued += n
                count[0] += n
                last[0] = loop.time()
            while queued:
                try:
                    queued -= os.splice(r, dst, queued, flags=_FLAGS)
                    last[0] = loop.time()
                except BlockingIOError:
                    async with asyncio.timeout(write_timeout):  # the receiver reads nothing
                        await _ready(loop, dst, True)
            if n == -1:
                while True:
                    try:
                        async with asyncio.timeout(idle):
                            await _ready(loop, src, False)
                        break
                    except TimeoutError:
                        if loop.time() - last[0] < idle:
                            continue  # the other direction is busy: this one may be quiet
                        raise
    finally:
        os.close(r)
        os.close(w)


async def splice_fds(a: int, b: int, *, idle: float, write_timeout: float,
                     counter: Optional[list[int]] = None) -> None:
    """Bytes both ways between the connected, non-blocking sockets `a` and `b` until
    both directions ended (each end is passed on as a half-close), or nothing moved for
    `idle` seconds, or a receiver took nothing for `write_timeout`. Closes neither."""
    loop = asyncio.get_running_loop()
    last = [loop.time()]
    count = counter if counter is not None else [0]
    await both_ways(_direction(a, b, idle, write_timeout, last, count),
                    _direction(b, a, idle, write_timeout, last, count))


async def both_ways(*coros) -> None:
    """Runs the directions of a relay together until all ended; the first error
    ends the others and is raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            if t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
