"""The listener (sandbox.proxy.listener): plain HTTP, HTTPS splice / terminate / deny by SNI, on loopback.

Without TPROXY, `original_dst` is injected: every accepted connection "was going to"
the fake upstream, as the kernel would report it.
"""

import asyncio
import socket
import ssl
from dataclasses import dataclass
from typing import Optional

import pytest

from sandbox.proxy.client import ClientConnection, open_connection
from sandbox.proxy.dns import SyntheticNames
from sandbox.proxy.models import Request, Response
from sandbox.proxy.policy import Policy, Route, parse_target
from sandbox.proxy.listener import ProxyServer, peek_first_bytes
from sandbox.proxy.tls import CertificateAuthority

pytestmark = pytest.mark.timeout(30)


def run(coro):
    return asyncio.run(coro)


@dataclass
class View:
    sandbox_id: str
    policy: Policy
    ca: Optional[CertificateAuthority] = None


def trust(ca):
    return ssl.create_default_context(cadata=ca.ca_pem.decode())


class TLSUpstream:
    """The 'real' HTTPS site example.test, certified by a CA standing in for public ones."""

    def __init__(self):
        self.ca = CertificateAuthority("internet")
        self.connections = 0
        self.tasks = set()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0,
                                                 ssl=self.ca.server_context("example.test"))
        self.addr = self.server.sockets[0].getsockname()[:2]
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=5)
        await self.server.wait_closed()

    async def _serve(self, reader, writer):
        self.tasks.add(asyncio.current_task())
        self.connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            body = b"real:" + head.split(b" ")[1]
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                         % (len(body), body))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()


async def get(port, url, ctx=None, server_name=None):
    conn = ClientConnection(*await open_connection("127.0.0.1", port, tls=ctx is not None,
                                                   server_name=server_name, ssl_context=ctx))
    try:
        resp = await conn.send(Request("GET", url))
        return resp.status, await resp.read()
    finally:
        await conn.aclose()


async def handler(request, ctx):
    return Response(f"handler {ctx.sandbox_id} {request.url}")


def test_http_https_splice_terminate_and_deny():
    async def main():
        async with TLSUpstream() as up:
            view = View("sbx-3", Policy())

            async def connect(dst, server_name):
                return await open_connection(dst[0], dst[1], tls=server_name is not None,
                                             server_name=server_name, ssl_context=trust(up.ca))
            async def resolve(name):
                # SPEC §10: a spliced TLS connection goes to its SNI's name, resolved by
                # the runtime (a fake pinned resolver here), not to the dialled address.
                resolved.append(name)
                return ["127.0.0.1"] if name == "example.test" else []
            resolved = []
            server = ProxyServer(lambda ip: view if ip == "127.0.0.1" else None, transparent=False,
                                 connect=connect, resolve=resolve, original_dst=lambda s: up.addr)
            async with server:
                port = server.address[1]
                dport = up.addr[1]
                # 1. HTTPS with no interception: spliced, the sandbox sees the real certificate.
                status, body = await get(port, f"https://example.test:{dport}/a", trust(up.ca), "example.test")
                assert (status, body) == (200, b"real:/a")
                assert resolved == ["example.test"]
                # 2. intercept_outbound_https registration: terminated with the sandbox CA.
                view.ca = CertificateAuthority("sbx-3")
                view.policy = Policy(routes=(Route(parse_target(f"example.test:{dport}"), handler,
                                                   frozenset({"https"})),))
                url = f"https://example.test:{dport}/b"
                assert await get(port, url, trust(view.ca), "example.test") == (200, f"handler sbx-3 {url}".encode())
                with pytest.raises(ssl.SSLCertVerificationError):  # not the real certificate any more
                    await get(port, url, trust(up.ca), "example.test")
                # 3. intercept_https with no handler: terminated, then egress re-encrypted.
                view.policy = Policy(intercept_https=True)
                assert await get(port, url, trust(view.ca), "example.test") == (200, b"real:/b")
                # 4. denied by SNI: closed after the ClientHello; the upstream is never reached.
                before = up.connections
                view.policy = Policy(denied_hosts=(parse_target("example.test"),))
                with pytest.raises((ssl.SSLError, ConnectionError)):
                    await get(port, url, trust(up.ca), "example.test")
                assert up.connections == before
                # 5. Plain HTTP on the same listener, decided per request.
                view.policy = Policy(routes=(Route(parse_target(f"my.kv:{dport}"), handler),))
                status, body = await get(port, f"http://my.kv:{dport}/k")
                assert (status, body) == (200, f"handler sbx-3 http://my.kv:{dport}/k".encode())
                view.policy = Policy(enable_internet=False)
                assert await get(port, f"http://my.kv:{dport}/k") == (403, b"denied by no internet: my.kv")
    run(main())


def test_unknown_peer_is_dropped_and_synthetic_ip_names():
    async def main():
        names = SyntheticNames()
        names.add("my.kv")
        ip = names.lookup("my.kv")
        view = View("sbx-4", Policy(routes=(Route(parse_target("my.kv:80"), handler),), enable_internet=False))
        server = ProxyServer(lambda peer: view if peer == "127.0.0.1" else None, names=names,
                             transparent=False, original_dst=lambda s: (ip, 80))
        async with server:
            port = server.address[1]
            # HTTP/1.0 without Host, to the synthetic address: matched by the name DNS gave out.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /x HTTP/1.0\r\n\r\n")
            reply = await reader.read()
            writer.close()
            assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(f"handler sbx-4 http://{ip}/x".encode())
        nobody = ProxyServer(lambda peer: None, transparent=False)
        async with nobody:
            reader, writer = await asyncio.open_connection("127.0.0.1", nobody.address[1])
            writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            assert await reader.read() == b""
            writer.close()
    run(main())


def _client_hello(name):
    ctx = ssl.create_default_context()
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def test_peek_waits_for_whole_client_hello_and_leaves_it_unread():
    async def main():
        hello = _client_hello("peek.example.test")
        a, b = socket.socketpair()
        with a, b:
            a.setblocking(False)
            b.sendall(hello[:7])
            task = asyncio.create_task(peek_first_bytes(a))
            for _ in range(5):
                await asyncio.sleep(0)  # let it run; it must still be waiting for the rest
            assert not task.done()
            b.sendall(hello[7:])
            assert await task == hello
            assert a.recv(65536) == hello  # still unread
            # Partial hello then EOF: returned as is (the caller closes).
            b.sendall(hello[:20])
            b.shutdown(socket.SHUT_WR)
            assert await peek_first_bytes(a) == hello[:20]
            # Not TLS: returned at once.
        c, d = socket.socketpair()
        with c, d:
            c.setblocking(False)
            d.sendall(b"GET / HTTP/1.1\r\n")
            assert await peek_first_bytes(c) == b"GET / HTTP/1.1\r\n"
    run(main())
