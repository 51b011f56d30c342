"""Names for egress (SPEC §10 "Where egress goes"), resolved by the runtime itself.

A request allowed by a hostname rule (or by `enable_internet` with a Host/SNI name) goes
to *that name*: this module asks the pinned resolver — the one `Runtime(resolver=...)`
names, the same one the DNS forwarder forwards to — and never the host's libc (whose
`/etc/hosts`, search domains and numeric-host parsing are not the sandbox's business).

Answers are cached within their TTL (bounded: an LRU of `CACHE_SIZE` names, TTLs capped
at `MAX_TTL`); concurrent lookups of one name share one query. Addresses the proxy must
never connect to on a sandbox's behalf — loopback, unspecified, multicast, and any
address local to the host (the nft rules keep a sandbox from dialling those itself) —
are dropped from every answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import secrets
import socket
import struct
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Optional

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype

from .dns import parse_resolver

__all__ = ["NameResolver", "ResolveError", "Resolve", "no_resolver", "is_local_address"]

Resolve = Callable[[str], Awaitable[list[str]]]

CACHE_SIZE = 4096
MAX_TTL = 3600
NEGATIVE_TTL = 5       # seconds an NXDOMAIN / no-address answer is remembered
TRIES = 2
CNAME_DEPTH = 8


class ResolveError(Exception):
    """The name has no usable address; the message is the plain-text reason (502)."""


async def no_resolver(name: str) -> list[str]:
    raise ResolveError("no resolver configured for name egress")


def is_local_address(ip: str) -> bool:
    """True for addresses the host itself answers: the proxy runs in the host netns, so
    connecting there would reach host services the sandbox cannot dial. A connected UDP
    socket asks the kernel's routing table (no packet is sent): a local destination gets
    itself as the source address."""
    addr = ipaddress.ip_address(ip)
    if addr.is_loopback or addr.is_unspecified or addr.is_multicast:
        return True
    if addr.version == 4 and addr == ipaddress.IPv4Address("255.255.255.255"):
        return True
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect((ip, 9))
            return ipaddress.ip_address(s.getsockname()[0]) == addr
    except OSError:
        return False  # no route: not local (the connect will fail on its own)


class _Answer(asyncio.DatagramProtocol):
    def __init__(self, qid: int, question: dns.message.Message) -> None:
        self.qid, self.question = qid, question
        self.reply: asyncio.Future[dns.message.Message] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple) -> None:  # type: ignore[type-arg]
        if self.reply.done():
            return
        try:
            msg = dns.message.from_wire(data, ignore_trailing=True)
        except (dns.exception.DNSException, ValueError):
            return
        if msg.id == self.qid and self.question.is_response(msg):
            self.reply.set_result(msg)

    def error_received(self, exc: Exception) -> None:
        if not self.reply.done():
            self.reply.set_exception(exc)


class NameResolver:
    """`await resolver.resolve(name)` -> usable addresses, or `ResolveError`."""

    def __init__(self, resolver: str, *, timeout: float = 2.0, cache_size: int = CACHE_SIZE,
                 local_check: Callable[[str], bool] = is_local_address) -> None:
        self.server = parse_resolver(resolver)
        self.timeout = timeout
        self._cache: OrderedDict[str, tuple[float, list[str], Optional[str]]] = OrderedDict()
        self._cache_size = cache_size
        self._inflight: dict[str, asyncio.Future[list[str]]] = {}
        self._local = local_check

    async def resolve(self, name: str) -> list[str]:
        loop = asyncio.get_running_loop()
        hit = self._cache.get(name)
        if hit is not None:
            expires, ips, error = hit
            if loop.time() < expires:
                self._cache.move_to_end(name)
                if error is not None:
                    raise ResolveError(error)
                return list(ips)
            del self._cache[name]
        shared = self._inflight.get(name)
        if shared is None:
            shared = asyncio.ensure_future(self._lookup(name))
            self._inflight[name] = shared
            shared.add_done_callback(lambda f: self._done(name, f))
        # shield: one waiter going away (its sandbox hung up) does not cancel the others'.
        return list(await asyncio.shield(shared))

    def _done(self, name: str, fut: asyncio.Future[list[str]]) -> None:
        self._inflight.pop(name, None)
        if not fut.cancelled():
            fut.exception()  # retrieved: no "never retrieved" noise when every waiter left

    def _remember(self, name: str, ttl: float, ips: list[str], error: Optional[str]) -> None:
        if ttl <= 0:
            return
        self._cache[name] = (asyncio.get_running_loop().time() + min(ttl, MAX_TTL), ips, error)
        self._cache.move_to_end(name)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    async def _lookup(self, name: str) -> list[str]:
        try:
            qname = dns.name.from_text(name)
        except (dns.exception.DNSException, ValueError):
            raise ResolveError(f"cannot resolve {name}: not a DNS name") from None
        found: list[str] = []
        ttl: float = MAX_TTL
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            reply = await self._ask(qname, rdtype)
            rcode = reply.rcode()
            if rcode == dns.rcode.NXDOMAIN:
                self._remember(name, NEGATIVE_TTL, [], f"cannot resolve {name}: no such name")
                raise ResolveError(f"cannot resolve {name}: no such name")
            if rcode != dns.rcode.NOERROR:
                raise ResolveError(f"cannot resolve {name}: resolver answered {dns.rcode.to_text(rcode)}")
            addrs, rr_ttl = _addresses(reply, qname, rdtype)
            if addrs:
                found, ttl = addrs, rr_ttl
                break
        usable = [ip for ip in found if not self._local(ip)]
        if not usable:
            why = "resolves only to local addresses" if found else "no address"
            self._remember(name, NEGATIVE_TTL, [], f"cannot resolve {name}: {why}")
            raise ResolveError(f"cannot resolve {name}: {why}")
        self._remember(name, ttl, usable, None)
        return usable

    async def _ask(self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> dns.message.Message:
        query = dns.message.make_query(qname, rdtype, dns.rdataclass.IN)
        query.id = secrets.randbelow(65536)
        wire = query.to_wire()
        last: Exception = TimeoutError()
        for _ in range(TRIES):
            try:
                async with asyncio.timeout(self.timeout / TRIES):
                    reply = await self._udp(query, wire)
                if reply.flags & dns.flags.TC:
                    async with asyncio.timeout(self.timeout):
                        reply = await self._tcp(query, wire)
                return reply
            except (TimeoutError, OSError, EOFError, asyncio.IncompleteReadError,
                    dns.exception.DNSException) as exc:
                last = exc
        raise ResolveError(f"cannot resolve {qname.to_text(omit_final_dot=True)}: "
                           f"resolver {self.server[0]}:{self.server[1]} did not answer ({type(last).__name__})")

    async def _udp(self, query: dns.message.Message, wire: bytes) -> dns.message.Message:
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_datagram_endpoint(lambda: _Answer(query.id, query),
                                                               remote_addr=self.server)
        try:
            transport.sendto(wire)
            return await proto.reply
        finally:
            transport.close()

    async def _tcp(self, query: dns.message.Message, wire: bytes) -> dns.message.Message:
        reader, writer = await asyncio.open_connection(*self.server)
        try:
            writer.write(struct.pack("!H", len(wire)) + wire)
            await writer.drain()
            size = struct.unpack("!H", await reader.readexactly(2))[0]
            reply = dns.message.from_wire(await reader.readexactly(size))
            if reply.id != query.id or not query.is_response(reply):
                raise EOFError("the resolver answered another query")
            return reply
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def _addresses(reply: dns.message.Message, qname: dns.name.Name,
               rdtype: dns.rdatatype.RdataType) -> tuple[list[str], float]:
    """Addresses of `qname` in the answer section, following its CNAME chain only (records
    about other names are not ours to believe), and the smallest TTL along the way."""
    name, ttl = qname, float(MAX_TTL)
    for _ in range(CNAME_DEPTH):
        rrset = reply.get_rrset(reply.answer, name, dns.rdataclass.IN, rdtype)
        if rrset is not None:
            return [r.address for r in rrset], min(ttl, rrset.ttl)
        cname = reply.get_rrset(reply.answer, name, dns.rdataclass.IN, dns.rdatatype.CNAME)
        if cname is None:
            break
        ttl = min(ttl, cname.ttl)
        name = cname[0].target
    return [], ttl
