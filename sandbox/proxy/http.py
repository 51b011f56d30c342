"""Server side of one intercepted sandbox HTTP connection (plain, or TLS already terminated).

Policy is decided per request through the `decide` callback, so a handler swapped on a
live keep-alive connection applies to the next request. Bodies are relayed chunk by
chunk in both directions, pulled only as fast as the other side accepts them.

Everything here is sandbox-controlled input (SPEC §9), so every wait is bounded: the
first byte of a request within `idle_timeout`, the rest of its head within
`HEAD_TIMEOUT` (slowloris), each body read within `BODY_IDLE`, each write accepted
within `WRITE_TIMEOUT` (a sandbox that never reads gets backpressure, then a close —
never buffering); heads are at most `MAX_HEAD` bytes (h11 answers 431 beyond).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Optional
from urllib.parse import urlsplit

import h11
from ..log import get_logger

from .client import READ_SIZE, ClientConnection, UpstreamError, open_connection, strip_hop_by_hop
from .egress import WRITE_TIMEOUT, Connector, EgressDenied, close_writer, open_upstream
from .handlers import Context, call_handler
from .models import Headers, Request, Response
from .policy import BadHost, Decision, parse_authority
from .resolve import Resolve, ResolveError, no_resolver
from .upgrade import is_websocket, relay_upgrade
from .wire import normalize_path, strip_runtime_headers

__all__ = ["serve_connection", "Connector", "DecideFn", "default_connector"]

log = get_logger("sandbox.proxy")

Address = tuple[str, int]
DecideFn = Callable[[Optional[str], Address], Decision]

# A request body left unread by a handler is drained (discarded) up to this size to keep
# the connection alive; beyond it, closing is cheaper than reading.
DRAIN_LIMIT = 1 << 20
_NO_BODY_STATUS = (204, 304)
SMALL_BODY = 64 * 1024
MAX_HEAD = 16 * 1024     # request line + headers
HEAD_TIMEOUT = 30.0      # from a request's first byte to its complete head
BODY_IDLE = 60.0         # between two pieces of a request body
UPSTREAM_IDLE = 300.0    # between two pieces of an upstream response (long polls fit)
LINGER, LINGER_BYTES = 2.0, 1 << 20   # after an error answer, before the close


async def default_connector(dst: Address, server_name: Optional[str]
                            ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to `dst` (an address: names were resolved before); TLS (verified against
    `server_name`) when the sandbox spoke TLS."""
    return await open_connection(dst[0], dst[1], tls=server_name is not None, server_name=server_name)


class _ClientGone(Exception):
    """The sandbox side closed or broke the connection; nothing more can be sent."""


def _authority(host: str, port: Optional[int]) -> str:
    text = f"[{host}]" if ":" in host else host
    return text if port is None else f"{text}:{port}"


class _Session:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, dst: Address,
                 decide: DecideFn, ctx: Context, connect: Connector, resolve: Resolve, scheme: str,
                 server_name: Optional[str], idle_timeout: Optional[float]) -> None:
        self.reader, self.writer = reader, writer
        self.dst, self.decide, self.ctx, self.connect = dst, decide, ctx, connect
        self.resolve = resolve
        self.scheme, self.server_name, self.idle_timeout = scheme, server_name, idle_timeout
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.upstream: Optional[ClientConnection] = None
        self.upstream_key: object = None
        self.upstream_ip: Optional[str] = None
        self.linger = False  # we close after an error answer: let the client read it

    async def linger_close(self) -> None:
        """Half-close, then read and discard what the client still sends (bounded in time
        and bytes) before closing: closing with unread bytes would send an RST, which
        can destroy our error answer before the client has read it."""
        if not self.writer.can_write_eof() or self.writer.is_closing():
            return
        with contextlib.suppress(Exception):
            self.writer.write_eof()
            discarded = 0
            async with asyncio.timeout(LINGER):
                while discarded < LINGER_BYTES and (data := await self.reader.read(READ_SIZE)):
                    discarded += len(data)

    # -- wire ---------------------------------------------------------------------------
    async def _read(self, timeout: Optional[float]) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                return await self.reader.read(READ_SIZE)
        except (ConnectionError, ssl.SSLError) as exc:
            raise _ClientGone(str(exc)) from None

    async def _next_event(self, timeout: Optional[float] = BODY_IDLE) -> object:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(await self._read(timeout))

    async def _next_request(self) -> object:
        """The next request head: its first byte within idle_timeout, the whole head
        within HEAD_TIMEOUT of that (TimeoutError otherwise: the connection closes)."""
        loop = asyncio.get_running_loop()
        deadline: Optional[float] = None
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            timeout = self.idle_timeout if deadline is None else max(0.0, deadline - loop.time())
            data = await self._read(timeout)
            if deadline is None:
                deadline = loop.time() + HEAD_TIMEOUT
            self.conn.receive_data(data)

    async def _drain(self) -> None:
        try:
            if self.writer.transport.get_write_buffer_size() == 0:
                await self.writer.drain()  # nothing queued: returns at once, no timer needed
                return
            async with asyncio.timeout(WRITE_TIMEOUT):  # backpressure from a slow sandbox reader
                await self.writer.drain()
        except (ConnectionError, ssl.SSLError, TimeoutError) as exc:
            raise _ClientGone(repr(exc)) from None

    async def _write(self, event: object) -> None:
        data = self.conn.send(event)  # type: ignore[arg-type]
        if data:
            try:
                self.writer.write(data)
            except (ConnectionError, ssl.SSLError) as exc:
                raise _ClientGone(str(exc)) from None
            await self._drain()

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
        """The request as handlers and the upstream see it, and the normalised authority
        policy decides on. ValueError (400) for anything ambiguous (SPEC §10): several
        Host headers, a Host that disagrees with an absolute-form target, a malformed
        host, a target that is neither origin- nor absolute-form."""
        headers = Headers(strip_runtime_headers(
            [(n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers.raw_items()]))
        hosts = headers.get_all("host")
        if len(hosts) > 1:
            raise BadHost("several Host headers")
        host = hosts[0] if hosts else None
        target = event.target.decode("latin-1")
        if "#" in target:
            raise ValueError("fragment in request target")
        default_port = 443 if self.scheme == "https" else 80
        if target[:8].lower().startswith(("http://", "https://")):
            absolute = urlsplit(target)
            if absolute.scheme.lower() != self.scheme:
                raise BadHost(f"{absolute.scheme} request target on an {self.scheme} connection")
            said = parse_authority(absolute.netloc)
            if host is not None:
                h = parse_authority(host)
                if (h[0], h[1] or default_port) != (said[0], said[1] or default_port):
                    raise BadHost("Host header disagrees with the request target")
            host = absolute.netloc
            path, query = absolute.path or "/", absolute.query
            has_query = "?" in target
        elif target.startswith("/"):
            path, has_query, query = target.partition("?")
            has_query = bool(has_query)
        else:
            raise ValueError(f"unsupported request target {target!r}")
        path = normalize_path(path) + (f"?{query}" if has_query else "")
        if host is not None:
            authority = _authority(*parse_authority(host))
            # The upstream receives the Host the decision is made on (normalised).
            headers["Host"] = authority
        else:
            authority = _authority(self.dst[0], None if self.dst[1] == default_port else self.dst[1])
        has_body = "content-length" in headers or "transfer-encoding" in headers
        # A body-less request gets bytes, so egress can retry it on a stale keep-alive.
        body = self._request_body(counter) if has_body else b""
        request = Request(event.method.decode("ascii"), f"{self.scheme}://{authority}{path}", headers, body)
        return request, (authority if host is not None else None)

    # -- response -----------------------------------------------------------------------
    async def _send_response(self, resp: Response, method: str, close: bool = False) -> int:
        headers = strip_hop_by_hop(resp.headers)
        if close:
            headers["Connection"] = "close"  # so the client does not reuse what we close
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
            except (ConnectionError, ssl.SSLError) as exc:
                raise _ClientGone(str(exc)) from None
            await self._drain()
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

    async def _plain(self, status: int, text: str, method: str, close: bool = False) -> int:
        self.linger = self.linger or close
        return await self._send_response(Response(text, status=status), method, close)

    # -- egress -------------------------------------------------------------------------
    def _tls_name(self, decision: Decision) -> Optional[str]:
        if self.scheme != "https":
            return None
        assert decision.upstream is not None
        # A name egress verifies that name; an IP egress the SNI the sandbox sent, if any.
        return decision.upstream[0] if decision.by_name else (self.server_name or decision.upstream[0])

    async def _egress(self, request: Request, decision: Decision) -> Response:
        tls_name = self._tls_name(decision)
        key = (decision.upstream, decision.by_name, tls_name)
        for attempt in range(2):
            up = self.upstream
            fresh = (up is None or not up.reusable or self.upstream_key != key
                     or (self.upstream_ip is not None and decision.upstream is not None
                         and decision.refuses_address(self.upstream_ip, decision.upstream[1])))
            if fresh:
                if up is not None:
                    self.upstream = None
                    await up.aclose()
                reader, writer = await open_upstream(decision, resolve=self.resolve, connect=self.connect,
                                                     tls_name=tls_name)
                peer = writer.get_extra_info("peername")
                self.upstream_ip = peer[0] if peer else None
                self.upstream = ClientConnection(reader, writer, read_timeout=UPSTREAM_IDLE,
                                                 write_timeout=WRITE_TIMEOUT)
                self.upstream_key = key
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
            if method == "CONNECT":
                # Not a forward proxy: a tunnel to an arbitrary host:port is not HTTP policy.
                fields.update(action="bad_request")
                status, sent = 405, await self._plain(405, "CONNECT is not supported\n", method, close=True)
                return False
            try:
                request, authority = self._build_request(event, counter)
                decision = self.decide(authority, self.dst)
            except ValueError as exc:  # BadHost included: ambiguous, so refused (SPEC §10)
                fields.update(rule=None, action="bad_request")
                log.info("proxy.bad_request", sandbox=self.ctx.sandbox_id, error=str(exc))
                status, sent = 400, await self._plain(400, f"bad request: {exc}\n", method, close=True)
                return False
            except Exception as exc:  # a policy bug must not take the connection down
                log.error("proxy.decide_error", sandbox=self.ctx.sandbox_id, error=repr(exc), exc_info=True)
                fields.update(rule=None, action="error")
                status, sent = 502, await self._plain(502, "policy error\n", method)
                return await self._finish_cycle()
            fields.update(host=decision.host, rule=decision.rule, action=decision.kind)
            if decision.kind == "deny":
                status, sent = 403, await self._plain(403, decision.deny_message, method)
            else:
                status, sent = await self._respond(request, decision, method)
                if status == 101:
                    fields.update(action="upgrade")
                    return False  # the connection was spliced to its end
        finally:
            fields.setdefault("host", None)
            fields.setdefault("rule", None)
            fields.setdefault("action", None)
            log.info("proxy.decision", status=status, bytes=sent, req_bytes=counter[0],
                     ms=round((loop.time() - started) * 1000, 3), **fields)
        return await self._finish_cycle()

    async def _respond(self, request: Request, decision: Decision, method: str) -> tuple[int, int]:
        try:
            if decision.kind == "handler":
                response = await call_handler(decision.handler, request, self.ctx)
            elif is_websocket(request):
                return await relay_upgrade(self, request, decision, self._tls_name(decision))
            else:
                response = await self._egress(request, decision)
        except _ClientGone:
            raise
        except EgressDenied as exc:
            return 403, await self._plain(403, str(exc), method)
        except ResolveError as exc:
            log.info("proxy.resolve_failed", sandbox=self.ctx.sandbox_id, host=decision.host, error=str(exc))
            return 502, await self._plain(502, f"{exc}\n", method)
        except Exception as exc:
            # A failing handler or upstream costs this request only: 502, and the
            # sandbox's connection stays usable.
            log.error("proxy.handler_error" if decision.kind == "handler" else "proxy.upstream_error",
                      sandbox=self.ctx.sandbox_id, host=decision.host, rule=decision.rule,
                      error=repr(exc), exc_info=decision.kind == "handler")
            text = "handler error\n" if decision.kind == "handler" else "upstream error\n"
            return 502, await self._plain(502, text, method)
        return response.status, await self._send_response(response, method)

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
                event = await self._next_request()
            except h11.RemoteProtocolError as exc:
                if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    # h11 is in ERROR now and will not frame a response: write it raw
                    # (431 for an oversized head, 400 otherwise).
                    status = exc.error_status_hint if exc.error_status_hint in (400, 431) else 400
                    reason = b"Request Header Fields Too Large" if status == 431 else b"Bad Request"
                    self.writer.write(b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                                      % (status, reason))
                    self.linger = True
                    await self._drain()
                return
            if not isinstance(event, h11.Request):
                return  # ConnectionClosed (or junk): done
            if not await self.serve_one(event):
                return


async def serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                           dst: Address, decide: DecideFn, ctx: Context,
                           connect: Connector = default_connector, resolve: Resolve = no_resolver,
                           scheme: str = "http", server_name: Optional[str] = None,
                           idle_timeout: Optional[float] = 300.0) -> None:
    """Serve HTTP/1.1 requests from one sandbox connection until it closes.

    `dst`: the original destination (ip, port). `decide(authority, dst)` is called for
    every request, with the normalised Host (or None). `resolve(name)`: the runtime's
    pinned resolver, for decisions that egress to a name. `scheme`/`server_name`:
    "https" and the SNI when TLS was terminated before this call (egress then
    re-encrypts, verifying the name it goes to). Never raises for network or protocol
    errors; always closes `writer`.
    """
    if scheme not in ("http", "https"):
        raise ValueError(f"scheme must be http or https: {scheme!r}")
    session = _Session(reader, writer, dst, decide, ctx, connect, resolve, scheme, server_name, idle_timeout)
    try:
        await session.run()
    except (_ClientGone, TimeoutError, h11.ProtocolError, ConnectionError, ssl.SSLError) as exc:
        log.debug("proxy.connection_closed", sandbox=ctx.sandbox_id, reason=repr(exc))
    except Exception as exc:  # e.g. a handler's body stream failing after the head was sent
        log.error("proxy.connection_error", sandbox=ctx.sandbox_id, error=repr(exc), exc_info=True)
    finally:
        if session.upstream is not None:
            await session.upstream.aclose()
        if session.linger:
            await session.linger_close()
        await close_writer(writer)
