import asyncio
import functools

import sandbox


def run(coro_fn):
    """Runs an async test body in a fresh event loop (closed after)."""
    @functools.wraps(coro_fn)
    def wrapper(*a, **kw):
        return asyncio.run(coro_fn(*a, **kw))
    return wrapper


class running:
    """`async with running() as (rt, box)`: a runtime with one started sandbox."""

    def __init__(self, **start):
        self.start = start

    async def __aenter__(self):
        self.rt = sandbox.Runtime()
        await self.rt.__aenter__()
        try:
            self.box = self.rt.sandbox()
            await self.box.start(**self.start)
        except BaseException:
            await self.rt.__aexit__(None, None, None)
            raise
        return self.rt, self.box

    async def __aexit__(self, *exc):
        await self.rt.__aexit__(*exc)


# -- a fake resolver and fake hosts for the outbound tests (test-made namespaces only) ----
import socket as _socket
import struct as _struct


class FakeDNS:
    """A DNS server for ``Runtime(resolver=...)`` on a UDP and a TCP socket the test made
    (usually inside a test-made netns): A queries for names in ``answers`` get that
    address (``""``: never answered), other names NXDOMAIN; every query is logged in
    ``queries`` as ``(transport, name, type)``."""

    def __init__(self, udp_sock, tcp_sock, answers: dict, ttl: int = 60):
        self.udp_sock, self.tcp_sock = udp_sock, tcp_sock
        self.answers = answers
        self.ttl = ttl
        self.queries: list[tuple[str, str, str]] = []
        self._tasks: set = set()

    def reply(self, data: bytes, transport: str) -> bytes | None:
        import dns.message
        import dns.rcode
        import dns.rdatatype
        import dns.rrset
        try:
            q = dns.message.from_wire(data)
        except Exception:
            return None
        question = q.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        self.queries.append((transport, name, dns.rdatatype.to_text(question.rdtype)))
        r = dns.message.make_response(q)
        ip = self.answers.get(name)
        if ip == "":
            return None   # a name this resolver never answers (a resolver timeout)
        if ip is None:
            r.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype == dns.rdatatype.A:
            r.answer.append(dns.rrset.from_text(question.name, self.ttl, "IN", "A", ip))
        return r.to_wire()

    async def __aenter__(self):
        loop = asyncio.get_running_loop()
        fake = self

        class _Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport):
                self.transport = transport

            def datagram_received(self, data, addr):
                out = fake.reply(data, "udp")
                if out is not None:
                    self.transport.sendto(out, addr)
        try:
            self._udp, _ = await loop.create_datagram_endpoint(_Udp, sock=self.udp_sock)
        except BaseException:
            self.udp_sock.close()
            self.tcp_sock.close()
            raise
        try:
            self._tcp = await asyncio.start_server(self._serve_tcp, sock=self.tcp_sock)
        except BaseException:
            self._udp.close()
            self.tcp_sock.close()
            raise
        return self

    async def __aexit__(self, *exc):
        self._udp.close()
        self._tcp.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        await self._tcp.wait_closed()
        await asyncio.sleep(0)

    async def _serve_tcp(self, reader, writer):
        self._tasks.add(asyncio.current_task())
        try:
            while True:
                size = _struct.unpack("!H", await reader.readexactly(2))[0]
                out = self.reply(await reader.readexactly(size), "tcp")
                if out is None:
                    return
                writer.write(_struct.pack("!H", len(out)) + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._tasks.discard(asyncio.current_task())
            writer.close()


def listen_socket(ns, ip: str, port: int, kind=_socket.SOCK_STREAM, backlog: int = 128):
    """A bound (listening, for TCP) non-blocking socket made inside netns ``ns``."""
    def make():
        s = _socket.socket(_socket.AF_INET, kind | _socket.SOCK_CLOEXEC)
        try:
            s.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
            s.bind((ip, port))
            if kind == _socket.SOCK_STREAM:
                s.listen(backlog)
            s.setblocking(False)
        except BaseException:
            s.close()
            raise
        return s
    return ns.run_in(make)
