"""Server side of one intercepted sandbox HTTP connection (plain, or TLS already terminated).

Policy is decided per request through the `decide` callback, so a handler swapped on a
live keep-alive connection applies to the next request. Bodies are relayed chunk by
chunk in both directions, pulled only as fast as the other side accepts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Optional
from urllib.parse import urlsplit

import h11
from ..log import get_logger

from .client import READ_SIZE, ClientConnection, UpstreamError, open_connection, strip_hop_by_hop
from .handlers import Context, call_handler
from .models import Headers, Request, Response
from .policy import Decision

__all__ = ["serve_connection", "Connector", "DecideFn", "default_connector"]

log = get_logger("sandbox.proxy")

Address = tuple[str, int]
DecideFn = Callable[[Optional[str], Address], Decision]
# (original destination, TLS server name or None for plain TCP) -> streams to the real server
Connector = Callable[[Address, Optional[str]], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]

# A request body left unread by a handler is drained (discarded) up to this size to keep
# the connection alive; beyond it, closing is cheaper than reading.
DRAIN_LIMIT = 1 << 20
_NO_BODY_STATUS = (204, 304)
SMALL_BODY = 64 * 1024


async def default_connector(dst: Address, server_name: Optional[str]
                            ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to the original destination; TLS (verified) when the sandbox spoke TLS."""
    return await open_connection(dst[0], dst[1], tls=server_name is not None, server_name=server_name)


class _ClientGone(Exception):
    """The sandbox side closed or broke the connection; nothing more can be sent."""


class _Session:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, dst: Address,
                 decide: DecideFn, ctx: Context, connect: Connector, scheme: str,
                 server_name: Optional[str], idle_timeout: Optional[float]) -> None:
        self.reader, self.writer = reader, writer
        self.dst, self.decide, self.ctx, self.connect = dst, decide, ctx, connect
        self.scheme, self.server_name, self.idle_timeout = scheme, server_name, idle_timeout
        self.conn = h11.Connection(h11.SERVER)
        self.upstream: Optional[ClientConnection] = None

    # -- wire ---------------------------------------------------------------------------
    async def _next_event(self, timeout: Optional[float] = None) -> object:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            try:
                async with asyncio.timeout(timeout):
                    data = await self.reader.read(READ_SIZE)
            except (ConnectionError, ssl.SSLError) as exc:
                raise _ClientGone(str(exc)) from None
            self.conn.receive_data(data)

    async def _write(self, event: object) -> None:
        data = self.conn.send(event)  # type: ignore[arg-type]
        if data:
            try:
                self.writer.write(data)
                await self.writer.drain()  # backpressure from a slow sandbox reader
            except (ConnectionError, ssl.SSLError) as exc:
                raise _ClientGone(str(exc)) from None

    # -- request ------------------------------------------------------------------------
    async def _request_body(self, counter: list[int]) -> AsyncIterator[bytes]:
        if self.conn.they_are_waiting_for_100_continue:
            await self._write(h11.InformationalResponse(status_code=100, headers=[]))
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                counter[0] += len(event.data)
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            else:
                raise _ClientGone("sandbox closed in the middle of a request body")

    def _build_request(self, event: h11.Request, counter: list[int]) -> tuple[Request, Optional[str]]:
        headers = Headers([(n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers.raw_items()])
        target = event.target.decode("latin-1")
        host = headers.get("host")
        if target.startswith(("http://", "https://")):
            # Absolute-form: its authority overrides Host (RFC 9112 §3.2.2).
            absolute = urlsplit(target)
            host = absolute.netloc
            target = (absolute.path or "/") + (f"?{absolute.query}" if absolute.query else "")
        elif not target.startswith("/"):
            raise ValueError(f"unsupported request target {target!r}")
        authority = host or (f"[{self.dst[0]}]" if ":" in self.dst[0] else self.dst[0])
        if not host and self.dst[1] != (443 if self.scheme == "https" else 80):
            authority += f":{self.dst[1]}"
        has_body = "content-length" in headers or "transfer-encoding" in headers
        # A body-less request gets bytes, so egress can retry it on a stale keep-alive.
        body = self._request_body(counter) if has_body else b""
        return Request(event.method.decode("ascii"), f"{self.scheme}://{authority}{target}", headers, body), host

    # -- response -----------------------------------------------------------------------
    async def _send_response(self, resp: Response, method: str) -> int:
        headers = strip_hop_by_hop(resp.headers)
        no_body = method == "HEAD" or resp.status in _NO_BODY_STATUS
        if resp.body_length is not None and not no_body:
            headers["Content-Length"] = str(resp.body_length)
        head = h11.Response(status_code=resp.status,
                            headers=[(n.encode("latin-1"), v.encode("latin-1"))
                                     for n, v in headers.raw_items()])
        if no_body or (resp.body_length is not None and resp.body_length <= SMALL_BODY):
            # One write, one segment: a small response is not worth a second
            # send() and a second packet.
            body = b"" if no_body else await resp.read()
            parts = [self.conn.send(head)]
            if body:
                parts.append(self.conn.send(h11.Data(data=body)))
            parts.append(self.conn.send(h11.EndOfMessage()))
            try:
                self.writer.write(b"".join(p for p in parts if p))
                await self.writer.drain()
            except (ConnectionError, ssl.SSLError) as exc:
                raise _ClientGone(str(exc)) from None
            return len(body)
        await self._write(head)
        sent = 0
        if not no_body:
            async with contextlib.aclosing(resp.body) as body:
                async for chunk in body:
                    sent += len(chunk)
                    await self._write(h11.Data(data=chunk))
        await self._write(h11.EndOfMessage())
        return sent

    async def _plain(self, status: int, text: str, method: str) -> int:
        return await self._send_response(Response(text, status=status), method)

    # -- egress -------------------------------------------------------------------------
    async def _egress(self, request: Request) -> Response:
        for attempt in range(2):
            fresh = self.upstream is None or not self.upstream.reusable
            if fresh:
                if self.upstream is not None:
                    await self.upstream.aclose()
                tls_name = (self.server_name or self.dst[0]) if self.scheme == "https" else None
                self.upstream = ClientConnection(*await self.connect(self.dst, tls_name))
            assert self.upstream is not None
            try:
                return await self.upstream.send(request)
            except (UpstreamError, ConnectionError):
                # A kept-alive upstream may have closed while idle; only a request whose
                # body we still hold whole can be sent again.
                if fresh or attempt or request.body_length is None:
                    raise
        raise AssertionError("unreachable")

    # -- one request --------------------------------------------------------------------
    async def serve_one(self, event: h11.Request) -> bool:
        loop = asyncio.get_running_loop()
        started = loop.time()
        counter = [0]
        method = event.method.decode("ascii", "replace")
        fields: dict[str, object] = {"sandbox": self.ctx.sandbox_id, "method": method}
        decision: Optional[Decision] = None
        status, sent = 0, 0
        try:
            try:
                request, host = self._build_request(event, counter)
            except ValueError as exc:
                fields.update(host=None, rule=None, action="bad_request")
                log.warning("proxy.bad_request", sandbox=self.ctx.sandbox_id, error=str(exc))
                status, sent = 400, await self._plain(400, "bad request\n", method)
                return False
            try:
                decision = self.decide(host, self.dst)
            except Exception as exc:  # a policy bug must not take the connection down
                log.error("proxy.decide_error", sandbox=self.ctx.sandbox_id, error=repr(exc), exc_info=True)
                fields.update(host=host, rule=None, action="error")
                status, sent = 502, await self._plain(502, "policy error\n", method)
                return await self._finish_cycle()
            fields.update(host=decision.host, rule=decision.rule, action=decision.kind)
            if decision.kind == "deny":
                status, sent = 403, await self._plain(403, decision.deny_message, method)
            else:
                try:
                    if decision.kind == "handler":
                        response = await call_handler(decision.handler, request, self.ctx)
                    else:
                        response = await self._egress(request)
                except _ClientGone:
                    raise
                except Exception as exc:
                    # A failing handler or upstream costs this request only: 502, and the
                    # sandbox's connection stays usable.
                    log.error("proxy.handler_error" if decision.kind == "handler" else "proxy.upstream_error",
                              sandbox=self.ctx.sandbox_id, host=decision.host, rule=decision.rule,
                              error=repr(exc), exc_info=decision.kind == "handler")
                    text = "handler error\n" if decision.kind == "handler" else "upstream error\n"
                    status, sent = 502, await self._plain(502, text, method)
                else:
                    status = response.status
                    sent = await self._send_response(response, method)
        finally:
            fields.setdefault("host", None)
            fields.setdefault("rule", None)
            fields.setdefault("action", None)
            log.info("proxy.decision", status=status, bytes=sent, req_bytes=counter[0],
                     ms=round((loop.time() - started) * 1000, 3), **fields)
        return await self._finish_cycle()

    async def _finish_cycle(self) -> bool:
        """Get ready for the next request on this connection; False to close."""
        if self.conn.our_state is not h11.DONE:
            return False
        drained = 0
        while self.conn.their_state is h11.SEND_BODY and drained <= DRAIN_LIMIT:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                drained += len(event.data)
            elif not isinstance(event, h11.EndOfMessage):
                return False
        if self.conn.their_state is not h11.DONE:
            return False
        self.conn.start_next_cycle()
        return True

    async def run(self) -> None:
        while True:
            try:
                event = await self._next_event(self.idle_timeout)
            except h11.RemoteProtocolError:
                if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    # h11 is in ERROR now and will not frame a response: write it raw.
                    self.writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                                      b"Connection: close\r\n\r\n")
                    await self.writer.drain()
                return
            if not isinstance(event, h11.Request):
                return  # ConnectionClosed (or junk): done
            if not await self.serve_one(event):
                return


async def serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                           dst: Address, decide: DecideFn, ctx: Context,
                           connect: Connector = default_connector, scheme: str = "http",
                           server_name: Optional[str] = None,
                           idle_timeout: Optional[float] = 300.0) -> None:
    """Serve HTTP/1.1 requests from one sandbox connection until it closes.

    `dst`: the original destination (ip, port). `decide(host_header, dst)` is called for
    every request. `scheme`/`server_name`: "https" and the SNI when TLS was terminated
    before this call (egress then re-encrypts to `dst`, verifying `server_name`).
    Never raises for network or protocol errors; always closes `writer`.
    """
    if scheme not in ("http", "https"):
        raise ValueError(f"scheme must be http or https: {scheme!r}")
    session = _Session(reader, writer, dst, decide, ctx, connect, scheme, server_name, idle_timeout)
    try:
        await session.run()
    except (_ClientGone, TimeoutError, h11.ProtocolError, ConnectionError, ssl.SSLError) as exc:
        log.debug("proxy.connection_closed", sandbox=ctx.sandbox_id, reason=repr(exc))
    except Exception as exc:  # e.g. a handler's body stream failing after the head was sent
        log.error("proxy.connection_error", sandbox=ctx.sandbox_id, error=repr(exc), exc_info=True)
    finally:
        if session.upstream is not None:
            await session.upstream.aclose()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
