"""ExecProcess: one process started inside a sandbox, with streamed stdio.

stdout/stderr are pipes read by asyncio StreamReaders: when the consumer
falls behind, the reader stops reading, the pipe fills, and the process
blocks in write() — backpressure instead of unbounded memory."""
from __future__ import annotations

import asyncio
import fcntl
import os
import termios
from dataclasses import dataclass
from typing import AsyncIterator

from .config import check_signal
from .pidfd import Pidfd

READ_LIMIT = 64 * 1024     # the reader pauses the pipe at 2x this
CHUNK = 64 * 1024


@dataclass(frozen=True)
class ExecOutput:
    stdout: bytes
    stderr: bytes
    exit_code: int


class PipeReader:
    """The runtime's end of one stdout/stderr pipe of an exec'd process.

    SPEC §10 "Output and descendants": the stream ends when the process has
    exited AND what was already in the pipe at that moment has been read. A
    descendant that inherited the write end (`sh -c 'server &'`) must neither
    hold the reader up nor block or get SIGPIPE later, so after the end the
    reader keeps the pipe open and discards whatever arrives (into one
    reused buffer: no allocation) until EOF or until the sandbox goes.

    While the process runs, a bounded buffer gives backpressure: reading
    pauses when the consumer is `2 * READ_LIMIT` behind, so the writer blocks.
    At exit the pipe's content is taken in one bounded gulp (at most the
    pipe's capacity, which the sandbox cannot raise past pipe-max-size)."""

    def __init__(self, fd: int, loop: asyncio.AbstractEventLoop | None = None):
        os.set_blocking(fd, False)
        self._fd = fd
        self._loop = loop or asyncio.get_running_loop()
        self._buf = bytearray()
        self._eof = False           # the pipe reached EOF (fd closed)
        self._ended = False         # the consumer's stream is over
        self._paused = False
        self._waiter: asyncio.Future | None = None
        self._drains: set | None = None
        self._loop.add_reader(fd, self._on_readable)

    # -- fd side ------------------------------------------------------------
    def _on_readable(self) -> None:
        if self._ended:
            self._discard()
            return
        try:
            data = os.read(self._fd, CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close_fd()
            self._wake()
            return
        self._buf += data
        if len(self._buf) >= 2 * READ_LIMIT:
            self._pause()
        self._wake()

    def _discard(self) -> None:
        try:
            n = os.readv(self._fd, [_SINK])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        if n == 0:
            self._close_fd()

    def process_exited(self, drains: set | None = None) -> None:
        """The exec'd process is gone: take what is in the pipe now, then end."""
        if self._ended:
            return
        if self._fd >= 0:
            try:
                left = int.from_bytes(fcntl.ioctl(self._fd, termios.FIONREAD, b"\0" * 4), "little")
            except OSError:
                left = 0
            while left > 0:
                try:
                    data = os.read(self._fd, min(left, 1 << 20))
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    data = b""
                if not data:
                    self._close_fd()
                    break
                self._buf += data
                left -= len(data)
        self._ended = True
        if self._fd >= 0:
            self._resume()
            self._drains = drains
            if drains is not None:
                drains.add(self)
        self._wake()

    def close(self) -> None:
        """Stops draining (the sandbox is gone) and releases the fd."""
        self._ended = True
        self._close_fd()
        self._wake()

    def _close_fd(self) -> None:
        self._eof = True
        if self._fd >= 0:
            if not self._paused:
                self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
        if self._drains is not None:
            self._drains.discard(self)
            self._drains = None

    def _pause(self) -> None:
        if not self._paused and self._fd >= 0:
            self._loop.remove_reader(self._fd)
            self._paused = True

    def _resume(self) -> None:
        if self._paused and self._fd >= 0:
            self._loop.add_reader(self._fd, self._on_readable)
        self._paused = False

    def _wake(self) -> None:
        w, self._waiter = self._waiter, None
        if w is not None and not w.done():
            w.set_result(None)

    # -- consumer side -------------------------------------------------------
    def at_eof(self) -> bool:
        return not self._buf and (self._eof or self._ended)

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def read(self, n: int = -1) -> bytes:
        if n < 0:
            parts = []
            while True:
                chunk = await self.read(CHUNK * 4)
                if not chunk:
                    return b"".join(parts)
                parts.append(chunk)
        while not self._buf and not (self._eof or self._ended):
            await self._wait()
        out = bytes(self._buf[:n])
        del self._buf[:n]
        if self._paused and not self._ended and len(self._buf) < READ_LIMIT:
            self._resume()
        return out


# Where discarded bytes go: one reused buffer, so draining allocates nothing.
_SINK = bytearray(256 * 1024)


class OutputStream:
    """`async for chunk in stream`, or `await stream.read(n=-1)`."""

    def __init__(self, reader: PipeReader, owner: "ExecProcess"):
        self._reader = reader
        self._owner = owner

    async def read(self, n: int = -1) -> bytes:
        self._owner._consumed = True
        return await self._reader.read(n)

    def __aiter__(self) -> AsyncIterator[bytes]:
        self._owner._consumed = True
        return self._iter()

    async def _iter(self):
        while True:
            chunk = await self._reader.read(CHUNK)
            if not chunk:
                return
            yield chunk


class StdinWriter:
    """write(data), await drain(), close() (EOF)."""

    def __init__(self, transport: asyncio.WriteTransport, protocol):
        self._transport = transport
        self._protocol = protocol

    def write(self, data: bytes) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"stdin.write() takes bytes, got {type(data).__name__}")
        if self._transport.is_closing():
            raise BrokenPipeError("stdin is closed")
        self._transport.write(data)

    async def drain(self) -> None:
        if self._transport.is_closing():
            # Let the protocol report a lost connection as an error.
            await asyncio.sleep(0)
        await self._protocol._drain_helper()

    def close(self) -> None:
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()


async def open_reader(fd: int) -> PipeReader:
    return PipeReader(fd)


async def open_writer(fd: int) -> StdinWriter:
    loop = asyncio.get_running_loop()
    proto = asyncio.StreamReaderProtocol(asyncio.StreamReader(loop=loop), loop=loop)
    transport, _ = await loop.connect_write_pipe(lambda: proto, os.fdopen(fd, "wb", buffering=0))
    return StdinWriter(transport, proto)


class ExecProcess:
    def __init__(self, *, host_pid: int, pid: int, pidfd: Pidfd, stdin: StdinWriter | None,
                 stdout: PipeReader | None, stderr: PipeReader | None,
                 feeder=None, drains: set | None = None):
        self.host_pid = host_pid
        self.pid = pid
        self._pidfd = pidfd
        self.stdin = stdin
        self._consumed = False
        self._output_called = False
        self.stdout = OutputStream(stdout, self) if stdout is not None else None
        self.stderr = OutputStream(stderr, self) if stderr is not None else None
        self.exit_code: asyncio.Future[int] = pidfd.exited
        self._feeder = feeder
        readers = [r for r in (stdout, stderr) if r is not None]
        if readers:
            def exited(_fut, readers=readers, drains=drains):
                for r in readers:
                    r.process_exited(drains)
            self.exit_code.add_done_callback(exited)

    def kill(self, signo: int = 15) -> None:
        self._pidfd.signal(check_signal(signo))

    async def output(self) -> ExecOutput:
        if self._output_called or self._consumed:
            raise TypeError("output() can be called once, and not after a stream was read")
        self._output_called = True
        self._consumed = True

        async def drain(stream: OutputStream | None) -> bytes:
            return await stream._reader.read(-1) if stream is not None else b""

        out, err = await asyncio.gather(drain(self.stdout), drain(self.stderr))
        code = await self.exit_code
        return ExecOutput(out, err, code)

    def __repr__(self) -> str:
        state = f"exit_code={self.exit_code.result()}" if self.exit_code.done() else "running"
        return f"<ExecProcess pid={self.pid} host_pid={self.host_pid} {state}>"


async def feed_stdin(writer: StdinWriter, source) -> None:
    """Streams bytes or an async iterable into stdin with backpressure; a
    process that exits early just ends the feed (the rest is dropped)."""
    try:
        if isinstance(source, bytes):
            if source:
                writer.write(source)
                await writer.drain()
        else:
            async for chunk in source:
                if writer.is_closing():
                    break
                writer.write(bytes(chunk))
                await writer.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        writer.close()
