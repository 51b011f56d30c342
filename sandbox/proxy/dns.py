"""The runtime's DNS forwarder (SPEC §10 "DNS", DESIGN §3).

Every sandbox query arrives here (nft redirects UDP and TCP port 53). Names that have a
handler resolve to synthetic addresses from 198.18.0.0/15 (RFC 2544 benchmarking space:
never routed on the internet), so the sandbox's connection reaches the proxy; every other
query goes to the one configured resolver and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
from collections import Counter, OrderedDict
from typing import Optional

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from ..log import get_logger

from .limits import ConnectionLimits, LogLimiter
from .policy import Target, parse_target

__all__ = ["SyntheticNames", "DNSForwarder", "parse_resolver", "SYNTHETIC_NETWORK"]

log = get_logger("sandbox.proxy.dns")

SYNTHETIC_NETWORK = ipaddress.IPv4Network("198.18.0.0/15")
SYNTHETIC_TTL = 60
# A sandbox's queries are hostile input (SPEC §9): what one sandbox can hold is bounded so
# that it wastes only its own share. Beyond a bound a datagram is dropped (the client
# retries) and a TCP connection is reset at once.
MAX_INFLIGHT = 512          # concurrent UDP queries being answered, all sandboxes
MAX_INFLIGHT_PER_PEER = 64  # ... of one sandbox
MAX_TCP = 256               # open TCP DNS connections, all sandboxes
MAX_TCP_PER_PEER = 16       # ... of one sandbox
TCP_IDLE = 10.0     # seconds a TCP client may stay idle between queries (or mid-query)
# Concrete names holding a synthetic address at once. A sandbox asking for endless random
# names under a glob handler would otherwise fill the whole /15 (~130k names, ~60-90 MiB
# of runtime memory); beyond this the least recently used name's address is recycled.
MAX_NAMES = 16384


def parse_resolver(text: str) -> tuple[str, int]:
    """`"ip"`, `"ip:port"` or `"[v6]:port"` -> (ip, port). A hostname is refused: the
    resolver is how names get resolved."""
    if not isinstance(text, str):
        raise TypeError(f"resolver must be a str, not {type(text).__name__}")
    target = parse_target(text) if text else None
    if target is None or target.kind != "ip":
        raise ValueError(f"resolver must be an IP or IP:port: {text!r}")
    return target.pattern, target.port or 53


class SyntheticNames:
    """Registry of handler names (exact or glob) and their stable synthetic addresses.

    Patterns are reference-counted (several sandboxes may register the same name).
    Addresses are handed out per concrete name and stay the same for the process's
    life; when `max_names` are in use (a sandbox querying endless random names under a
    glob) the least recently used name's address is recycled.
    """

    def __init__(self, network: ipaddress.IPv4Network = SYNTHETIC_NETWORK, max_names: int = MAX_NAMES) -> None:
        self._network = network
        self._patterns: Counter[Target] = Counter()
        self._by_name: OrderedDict[str, ipaddress.IPv4Address] = OrderedDict()
        self._by_ip: dict[ipaddress.IPv4Address, str] = {}
        self._next = 1  # skip the network address
        self._size = min(network.num_addresses - 2, max_names)  # and the broadcast address

    @staticmethod
    def _name_target(pattern: str) -> Optional[Target]:
        target = parse_target(pattern)  # ValueError when malformed
        if target.kind in ("ip", "cidr"):
            return None  # an IP needs no name
        return Target(target.kind, target.pattern, None, None, target._regex)

    def add(self, pattern: str) -> bool:
        """Register a handler target; False when it is an IP/CIDR (nothing to resolve)."""
        target = self._name_target(pattern)
        if target is None:
            return False
        self._patterns[target] += 1
        return True

    def remove(self, pattern: str) -> None:
        target = self._name_target(pattern)
        if target is None or target not in self._patterns:
            return
        self._patterns[target] -= 1
        if self._patterns[target] <= 0:
            del self._patterns[target]

    def matches(self, name: str) -> bool:
        name = name.lower().rstrip(".")
        if not name:
            return False
        for target in self._patterns:
            if target.kind == "host" and target.pattern == name:
                return True
            if target.kind == "glob" and target._regex is not None and target._regex.fullmatch(name):
                return True
        return False

    def lookup(self, name: str) -> Optional[str]:
        """The synthetic IPv4 for `name` if a registered pattern matches it, else None."""
        if not isinstance(name, str):
            raise TypeError("name must be a str")
        name = name.lower().rstrip(".")
        if not self.matches(name):
            return None
        ip = self._by_name.get(name)
        if ip is not None:
            self._by_name.move_to_end(name)
            return str(ip)
        if self._next <= self._size:
            ip = self._network.network_address + self._next
            self._next += 1
        else:
            old_name, ip = self._by_name.popitem(last=False)
            del self._by_ip[ip]
        self._by_name[name] = ip
        self._by_ip[ip] = name
        return str(ip)

    def name_for(self, ip: str) -> Optional[str]:
        """Reverse: which name was given `ip` (for connections without Host/SNI)."""
        try:
            return self._by_ip.get(ipaddress.ip_address(ip))  # type: ignore[arg-type]
        except ValueError:
            return None

    def is_synthetic(self, ip: str) -> bool:
        try:
            return ipaddress.ip_address(ip) in self._network
        except ValueError:
            return False


class _UDPServer(asyncio.DatagramProtocol):
    def __init__(self, forwarder: DNSForwarder) -> None:
        self.forwarder = forwarder
        self.transport: Optional[asyncio.DatagramTransport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:  # type: ignore[type-arg]
        self.forwarder._spawn_udp(data, addr)


class _UDPClient(asyncio.DatagramProtocol):
    """One forwarded query: waits for the datagram whose ID and question match."""

    def __init__(self, query: dns.message.Message) -> None:
        self.query = query
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple) -> None:  # type: ignore[type-arg]
        if self.answer.done():
            return
        try:
            reply = dns.message.from_wire(data, ignore_trailing=True, question_only=True)
        except dns.exception.DNSException:
            return
        # Anything else on this port is noise or a spoofing attempt: ignore it.
        if reply.id == self.query.id and self.query.is_response(reply):
            self.answer.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)


class DNSForwarder:
    """UDP+TCP DNS server: synthetic answers for handler names, the rest forwarded."""

    def __init__(self, names: SyntheticNames, resolver: str, listen: tuple[str, int] = ("127.0.0.1", 0),
                 *, timeout: float = 2.0) -> None:
        if not isinstance(names, SyntheticNames):
            raise TypeError("names must be a SyntheticNames")
        self.names = names
        self.resolver = parse_resolver(resolver)
        self._listen = listen
        self.timeout = timeout
        self._udp: Optional[asyncio.DatagramTransport] = None
        self._tcp: Optional[asyncio.Server] = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._udp_limits = ConnectionLimits(MAX_INFLIGHT_PER_PEER, MAX_INFLIGHT)
        self._tcp_limits = ConnectionLimits(MAX_TCP_PER_PEER, MAX_TCP)
        self._log = LogLimiter(log)
        self.dropped = 0  # queries dropped / connections refused over a bound
        self.address: Optional[tuple[str, int]] = None

    async def start(self) -> tuple[str, int]:
        """Bind UDP and TCP on the same port (port 0: a free one); returns the address."""
        loop = asyncio.get_running_loop()
        host, port = self._listen
        for _ in range(10 if port == 0 else 1):
            udp, _proto = await loop.create_datagram_endpoint(lambda: _UDPServer(self), local_addr=(host, port))
            bound = udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, host, bound)
            except OSError:
                udp.close()
                if port:
                    raise
                continue  # the TCP side of that port was taken: try another
            self._udp = udp  # type: ignore[assignment]
            self.address = (host, bound)
            return self.address
        raise OSError("could not bind UDP and TCP on one port")

    async def __aenter__(self) -> DNSForwarder:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for task in self._tasks:
            task.cancel()

    async def aclose(self) -> None:
        self.close()
        tasks = list(self._tasks)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._tcp is not None:
            await self._tcp.wait_closed()

    # -- answering ------------------------------------------------------------------------
    def _track(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _spawn_udp(self, data: bytes, addr: tuple) -> None:  # type: ignore[type-arg]
        peer = addr[0]
        if not self._udp_limits.acquire(peer):
            # Overload: the client will retry; better than unbounded memory and fds.
            self.dropped += 1
            self._log("warning", "dns.overload", peer=peer, transport="udp",
                      inflight=self._udp_limits.count(peer))
            return
        try:
            self._track(self._answer_udp(data, addr))
        except BaseException:
            self._udp_limits.release(peer)
            raise

    async def _answer_udp(self, data: bytes, addr: tuple) -> None:  # type: ignore[type-arg]
        try:
            reply = await self.answer(data, tcp=False)
            if reply is not None and self._udp is not None and not self._udp.is_closing():
                self._udp.sendto(reply, addr)
        finally:
            self._udp_limits.release(addr[0])

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = (writer.get_extra_info("peername") or ("?",))[0]
        if not self._tcp_limits.acquire(peer):
            self.dropped += 1
            self._log("warning", "dns.overload", peer=peer, transport="tcp",
                      open=self._tcp_limits.count(peer))
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()
            return
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            while True:
                async with asyncio.timeout(TCP_IDLE):
                    size = struct.unpack("!H", await reader.readexactly(2))[0]
                    data = await reader.readexactly(size)
                reply = await self.answer(data, tcp=True)
                if reply is None:
                    return
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            self._tcp_limits.release(peer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def answer(self, data: bytes, *, tcp: bool) -> Optional[bytes]:
        """The reply bytes for one query message (None: drop it)."""
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return _formerr(data)
        if query.flags & dns.flags.QR or len(query.question) != 1:
            return _formerr(data) if not query.flags & dns.flags.QR else None
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True)
        if self.names.matches(name):
            return self._synthetic(query, name).to_wire()
        reply = await self._forward(query, data, tcp)
        if reply is None:
            # Rate-limited: under fd exhaustion every query fails here at once.
            self._log("warning", "dns.resolver_timeout", name=name,
                      resolver=f"{self.resolver[0]}:{self.resolver[1]}")
            fail = dns.message.make_response(query)
            fail.set_rcode(dns.rcode.SERVFAIL)
            return fail.to_wire()
        return reply

    def _synthetic(self, query: dns.message.Message, name: str) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        if question.rdtype == dns.rdatatype.A and question.rdclass == dns.rdataclass.IN:
            ip = self.names.lookup(name)
            if ip is not None:
                response.answer.append(dns.rrset.from_text(question.name, SYNTHETIC_TTL, "IN", "A", ip))
        # AAAA, HTTPS/SVCB and every other type: NOERROR with no data, so clients use
        # the synthetic A and never learn a real address (or ECH config) for the name.
        return response

    async def _forward(self, query: dns.message.Message, data: bytes, tcp: bool) -> Optional[bytes]:
        try:
            async with asyncio.timeout(self.timeout):
                if tcp:
                    return await self._forward_tcp(data)
                return await self._forward_udp(query, data)
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            return None

    async def _forward_udp(self, query: dns.message.Message, data: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        # A fresh socket (random source port) per query: no cross-query confusion.
        transport, proto = await loop.create_datagram_endpoint(lambda: _UDPClient(query),
                                                               remote_addr=self.resolver)
        try:
            transport.sendto(data)
            return await proto.answer  # a truncated (TC) reply is relayed: the client retries over TCP
        finally:
            transport.close()

    async def _forward_tcp(self, data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(*self.resolver)
        try:
            writer.write(struct.pack("!H", len(data)) + data)
            await writer.drain()
            size = struct.unpack("!H", await reader.readexactly(2))[0]
            reply = await reader.readexactly(size)
            if reply[:2] != data[:2]:
                raise OSError("resolver answered another query ID")
            return reply
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def _formerr(data: bytes) -> Optional[bytes]:
    """FORMERR echoing the ID when at least a header arrived; else drop."""
    if len(data) < 12:
        return None
    flags = struct.unpack("!H", data[2:4])[0]
    if flags & 0x8000:
        return None  # a response: never answer those (reflection loops)
    opcode = flags & 0x7800
    return data[:2] + struct.pack("!HHHHH", 0x8000 | opcode | dns.rcode.FORMERR, 0, 0, 0, 0)
