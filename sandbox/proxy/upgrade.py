"""WebSocket (HTTP `Upgrade`) relay (SPEC §10): the request is decided like any other;
when it egresses, it is sent upstream with its Upgrade headers, and if the upstream
switches protocols (101) the sandbox's connection and the upstream's are spliced both
ways until either ends. A refusal (any other status) is relayed as a normal response.

Only `websocket` upgrades are relayed: any other `Upgrade` (h2c, ...) is dropped as the
hop-by-hop header it is, and the request served as plain HTTP/1.1 — so that per-request
policy keeps applying to everything but a WebSocket's frames.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Optional
from urllib.parse import urlsplit

import h11

from .client import READ_SIZE, strip_hop_by_hop
from .egress import WRITE_TIMEOUT, close_writer, open_upstream, splice
from .models import Headers, Request, Response
from .policy import Decision

if TYPE_CHECKING:  # pragma: no cover
    from .http import _Session

__all__ = ["is_websocket", "relay_upgrade"]

UPSTREAM_HEAD_TIMEOUT = 60.0


def _tokens(headers: Headers, name: str) -> set[str]:
    return {t.strip().lower() for v in headers.get_all(name) for t in v.split(",")}


def is_websocket(request: Request) -> bool:
    return "websocket" in _tokens(request.headers, "upgrade") and "upgrade" in _tokens(request.headers, "connection")


def _raw(headers: Headers) -> list[tuple[bytes, bytes]]:
    return [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers.raw_items()]


async def relay_upgrade(session: "_Session", request: Request, decision: Decision,
                        tls_name: Optional[str]) -> tuple[int, int]:
    """-> (status sent to the sandbox, bytes relayed). 101: the connection was spliced
    to its end and must not be used for HTTP again."""
    up_reader, up_writer = await open_upstream(decision, resolve=session.resolve, connect=session.connect,
                                               tls_name=tls_name)
    try:
        client = h11.Connection(h11.CLIENT)

        async def send(event: object) -> None:
            data = client.send(event)  # type: ignore[arg-type]
            if data:
                up_writer.write(data)
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await up_writer.drain()

        async def next_event() -> object:
            while True:
                event = client.next_event()
                if event is not h11.NEED_DATA:
                    return event
                async with asyncio.timeout(UPSTREAM_HEAD_TIMEOUT):
                    client.receive_data(await up_reader.read(READ_SIZE))

        parts = urlsplit(request.url)
        headers = strip_hop_by_hop(request.headers)
        headers["Connection"] = "Upgrade"
        headers["Upgrade"] = request.headers["upgrade"]
        if "host" not in headers:
            headers["Host"] = parts.netloc
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        await send(h11.Request(method=request.method, target=target, headers=_raw(headers)))
        async for chunk in request.body:
            await send(h11.Data(data=chunk))
        await send(h11.EndOfMessage())
        # The sandbox's side must be at the end of its request before h11 lets us switch.
        while session.conn.their_state is h11.SEND_BODY:
            event = await session._next_event()
            if not isinstance(event, (h11.Data, h11.EndOfMessage)):
                return 0, 0
        while True:
            event = await next_event()
            if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
                break
            if isinstance(event, h11.InformationalResponse):
                continue
            if not isinstance(event, h11.Response):
                raise ConnectionError("upstream closed before answering the upgrade")
            # Refused: an ordinary response, relayed as such.
            resp = Response(_body(client, next_event), status=event.status_code,
                            headers=[(n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers.raw_items()])
            return resp.status, await session._send_response(resp, request.method)
        switched = strip_hop_by_hop(Headers([(n.decode("latin-1"), v.decode("latin-1"))
                                             for n, v in event.headers.raw_items()]))
        switched["Connection"] = "Upgrade"
        switched["Upgrade"] = request.headers["upgrade"]
        await session._write(h11.InformationalResponse(status_code=101, headers=_raw(switched)))
        # Bytes either side sent after its head belong to the new protocol.
        from_sandbox, _ = session.conn.trailing_data
        from_upstream, _ = client.trailing_data
        if from_upstream:
            session.writer.write(from_upstream)
        if from_sandbox:
            up_writer.write(from_sandbox)
        counter = [len(from_sandbox) + len(from_upstream)]
        with contextlib.suppress(ConnectionError, OSError, TimeoutError):
            await splice((session.reader, session.writer), (up_reader, up_writer), counter=counter)
        return 101, counter[0]
    finally:
        await close_writer(up_writer)


async def _body(client: h11.Connection, next_event) -> AsyncIterator[bytes]:  # type: ignore[no-untyped-def]
    while True:
        event = await next_event()
        if isinstance(event, h11.Data):
            yield bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            return
        else:
            raise ConnectionError("upstream closed in the middle of a response")
