"""Opening the upstream side of an egress decision, and splicing two streams.

`open_upstream` is the one place that turns a `Decision` into a connection (SPEC §10
"Where egress goes"): a name decision resolves the name through the runtime's pinned
resolver and connects to one of *its* addresses — the address the sandbox dialled is
not even known here — and an IP decision connects to the original destination. Both
the HTTP relay and the TLS pass-through use it, so they cannot disagree.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Optional

from .ksplice import both_ways, splice_fds
from .policy import Decision
from .resolve import Resolve, ResolveError

__all__ = ["Connector", "EgressDenied", "open_upstream", "splice", "close_writer", "ResolveError",
           "CONNECT_TIMEOUT", "WRITE_TIMEOUT", "SPLICE_IDLE"]

Address = tuple[str, int]
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
# (address to connect to, TLS server name or None for plain TCP) -> streams
Connector = Callable[[Address, Optional[str]], Awaitable[Streams]]

CONNECT_TIMEOUT = 10.0  # per address tried
MAX_ADDRESSES = 4       # addresses of one name tried before giving up
WRITE_TIMEOUT = 60.0    # a peer that accepts none of our bytes for this long is gone
SPLICE_IDLE = 600.0     # a tunnel with no byte either way for this long is closed
SPLICE_CHUNK = 64 * 1024


class EgressDenied(Exception):
    """Every address of the name is in denied_hosts: the request is denied (403)."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(f"denied by denied_hosts: {decision.host}")


async def open_upstream(decision: Decision, *, resolve: Resolve, connect: Connector,
                        tls_name: Optional[str]) -> Streams:
    """Streams to where `decision` (an "egress") says; `ResolveError`, `EgressDenied` or
    `OSError` otherwise."""
    assert decision.kind == "egress" and decision.upstream is not None
    host, port = decision.upstream
    if decision.by_name:
        addresses = await resolve(host)
        # A name must not lead where denied_hosts forbids the sandbox to go by IP.
        allowed = [ip for ip in addresses if not decision.refuses_address(ip, port)]
        if not allowed:
            raise EgressDenied(decision)
    else:
        allowed = [host]
    last: BaseException = OSError(f"cannot connect to {host}:{port}")
    for ip in allowed[:MAX_ADDRESSES]:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                return await connect((ip, port), tls_name)
        except (OSError, TimeoutError) as exc:
            last = exc
    if isinstance(last, TimeoutError):
        raise OSError(f"connect to {host}:{port} timed out")
    raise last


def _plain_fd(streams: Streams) -> Optional[int]:
    """The socket's fd when `streams` is plain TCP on a selector loop (what the kernel
    relay needs), else None."""
    writer = streams[1]
    sock = writer.get_extra_info("socket")
    if (sock is None or writer.get_extra_info("sslcontext") is not None
            or not isinstance(asyncio.get_running_loop(), asyncio.selector_events.BaseSelectorEventLoop)
            or sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM):
        return None
    return sock.fileno()


async def _hand_over(streams: Streams, other: asyncio.StreamWriter, counter: list[int]) -> None:
    """Take the socket from its transport for the kernel relay: no more reads by asyncio,
    bytes it already read go to the other side first, bytes queued for it go out."""
    reader, writer = streams
    writer.transport.pause_reading()
    buffered = bytes(reader._buffer)  # read by asyncio before the switch: not lost
    reader._buffer.clear()
    if buffered:
        counter[0] += len(buffered)
        other.write(buffered)
    async with asyncio.timeout(WRITE_TIMEOUT):
        await writer.drain()


async def splice(a: Streams, b: Streams, *, idle: float = SPLICE_IDLE,
                 counter: Optional[list[int]] = None) -> None:
    """Bytes both ways; in the kernel (`ksplice`) when both sides are plain TCP."""
    count = counter if counter is not None else [0]
    fa, fb = _plain_fd(a), _plain_fd(b)
    if fa is None or fb is None or a[0].at_eof() or b[0].at_eof():
        await copy(a, b, idle=idle, counter=count)
        return
    await _hand_over(a, b[1], count)
    await _hand_over(b, a[1], count)
    async with asyncio.timeout(WRITE_TIMEOUT):
        await a[1].drain()
        await b[1].drain()
    # Own descriptors: asyncio refuses add_reader on an fd a transport still holds.
    da = os.dup(fa)
    try:
        db = os.dup(fb)
        try:
            await splice_fds(da, db, idle=idle, write_timeout=WRITE_TIMEOUT, counter=count)
        finally:
            os.close(db)
    finally:
        os.close(da)


async def copy(a: Streams, b: Streams, *, idle: float = SPLICE_IDLE,
               counter: Optional[list[int]] = None) -> None:
    """Bytes both ways until both directions ended, or nothing moved either way for
    `idle` seconds, or one side stopped accepting bytes (`WRITE_TIMEOUT`). Memory stays
    bounded: each direction holds at most one chunk plus the transport's write buffer
    (drain applies the other side's backpressure). Does not close the streams."""
    loop = asyncio.get_running_loop()
    last = [loop.time()]
    count = counter if counter is not None else [0]

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while True:
            try:
                async with asyncio.timeout(idle):
                    data = await src.read(SPLICE_CHUNK)
            except TimeoutError:
                if loop.time() - last[0] < idle:
                    continue  # the other direction is busy: this one may be quiet
                raise
            if not data:
                break
            last[0] = loop.time()
            count[0] += len(data)
            dst.write(data)
            async with asyncio.timeout(WRITE_TIMEOUT):
                await dst.drain()
        if dst.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                dst.write_eof()  # half-close: the other direction may still be talking

    await both_ways(pipe(a[0], b[1]), pipe(b[0], a[1]))


async def close_writer(writer: asyncio.StreamWriter, timeout: Optional[float] = None) -> None:
    """Close, letting buffered bytes go out — but a peer that reads none of them for
    `timeout` (default WRITE_TIMEOUT) does not keep the connection (and its memory)
    forever: the transport is aborted."""
    writer.close()
    try:
        async with asyncio.timeout(WRITE_TIMEOUT if timeout is None else timeout):
            await writer.wait_closed()
    except TimeoutError:
        writer.transport.abort()
    except Exception:
        pass
