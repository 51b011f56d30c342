"""HTTP/1.1 plumbing of `sandbox serve`: h11 on one asyncio unix stream.

`Conn` feeds h11 and watches for a hang-up; `Request` parses the target and
answers JSON.  Nothing here knows about sandboxes: the endpoints live in
`api`, the daemon in `__init__` (which re-exports these names).
"""
from __future__ import annotations

import asyncio
import json
import urllib.parse
from http import HTTPStatus
from typing import Any

import h11

MAX_JSON = 1 << 20          # a JSON request body larger than this: 413
READ_SIZE = 64 * 1024
SERVER_NAME = b"sandbox"


def reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


class HttpError(Exception):
    def __init__(self, status: int, msg: str, **extra: Any):
        super().__init__(msg)
        self.status = status
        self.extra = extra


# -- one HTTP connection -----------------------------------------------------

class Conn:
    """h11 on an asyncio stream pair; single-task use except `watch_hangup`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.SERVER)
        self.closed = False

    async def _fill(self) -> None:
        try:
            data = await self.reader.read(READ_SIZE)
        except (ConnectionError, OSError):
            data = b""
        self.h11.receive_data(data)

    async def next_event(self):
        while True:
            ev = self.h11.next_event()
            if ev is h11.NEED_DATA:
                if self.h11.they_are_waiting_for_100_continue:
                    await self.send(h11.InformationalResponse(status_code=100, headers=[]))
                await self._fill()
                continue
            return ev

    async def send(self, event) -> None:
        data = self.h11.send(event)
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def read_body(self, limit: int = MAX_JSON) -> bytes:
        parts, size = [], 0
        while True:
            ev = await self.next_event()
            if isinstance(ev, h11.Data):
                size += len(ev.data)
                if size > limit:
                    raise HttpError(413, f"request body larger than {limit} bytes")
                parts.append(ev.data)
            elif isinstance(ev, h11.EndOfMessage):
                return b"".join(parts)
            else:  # ConnectionClosed / PAUSED: the client went away mid-body
                raise ConnectionResetError("client closed the connection")

    async def watch_hangup(self) -> None:
        """Returns when the peer closes the connection. Pipelined bytes are
        kept for h11 (the next request), and the watch ends: the peer lives."""
        try:
            data = await self.reader.read(READ_SIZE)
        except (ConnectionError, OSError):
            data = b""
        if data:
            self.h11.receive_data(data)
            await asyncio.Future()      # alive: wait until cancelled
        self.closed = True


class Request:
    def __init__(self, conn: Conn, ev: h11.Request):
        self.conn = conn
        self.method = ev.method.decode("ascii", "replace").upper()
        self.target = ev.target.decode("ascii", "replace")
        url = urllib.parse.urlsplit(self.target)
        self.path = [urllib.parse.unquote(p) for p in url.path.split("/") if p]
        self.query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        self.headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in ev.headers}
        self.started = False      # response headers sent

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()

    async def json(self) -> dict:
        body = await self.conn.read_body()
        if not body.strip():
            return {}
        try:
            obj = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise HttpError(400, f"request body is not valid JSON: {e}")
        if not isinstance(obj, dict):
            raise HttpError(400, "request body must be a JSON object")
        return obj

    def q1(self, key: str) -> str | None:
        v = self.query.get(key)
        return v[-1] if v else None

    async def start(self, status: int, content_type: str, length: int | None = None,
                    extra: list | None = None) -> None:
        headers = [(b"content-type", content_type.encode()), (b"server", SERVER_NAME)]
        if length is not None:
            headers.append((b"content-length", str(length).encode()))
        headers += extra or []
        self.started = True
        await self.conn.send(h11.Response(status_code=status, headers=headers,
                                          reason=reason_phrase(status)))

    async def reply(self, status: int, obj: Any, extra: list | None = None) -> None:
        body = (json.dumps(obj) + "\n").encode()
        await self.start(status, "application/json", len(body), extra)
        await self.conn.send(h11.Data(data=body))
        await self.conn.send(h11.EndOfMessage())
