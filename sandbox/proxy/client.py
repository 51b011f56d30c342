"""A small streaming HTTP/1.1 client (h11 over asyncio streams).

Used for egress (one upstream connection reused per sandbox connection), for URL-string
handlers, and as `sandbox.fetch`. Bodies are streamed both ways chunk by chunk with
`drain()` between chunks, so memory stays bounded whatever the body size.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from typing import Optional
from urllib.parse import urlsplit

import h11

from .models import BodyLike, Headers, HeadersLike, Request, Response

__all__ = ["ClientConnection", "fetch", "open_connection", "strip_hop_by_hop", "UpstreamError"]

READ_SIZE = 64 * 1024

# RFC 9110 §7.6.1: meaningful for one hop only; a proxy must not forward them. Framing
# (Transfer-Encoding) is redone by h11 for each hop.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
    "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade",
})


class UpstreamError(ConnectionError):
    """The upstream closed or spoke broken HTTP before a complete response."""


def strip_hop_by_hop(headers: Headers) -> Headers:
    """A copy without hop-by-hop headers, including those named in `Connection`."""
    named = {t.strip().lower() for v in headers.get_all("connection") for t in v.split(",")}
    out = Headers()
    for name, value in headers.raw_items():
        low = name.lower()
        if low not in HOP_BY_HOP and low not in named:
            out.add(name, value)
    return out


def _h11_headers(headers: Headers) -> list[tuple[bytes, bytes]]:
    return [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers.raw_items()]


def _from_h11_headers(raw: h11._headers.Headers) -> Headers:  # type: ignore[name-defined]
    return Headers([(n.decode("latin-1"), v.decode("latin-1")) for n, v in raw.raw_items()])


async def open_connection(host: str, port: int, *, tls: bool = False, server_name: Optional[str] = None,
                          ssl_context: Optional[ssl.SSLContext] = None
                          ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """TCP (and TLS, verified against the system CAs unless `ssl_context` says otherwise)."""
    if not tls:
        return await asyncio.open_connection(host, port, limit=READ_SIZE * 2)
    ctx = ssl_context
    if ctx is None:
        ctx = ssl.create_default_context()
        ctx.set_alpn_protocols(["http/1.1"])  # we speak h11 only
    return await asyncio.open_connection(host, port, ssl=ctx, server_hostname=server_name or host,
                                         limit=READ_SIZE * 2)


class ClientConnection:
    """One HTTP/1.1 connection: requests in sequence, response bodies streamed.

    `send` returns as soon as the response head arrived; the connection is reusable
    (`reusable`) once that response's body was read to the end.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 read_timeout: Optional[float] = None, write_timeout: Optional[float] = None) -> None:
        self._reader = reader
        self._writer = writer
        # None: wait as long as the peer takes (sandbox.fetch); the proxy bounds both.
        self._read_timeout, self._write_timeout = read_timeout, write_timeout
        self._conn = h11.Connection(h11.CLIENT)
        self._busy = False
        self._closed = False

    @property
    def reusable(self) -> bool:
        return (not self._closed and not self._busy and self._conn.our_state is h11.IDLE
                and not self._reader.at_eof() and not self._writer.is_closing())

    async def _write(self, event: h11._events.Event) -> None:  # type: ignore[name-defined]
        data = self._conn.send(event)
        if data:
            self._writer.write(data)
            async with asyncio.timeout(self._write_timeout):
                await self._writer.drain()  # backpressure: wait while the peer is slow

    async def _next_event(self) -> h11._events.Event:  # type: ignore[name-defined]
        while True:
            event = self._conn.next_event()
            if event is h11.NEED_DATA:
                async with asyncio.timeout(self._read_timeout):
                    data = await self._reader.read(READ_SIZE)
                self._conn.receive_data(data)
                continue
            return event

    async def send(self, request: Request) -> Response:
        if self._busy or self._closed:
            raise RuntimeError("connection busy or closed")
        self._busy = True
        try:
            return await self._send(request)
        except BaseException:
            await self.aclose()
            raise

    async def _send(self, request: Request) -> Response:
        parts = urlsplit(request.url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = strip_hop_by_hop(request.headers)
        if "host" not in headers:
            headers["Host"] = parts.netloc.rpartition("@")[2]
        length = request.body_length
        if length is not None:
            if length or request.method not in ("GET", "HEAD", "DELETE", "OPTIONS", "TRACE"):
                headers["Content-Length"] = str(length)
            else:
                headers.pop("content-length", None)
        elif "content-length" not in headers:
            # Without explicit framing h11 (rightly) assumes an empty request body.
            headers["Transfer-Encoding"] = "chunked"
        await self._write(h11.Request(method=request.method, target=target, headers=_h11_headers(headers)))
        async for chunk in request.body:
            await self._write(h11.Data(data=chunk))
        await self._write(h11.EndOfMessage())
        while True:
            try:
                event = await self._next_event()
            except h11.RemoteProtocolError as exc:
                raise UpstreamError(f"bad response from upstream: {exc}") from None
            if isinstance(event, h11.InformationalResponse):
                continue  # 100 Continue and friends: not for our caller
            if isinstance(event, h11.ConnectionClosed):
                raise UpstreamError("upstream closed before responding")
            if isinstance(event, h11.Response):
                break
        if not 200 <= event.status_code <= 599:
            raise UpstreamError(f"upstream sent status {event.status_code}")
        return Response(self._response_body(), status=event.status_code,
                        headers=_from_h11_headers(event.headers))

    async def _response_body(self) -> AsyncIterator[bytes]:
        done = False
        try:
            while True:
                try:
                    event = await self._next_event()
                except h11.RemoteProtocolError as exc:
                    raise UpstreamError(f"bad response body from upstream: {exc}") from None
                if isinstance(event, h11.Data):
                    yield bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    done = True
                    return
                else:
                    raise UpstreamError("upstream closed in the middle of a response")
        finally:
            if done and self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE:
                self._conn.start_next_cycle()
                self._busy = False
            else:
                # Abandoned halfway or not keep-alive: the connection cannot carry another request.
                await self.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass


async def _closing_body(resp: Response, conn: ClientConnection) -> AsyncIterator[bytes]:
    try:
        async for chunk in resp.body:
            yield chunk
    finally:
        await conn.aclose()


async def fetch(request_or_url: Request | str, *, method: str = "GET", headers: HeadersLike = None,
                body: BodyLike = None, ssl_context: Optional[ssl.SSLContext] = None) -> Response:
    """Send one request from the runtime (outside every sandbox): `sandbox.fetch`.

    Returns once the response head arrived; the body streams (`.body`) or buffers
    (`read()`), and the connection closes when the body has been read.
    """
    if isinstance(request_or_url, Request):
        if method != "GET" or headers is not None or body is not None:
            raise TypeError("pass method/headers/body in the Request, not next to it")
        request = request_or_url
    elif isinstance(request_or_url, str):
        request = Request(method, request_or_url, headers, body)
    else:
        raise TypeError(f"fetch() takes a Request or a URL str, not {type(request_or_url).__name__}")
    parts = urlsplit(request.url)
    tls = parts.scheme == "https"
    try:
        port = parts.port or (443 if tls else 80)
    except ValueError:
        raise ValueError(f"bad port in url {request.url!r}") from None
    assert parts.hostname is not None
    reader, writer = await open_connection(parts.hostname, port, tls=tls, ssl_context=ssl_context)
    conn = ClientConnection(reader, writer)
    response = await conn.send(request)
    return Response(_closing_body(response, conn), status=response.status, headers=response.headers)
