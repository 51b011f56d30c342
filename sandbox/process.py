"""ExecProcess: one process started inside a sandbox, with streamed stdio.

stdout/stderr are pipes read by asyncio StreamReaders: when the consumer
falls behind, the reader stops reading, the pipe fills, and the process
blocks in write() — backpressure instead of unbounded memory."""
from __future__ import annotations

import asyncio
import os
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


class OutputStream:
    """`async for chunk in stream`, or `await stream.read(n=-1)`."""

    def __init__(self, reader: asyncio.StreamReader, owner: "ExecProcess"):
        self._reader = reader
        self._owner = owner

    async def read(self, n: int = -1) -> bytes:
        self._owner._consumed = True
        if n < 0:
            return await self._reader.read(-1)
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


async def open_reader(fd: int) -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_LIMIT, loop=loop)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader, loop=loop),
                                 os.fdopen(fd, "rb", buffering=0))
    return reader


async def open_writer(fd: int) -> StdinWriter:
    loop = asyncio.get_running_loop()
    proto = asyncio.StreamReaderProtocol(asyncio.StreamReader(loop=loop), loop=loop)
    transport, _ = await loop.connect_write_pipe(lambda: proto, os.fdopen(fd, "wb", buffering=0))
    return StdinWriter(transport, proto)


class ExecProcess:
    def __init__(self, *, host_pid: int, pid: int, pidfd: Pidfd, stdin: StdinWriter | None,
                 stdout: asyncio.StreamReader | None, stderr: asyncio.StreamReader | None,
                 feeder=None):
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

    def kill(self, signo: int = 15) -> None:
        check_signal(signo)
        self._pidfd.signal(signo)

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
