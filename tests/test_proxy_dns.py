"""DNS forwarder on loopback, with a fake resolver that logs what it is asked."""

import asyncio
import ipaddress
import struct

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from sandbox.proxy.dns import SYNTHETIC_NETWORK, DNSForwarder, SyntheticNames, parse_resolver

pytestmark = pytest.mark.timeout(30)


def run(coro):
    return asyncio.run(coro)


class FakeResolver:
    """UDP+TCP on 127.0.0.1:<port>: answers A with 203.0.113.7 (TXT over UDP truncated
    to force TCP); names under `silent.` are never answered (resolver timeout)."""

    def __init__(self):
        self.queries = []  # (transport, name, type)
        self.tasks = set()

    async def __aenter__(self):
        loop = asyncio.get_running_loop()
        resolver = self

        class UDP(asyncio.DatagramProtocol):
            def connection_made(self, transport):
                self.transport = transport

            def datagram_received(self, data, addr):
                reply = resolver.reply(data, "udp")
                if reply is not None:
                    self.transport.sendto(reply, addr)
        self.udp, _ = await loop.create_datagram_endpoint(UDP, local_addr=("127.0.0.1", 0))
        self.port = self.udp.get_extra_info("sockname")[1]
        self.tcp = await asyncio.start_server(self._tcp, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc):
        self.udp.close()
        self.tcp.close()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=5)
        await self.tcp.wait_closed()

    async def _tcp(self, reader, writer):
        self.tasks.add(asyncio.current_task())
        try:
            size = struct.unpack("!H", await reader.readexactly(2))[0]
            reply = self.reply(await reader.readexactly(size), "tcp")
            writer.write(struct.pack("!H", len(reply)) + reply)
            await writer.drain()
        finally:
            writer.close()

    def reply(self, data, transport):
        q = dns.message.from_wire(data)
        question = q.question[0]
        name = question.name.to_text(omit_final_dot=True)
        self.queries.append((transport, name, dns.rdatatype.to_text(question.rdtype)))
        if name.startswith("silent."):
            return None
        r = dns.message.make_response(q)
        if question.rdtype == dns.rdatatype.A:
            r.answer.append(dns.rrset.from_text(question.name, 30, "IN", "A", "203.0.113.7"))
        elif question.rdtype == dns.rdatatype.TXT:
            if transport == "udp":
                r.flags |= dns.flags.TC
            else:
                r.answer.append(dns.rrset.from_text(question.name, 30, "IN", "TXT", '"over tcp"'))
        return r.to_wire()


async def query_udp(addr, name, rdtype="A"):
    loop = asyncio.get_running_loop()
    q = dns.message.make_query(name, rdtype)
    fut = loop.create_future()

    class P(asyncio.DatagramProtocol):
        def datagram_received(self, data, a):
            if not fut.done():
                fut.set_result(data)
    transport, _ = await loop.create_datagram_endpoint(P, remote_addr=addr)
    try:
        transport.sendto(q.to_wire())
        data = await fut
    finally:
        transport.close()
    r = dns.message.from_wire(data)
    assert r.id == q.id
    return r


async def query_tcp(addr, names, rdtype="A"):
    """Several queries on one TCP connection (pipelined, as resolvers do)."""
    reader, writer = await asyncio.open_connection(*addr)
    out = []
    try:
        for name in names:
            wire = dns.message.make_query(name, rdtype).to_wire()
            writer.write(struct.pack("!H", len(wire)) + wire)
            await writer.drain()
            size = struct.unpack("!H", await reader.readexactly(2))[0]
            out.append(dns.message.from_wire(await reader.readexactly(size)))
    finally:
        writer.close()
        await writer.wait_closed()
    return out


def a_records(response):
    return [rr.address for rrset in response.answer for rr in rrset if rrset.rdtype == dns.rdatatype.A]


# -- registry ----------------------------------------------------------------------------

def test_registry_exact_glob_stable_reverse_refcount():
    names = SyntheticNames()
    assert names.add("my.kv") and names.add("*.svc.test") and names.add("my.kv:8080")
    assert not names.add("10.0.0.1") and not names.add("10.0.0.0/8:80")
    ip = names.lookup("my.kv")
    assert ipaddress.ip_address(ip) in SYNTHETIC_NETWORK
    assert names.lookup("MY.KV.") == ip  # stable, case-insensitive
    ip2 = names.lookup("a.b.svc.test")
    assert ip2 not in (None, ip)
    assert names.lookup("svc.test") is None and names.lookup("other.test") is None
    assert names.name_for(ip) == "my.kv" and names.name_for(ip2) == "a.b.svc.test"
    assert names.name_for("1.2.3.4") is None and names.name_for("junk") is None
    assert names.is_synthetic(ip) and not names.is_synthetic("8.8.8.8")
    names.remove("my.kv")
    assert names.lookup("my.kv") == ip  # still registered once (my.kv:8080)
    names.remove("my.kv:8080")
    assert names.lookup("my.kv") is None
    names.remove("never.added")  # no error
    with pytest.raises(ValueError):
        names.add("bad host")
    with pytest.raises(TypeError):
        names.lookup(5)


def test_registry_recycles_when_pool_exhausted():
    names = SyntheticNames(ipaddress.IPv4Network("198.18.0.0/30"))  # 2 usable addresses
    names.add("*.t")
    a, b = names.lookup("a.t"), names.lookup("b.t")
    assert {a, b} == {"198.18.0.1", "198.18.0.2"}
    names.lookup("a.t")  # a is now the most recent
    c = names.lookup("c.t")
    assert c == b and names.name_for(c) == "c.t"


@pytest.mark.parametrize("text, out", [
    ("1.1.1.1", ("1.1.1.1", 53)), ("127.0.0.1:5353", ("127.0.0.1", 5353)),
    ("2001:db8::53", ("2001:db8::53", 53)), ("[2001:db8::53]:5353", ("2001:db8::53", 5353)),
])
def test_parse_resolver(text, out):
    assert parse_resolver(text) == out


@pytest.mark.parametrize("text", ["", "dns.google", "1.1.1.1:0", "10.0.0.0/8", "1.1.1.1:x"])
def test_parse_resolver_bad(text):
    with pytest.raises(ValueError):
        parse_resolver(text)


# -- the server --------------------------------------------------------------------------

def test_synthetic_answers_and_forwarding():
    async def main():
        names = SyntheticNames()
        names.add("my.kv")
        names.add("*.hooks.test")
        async with FakeResolver() as up, DNSForwarder(names, f"127.0.0.1:{up.port}") as fwd:
            addr = fwd.address
            r = await query_udp(addr, "my.kv")
            assert r.rcode() == dns.rcode.NOERROR and r.flags & dns.flags.AA
            assert a_records(r) == [names.lookup("my.kv")]
            assert a_records(await query_udp(addr, "x.y.hooks.test")) == [names.lookup("x.y.hooks.test")]
            for rdtype in ("AAAA", "HTTPS", "TXT"):
                r = await query_udp(addr, "my.kv", rdtype)
                assert r.rcode() == dns.rcode.NOERROR and r.answer == []
            assert up.queries == []  # handler names never leave the runtime
            r = await query_udp(addr, "example.com")
            assert a_records(r) == ["203.0.113.7"]
            assert up.queries == [("udp", "example.com", "A")]
            # Over TCP: synthetic and forwarded, several queries on one connection.
            rs = await query_tcp(addr, ["my.kv", "example.org"])
            assert a_records(rs[0]) == [names.lookup("my.kv")]
            assert a_records(rs[1]) == ["203.0.113.7"]
            assert up.queries[-1] == ("tcp", "example.org", "A")
            # Handler added later: resolves at once.
            assert a_records(await query_udp(addr, "late.test")) == ["203.0.113.7"]
            names.add("late.test")
            assert a_records(await query_udp(addr, "late.test")) == [names.lookup("late.test")]
    run(main())


def test_truncated_udp_is_relayed_and_tcp_retry_works():
    async def main():
        async with FakeResolver() as up, DNSForwarder(SyntheticNames(), f"127.0.0.1:{up.port}") as fwd:
            r = await query_udp(fwd.address, "big.example", "TXT")
            assert r.flags & dns.flags.TC
            (r,) = await query_tcp(fwd.address, ["big.example"], "TXT")
            assert not r.flags & dns.flags.TC
            assert r.answer[0][0].strings == (b"over tcp",)
            assert up.queries == [("udp", "big.example", "TXT"), ("tcp", "big.example", "TXT")]
    run(main())


def test_resolver_timeout_gives_servfail():
    async def main():
        async with FakeResolver() as up, \
                DNSForwarder(SyntheticNames(), f"127.0.0.1:{up.port}", timeout=0.3) as fwd:
            r = await query_udp(fwd.address, "silent.example")
            assert r.rcode() == dns.rcode.SERVFAIL
            assert up.queries == [("udp", "silent.example", "A")]
    run(main())


def test_garbage_gets_formerr_or_nothing():
    async def main():
        async with FakeResolver() as up, DNSForwarder(SyntheticNames(), f"127.0.0.1:{up.port}") as fwd:
            assert await fwd.answer(b"\x12\x34" + b"\x01\x00" + b"\x00" * 8 + b"\xff", tcp=False) == \
                b"\x12\x34\x80\x01" + b"\x00" * 8
            assert await fwd.answer(b"short", tcp=False) is None
            response = dns.message.make_response(dns.message.make_query("x.test", "A")).to_wire()
            assert await fwd.answer(response, tcp=False) is None  # never answer a response
            assert up.queries == []
    run(main())


def test_forwarder_validation():
    with pytest.raises(TypeError):
        DNSForwarder({}, "1.1.1.1")
    with pytest.raises(ValueError):
        DNSForwarder(SyntheticNames(), "resolver.example")
