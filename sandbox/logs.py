"""Entrypoint logs (SPEC §10): the entrypoint's stdout/stderr of an API
sandbox are captured per sandbox in a bounded ring per stream.

The entrypoint is hostile input: it may write without end. The runtime reads
its pipes continuously (it never applies backpressure, so the entrypoint never
blocks on its own logs) and keeps only the newest `limit` bytes per stream;
older bytes are dropped and counted. Memory is `2 * limit` plus one read."""
from __future__ import annotations

import asyncio
import collections
import os
from typing import AsyncIterator

DEFAULT_LIMIT = 1 << 20
READ_SIZE = 64 * 1024
STREAMS = ("stdout", "stderr")


class _Ring:
    def __init__(self, limit: int):
        self.limit = limit
        self.chunks: collections.deque[list] = collections.deque()   # [seq, bytes]
        self.size = 0
        self.dropped = 0

    def append(self, seq: int, data: bytes) -> None:
        if len(data) > self.limit:
            self.dropped += len(data) - self.limit
            data = data[-self.limit:] if self.limit else b""
        if not data:
            return
        self.chunks.append([seq, data])
        self.size += len(data)
        while self.size > self.limit:
            first = self.chunks[0]
            over = self.size - self.limit
            if len(first[1]) <= over:
                self.chunks.popleft()
                self.size -= len(first[1])
                self.dropped += len(first[1])
            else:
                first[1] = first[1][over:]
                self.size -= over
                self.dropped += over


class LogCapture:
    """Owns the read ends of one run's stdout/stderr pipes and the rings."""

    def __init__(self, limit: int = DEFAULT_LIMIT):
        self.limit = limit
        self._rings = {s: _Ring(limit) for s in STREAMS}
        self._seq = 0
        self._fds: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self.closed = True          # no pipe open: followers end

    # -- pipes ----------------------------------------------------------------
    def open_pipes(self) -> tuple[int, int]:
        """Makes the two pipes; returns the write ends for the entrypoint
        (the caller closes them once the child holds them)."""
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._rings = {s: _Ring(self.limit) for s in STREAMS}
        writers = []
        try:
            for s in STREAMS:
                r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
                os.set_blocking(w, True)
                self._fds[s] = r
                writers.append(w)
                self._loop.add_reader(r, self._readable, s)
        except BaseException:
            for w in writers:
                os.close(w)
            self.close()
            raise
        self.closed = False
        return writers[0], writers[1]

    def _readable(self, stream: str) -> None:
        fd = self._fds.get(stream)
        if fd is None:
            return
        try:
            data = os.read(fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close_stream(stream)
        else:
            self._seq += 1
            self._rings[stream].append(self._seq, data)
        self._notify()

    def finish(self) -> None:
        """The sandbox stopped, so every writer is gone: take what is still in
        the pipes (bounded by their capacity) and close them."""
        for s in list(self._fds):
            fd = self._fds[s]
            for _ in range(64):
                try:
                    data = os.read(fd, READ_SIZE)
                except (BlockingIOError, InterruptedError, OSError):
                    break
                if not data:
                    break
                self._seq += 1
                self._rings[s].append(self._seq, data)
            self._close_stream(s)
        self._notify()

    def close(self) -> None:
        for s in list(self._fds):
            self._close_stream(s)
        self._notify()

    def _close_stream(self, stream: str) -> None:
        fd = self._fds.pop(stream, None)
        if fd is not None:
            if self._loop is not None:
                self._loop.remove_reader(fd)
            os.close(fd)
        if not self._fds:
            self.closed = True

    def _notify(self) -> None:
        # A fresh event per change: each follower waits on the one it saw
        # before taking its snapshot, so no follower can miss a change.
        if self._changed is not None:
            old, self._changed = self._changed, asyncio.Event()
            old.set()

    # -- readers --------------------------------------------------------------
    @property
    def dropped(self) -> dict[str, int]:
        return {s: self._rings[s].dropped for s in STREAMS}

    def _since(self, seq: int) -> list[tuple[int, str, bytes]]:
        out = [(c[0], s, c[1]) for s in STREAMS for c in self._rings[s].chunks if c[0] > seq]
        out.sort(key=lambda t: t[0])
        return out

    async def iterate(self, follow: bool = False) -> AsyncIterator[tuple[str, bytes]]:
        seq = 0
        while True:
            changed = self._changed
            for s_, stream, data in self._since(seq):
                seq = s_
                yield stream, data
            if not follow or self.closed:
                # One more look: data may have arrived with the close.
                for s_, stream, data in self._since(seq):
                    seq = s_
                    yield stream, data
                return
            if changed is None:
                return
            await changed.wait()
