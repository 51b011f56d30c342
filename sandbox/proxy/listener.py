"""The one transparent listener for every sandbox's outbound TCP 80/443 (DESIGN §3).

nft TPROXYs the sandboxes' connections here; an accepted socket's local address is the
original destination. The peer's address says which sandbox it is. Before asyncio owns
the socket we *peek* (MSG_PEEK) at the first bytes: a TLS ClientHello is decided by SNI
and then terminated (sandbox CA) or spliced untouched — with the ClientHello still
unread in the socket, so the TLS layer or the upstream sees the connection from its
first byte. (Reading the hello through a StreamReader and "putting it back" cannot work:
`start_tls` reads the raw socket, not the reader's buffer.) TLS is recognised by its
first byte, not by port, so HTTPS on 80 or HTTP on 443 are still policed.

A spliced (not intercepted) TLS connection goes where the decision says (SPEC §10): to
the SNI name resolved by the runtime, at the original port, when a name allowed it —
never to the address the sandbox dialled — and to that address only when an IP rule
allowed it (no SNI: IP rules only). Connections are counted per sandbox and in total
(`limits`); the excess is reset at once, and the accept loop backs off when the process
runs out of descriptors instead of spinning.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable
from typing import Optional, Protocol

from ..log import get_logger

from .dns import SyntheticNames
from .egress import EgressDenied, close_writer, open_upstream, splice
from .handlers import Context
from .http import Connector, default_connector, serve_connection
from .limits import AcceptBackoff, ConnectionLimits, LogLimiter, reset
from .policy import Decision, Facts, Policy, decide
from .resolve import Resolve, ResolveError, no_resolver
from .tls import NEED_MORE, CertificateAuthority, parse_sni

__all__ = ["ProxyServer", "SandboxView", "peek_first_bytes"]

log = get_logger("sandbox.proxy")

Address = tuple[str, int]
PEEK_TIMEOUT = 10.0       # a sandbox that opens a connection and sends nothing
HANDSHAKE_TIMEOUT = 10.0


class SandboxView(Protocol):
    """What the proxy reads, per connection and per request, about one sandbox."""

    sandbox_id: str
    policy: Policy
    ca: Optional[CertificateAuthority]


def _default_original_dst(sock: socket.socket) -> Address:
    host, port = sock.getsockname()[:2]  # TPROXY keeps the original destination here
    return host, port


async def _wait_readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    fut: asyncio.Future[None] = loop.create_future()
    loop.add_reader(sock.fileno(), lambda: fut.done() or fut.set_result(None))
    try:
        await fut
    finally:
        loop.remove_reader(sock.fileno())


async def peek_first_bytes(sock: socket.socket) -> bytes:
    """The first bytes of the connection, left unread: a whole ClientHello for TLS.

    SO_RCVLOWAT makes the socket readable only once the rest of the TLS record has
    arrived (a post-quantum ClientHello spans two segments), so this never spins. The
    result is partial TLS only when the peer closed (or stalled) mid-ClientHello.
    """
    loop = asyncio.get_running_loop()
    want, seen = 1, -1
    try:
        while True:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
            await _wait_readable(loop, sock)
            data = sock.recv(65536, socket.MSG_PEEK)
            if not data or data[0] != 0x16 or parse_sni(data) is not NEED_MORE:
                return data  # EOF; not TLS (plain HTTP or junk h11 will refuse); or decided
            if len(data) == seen:
                return data  # readable without new bytes: EOF after a partial ClientHello
            seen = len(data)
            want = _bytes_to_next_record_boundary(data)
    finally:
        # Back to the default, or asyncio would never see short reads (alerts, small requests).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


def _bytes_to_next_record_boundary(data: bytes) -> int:
    """How many bytes must be queued to complete the current TLS record (or to read
    the next record's header)."""
    pos = 0
    while pos + 5 <= len(data):
        end = pos + 5 + int.from_bytes(data[pos + 3:pos + 5], "big")
        if end > len(data):
            return min(end, 65536)
        pos = end
    return min(pos + 5, 65536)


async def _streams(sock: socket.socket, tls: Optional[ssl.SSLContext]
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2 ** 17)
    protocol = asyncio.StreamReaderProtocol(reader)
    transport, _ = await loop.connect_accepted_socket(
        lambda: protocol, sock, ssl=tls, ssl_handshake_timeout=HANDSHAKE_TIMEOUT if tls else None)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


class ProxyServer:
    """Accepts intercepted connections and serves them by the sandbox's current policy.

    `lookup(peer_ip)` returns the sandbox (a `SandboxView`) or None (connection
    dropped); `view.policy` is read again for every request. `names`: the DNS registry,
    so that a connection to a synthetic address without Host/SNI is still matched by the
    name it was resolved from. `resolve(name)`: the runtime's pinned resolver, where
    name egress goes. `limits`: per-sandbox and total connection bounds (default: from
    the fd limit at `start`). `transparent=False` and `original_dst` are for tests.
    """

    def __init__(self, lookup: Callable[[str], Optional[SandboxView]], *, names: Optional[SyntheticNames] = None,
                 listen: Address = ("127.0.0.1", 0), transparent: bool = True,
                 connect: Connector = default_connector, resolve: Resolve = no_resolver,
                 limits: Optional[ConnectionLimits] = None,
                 original_dst: Callable[[socket.socket], Address] = _default_original_dst) -> None:
        if not callable(lookup):
            raise TypeError("lookup must be callable")
        self._lookup, self._names, self._listen = lookup, names, listen
        self._transparent, self._connect, self._original_dst = transparent, connect, original_dst
        self._resolve = resolve
        self.limits = limits
        self._sock: Optional[socket.socket] = None
        self._accept_task: Optional[asyncio.Task[None]] = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._log = LogLimiter(log)
        self.refused = 0  # connections reset at once (over a limit, or not a sandbox)
        self.address: Optional[Address] = None

    async def start(self) -> Address:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self._transparent:
                # TPROXY delivers packets addressed to foreign IPs; only a socket with
                # IP_TRANSPARENT may accept them (needs CAP_NET_ADMIN).
                sock.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)
            sock.bind(self._listen)
            sock.listen(4096)  # a burst of connects from one sandbox is queued, not dropped
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self.address = sock.getsockname()[:2]
        if self.limits is None:
            self.limits = ConnectionLimits()
        self._accept_task = asyncio.create_task(self._accept_loop())
        return self.address

    async def __aenter__(self) -> ProxyServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop accepting and end every open connection. Idempotent."""
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
            self._accept_task = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None and self.limits is not None
        backoff = AcceptBackoff()
        while True:
            try:
                conn, peer = await loop.sock_accept(self._sock)
            except OSError as exc:
                # EMFILE/ENFILE leave the connection queued and the socket readable:
                # retrying at once would spin (and sock_accept fails without ever
                # yielding to the loop). Wait, then retry; log at most now and then.
                delay = backoff.failed(exc)
                self._log("error", "proxy.accept_error", error=repr(exc), retry_s=delay)
                await asyncio.sleep(delay or 0)
                continue
            await backoff.succeeded()
            peer_ip = peer[0]
            if self._lookup(peer_ip) is None:
                conn.close()  # not (or no longer) a sandbox
                self.refused += 1
                self._log("warning", "proxy.unknown_peer", peer=peer_ip)
                continue
            if not self.limits.acquire(peer_ip):
                # A sandbox over its share (or all over the total): an RST now, nothing
                # kept, no task, one log line now and then.
                reset(conn)
                self.refused += 1
                self._log("warning", "proxy.connection_refused", peer=peer_ip,
                          open=self.limits.count(peer_ip), total=self.limits.count())
                continue
            try:
                # Responses go out as head then body: without NODELAY the second
                # write waits for the sandbox's delayed ACK (~40 ms a request).
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                task = asyncio.create_task(self._handle(conn, peer_ip))
            except BaseException:
                self.limits.release(peer_ip)
                conn.close()
                raise
            self._tasks.add(task)
            task.add_done_callback(lambda t, ip=peer_ip: self._done(t, ip))

    def _done(self, task: asyncio.Task[None], peer_ip: str) -> None:
        self._tasks.discard(task)
        if self.limits is not None:
            self.limits.release(peer_ip)

    def _decider(self, view: SandboxView, scheme: str) -> Callable[[Optional[str], Address], Decision]:
        def decide_now(host: Optional[str], dst: Address) -> Decision:
            if not host and self._names is not None:
                host = self._names.name_for(dst[0])
            # view.policy is read now, per request: policy changes apply at once.
            return decide(Facts.make(host, dst[0], dst[1], scheme), view.policy)  # type: ignore[arg-type]
        return decide_now

    async def _handle(self, sock: Optional[socket.socket], peer_ip: str) -> None:
        assert sock is not None
        sock.setblocking(False)
        try:
            view = self._lookup(peer_ip)
            if view is None:
                return  # destroyed since the accept
            dst = self._original_dst(sock)
            async with asyncio.timeout(PEEK_TIMEOUT):
                first = await peek_first_bytes(sock)
            if not first:
                return
            tls = first[0] == 0x16
            sni = parse_sni(first) if tls else None
            if sni is NEED_MORE:
                return  # the peer gave up in the middle of its ClientHello
            ctx = Context(view.sandbox_id)
            if not tls:
                reader, writer = await _streams(sock, None)
                sock = None  # the transport owns it now
                await serve_connection(reader, writer, dst=dst, decide=self._decider(view, "http"),
                                       ctx=ctx, connect=self._connect, resolve=self._resolve)
                return
            decide_tls = self._decider(view, "https")
            try:
                if sni is not None and (":" in sni or "[" in sni):
                    # An SNI is a bare DNS name: a "port" in it would steer the tunnel.
                    raise ValueError(f"malformed SNI {sni!r}")
                decision = decide_tls(sni, dst)  # type: ignore[arg-type]
            except ValueError as exc:
                # A malformed SNI, or an IP literal that is not the destination: closed.
                log.info("proxy.decision", sandbox=view.sandbox_id, host=None, rule=None,
                         action="bad_sni", error=str(exc), status=None, bytes=0, ms=0)
                return
            if decision.kind == "deny" or (decision.terminate_tls and view.ca is None):
                # A denied HTTPS connection is closed after its ClientHello (SPEC §10).
                log.info("proxy.decision", sandbox=view.sandbox_id, host=decision.host, rule=decision.rule,
                         action="deny" if decision.kind == "deny" else "no_ca", status=None, bytes=0, ms=0)
                return
            if decision.terminate_tls:
                assert view.ca is not None
                server_name = sni or decision.host
                reader, writer = await _streams(sock, view.ca.server_context(server_name))
                sock = None
                await serve_connection(reader, writer, dst=dst, decide=decide_tls, ctx=ctx,
                                       connect=self._connect, resolve=self._resolve, scheme="https",
                                       server_name=server_name)
                return
            spliced, sock = sock, None
            await self._splice(spliced, view, decision)
        except (TimeoutError, ConnectionError, OSError, ssl.SSLError) as exc:
            log.debug("proxy.connection_closed", peer=peer_ip, reason=repr(exc))
        finally:
            if sock is not None:
                sock.close()

    async def _splice(self, sock: socket.socket, view: SandboxView, decision: Decision) -> None:
        """HTTPS passed through untouched: bytes both ways, ClientHello included, to where
        the decision says (the SNI's name, resolved here; or the destination IP)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        counter = [0]
        action = "splice"
        try:
            up_reader, up_writer = await open_upstream(decision, resolve=self._resolve,
                                                       connect=self._connect, tls_name=None)
        except (ResolveError, EgressDenied, OSError) as exc:
            sock.close()  # closed without a byte: the sandbox's TLS sees the failure
            action = "deny" if isinstance(exc, EgressDenied) else "upstream_error"
            log.info("proxy.decision", sandbox=view.sandbox_id, host=decision.host, rule=decision.rule,
                     action=action, error=str(exc), status=None, bytes=0,
                     ms=round((loop.time() - started) * 1000, 3))
            return
        try:
            reader, writer = await _streams(sock, None)
        except BaseException:
            sock.close()
            up_writer.close()
            raise
        try:
            await splice((reader, writer), (up_reader, up_writer), counter=counter)
        finally:
            await asyncio.gather(close_writer(writer), close_writer(up_writer))
            log.info("proxy.decision", sandbox=view.sandbox_id, host=decision.host, rule=decision.rule,
                     action=action, status=None, bytes=counter[0],
                     ms=round((loop.time() - started) * 1000, 3))
