"""Ephemeral CA, leaf certificates, SNI parsing and HTTPS termination, on loopback."""

import asyncio
import datetime as dt
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from sandbox.proxy.client import ClientConnection, open_connection
from sandbox.proxy.handlers import Context
from sandbox.proxy.http import serve_connection
from sandbox.proxy.models import Request, Response
from sandbox.proxy.policy import Facts, Policy, Route, decide, parse_target
from sandbox.proxy.tls import NEED_MORE, CertificateAuthority, parse_sni

pytestmark = pytest.mark.timeout(30)


def run(coro):
    return asyncio.run(coro)


def client_context(ca):
    ctx = ssl.create_default_context(cadata=ca.ca_pem.decode())
    return ctx


def client_hello(server_name):
    """The real first flight of Python's TLS client, without a network."""
    ctx = ssl.create_default_context()
    if server_name is None:
        ctx.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


# -- CA ----------------------------------------------------------------------------------

def test_ca_certificate_properties():
    ca = CertificateAuthority("job-1")
    cert = x509.load_pem_x509_certificate(ca.ca_pem)
    assert b"PRIVATE" not in ca.ca_pem
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0
    assert cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc) <= dt.timedelta(days=7, minutes=1)
    assert CertificateAuthority().ca_pem != ca.ca_pem  # a fresh key per sandbox
    with pytest.raises(ValueError):
        CertificateAuthority("")
    with pytest.raises(ValueError):
        CertificateAuthority(validity=dt.timedelta(0))
    with pytest.raises(ValueError):
        ca.issue("")


def test_leaf_san_and_cache():
    ca = CertificateAuthority()
    chain, key = ca.issue("Example.Test.")
    leaf = x509.load_pem_x509_certificate(chain)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["example.test"]
    assert leaf.issuer == ca.certificate.subject
    assert leaf.not_valid_after_utc <= ca.certificate.not_valid_after_utc
    chain, _ = ca.issue("10.0.0.1")
    san = x509.load_pem_x509_certificate(chain).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert [str(ip) for ip in san.value.get_values_for_type(x509.IPAddress)] == ["10.0.0.1"]
    assert ca.server_context("example.test") is ca.server_context("EXAMPLE.test")


async def _tls_echo_server(ctx):
    tasks = set()

    async def on_conn(reader, writer):
        tasks.add(asyncio.current_task())
        try:
            writer.write(await reader.readline())
            await writer.drain()
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (ssl.SSLError, ConnectionError):
                pass
    server = await asyncio.start_server(on_conn, "127.0.0.1", 0, ssl=ctx)
    return server, server.sockets[0].getsockname()[1], tasks


async def _close(server, tasks):
    server.close()
    pending = [t for t in tasks if not t.done()]
    if pending:
        await asyncio.wait(pending, timeout=5)
    await server.wait_closed()


def test_client_trusting_the_ca_accepts_leaf():
    async def main():
        ca = CertificateAuthority()
        for name in ("example.test", "127.0.0.1"):
            server, port, tasks = await _tls_echo_server(ca.server_context(name))
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(ca),
                                                          server_hostname=name)
            writer.write(b"ping\n")
            assert await reader.readline() == b"ping\n"
            writer.close()
            await writer.wait_closed()
            # The wrong name, or a client without the CA, is refused.
            for ctx, sni in ((client_context(ca), "other.test"), (ssl.create_default_context(), name)):
                with pytest.raises(ssl.SSLCertVerificationError):
                    await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=sni)
            await _close(server, tasks)
    run(main())


# -- SNI ---------------------------------------------------------------------------------

def test_parse_sni_real_client_hello():
    hello = client_hello("Example.Test")
    assert parse_sni(hello) == "example.test"
    assert parse_sni(hello + b"trailing") == "example.test"
    for cut in (0, 1, 4, 5, 6, 40, len(hello) - 1):
        assert parse_sni(hello[:cut]) is NEED_MORE
    assert not NEED_MORE  # falsy, so "if name:" stays correct


def test_parse_sni_absent_or_not_tls():
    assert parse_sni(client_hello(None)) is None
    assert parse_sni(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") is None
    assert parse_sni(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00") is None  # ServerHello
    assert parse_sni(b"\x16\x03\x01\x00\x10\x02") is None  # partial, but not a ClientHello
    assert parse_sni(b"\x17\x03\x03\x00\x01x") is None  # application data
    assert parse_sni(b"\x16\x03\x01\x00\x00") is None  # empty record
    assert parse_sni(b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\x03\x03\x00\x00") is None  # truncated hello


def test_parse_sni_across_records():
    hello = client_hello("split.example.test")
    body = hello[5:]
    header = hello[:3]
    first, second = body[:50], body[50:]
    split = (header + len(first).to_bytes(2, "big") + first + header + len(second).to_bytes(2, "big") + second)
    assert parse_sni(split) == "split.example.test"
    assert parse_sni(split[:5 + len(first) + 3]) is NEED_MORE


# -- HTTPS termination through serve_connection -------------------------------------------

def test_terminated_https_handler_and_egress():
    async def handler(request, ctx):
        return Response(f"handled {request.url} for {ctx.sandbox_id}")

    async def main():
        sandbox_ca = CertificateAuthority("sbx")
        internet_ca = CertificateAuthority("internet")  # stands in for public CAs
        # The "real" HTTPS server, which egress must reach over verified TLS.
        real_ctx = internet_ca.server_context("example.test")
        upstream_tasks = set()

        async def real(reader, writer):
            upstream_tasks.add(asyncio.current_task())
            head = await reader.readuntil(b"\r\n\r\n")
            body = b"real:" + head.split(b" ")[1]
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            writer.close()
        upstream = await asyncio.start_server(real, "127.0.0.1", 0, ssl=real_ctx)
        dst = ("127.0.0.1", upstream.sockets[0].getsockname()[1])
        policy = Policy(routes=(Route(parse_target(f"example.test:{dst[1]}"), handler, frozenset({"https"})),))
        state = {"policy": policy}

        def decide_fn(host, d):
            return decide(Facts.make(host, d[0], d[1], "https"), state["policy"])

        async def connect(d, server_name):
            return await open_connection(d[0], d[1], tls=True, server_name=server_name,
                                         ssl_context=client_context(internet_ca))

        proxy_tasks = set()
        resolved = []

        async def resolve(name):
            # SPEC §10: egress goes to the Host's name, resolved by the runtime.
            resolved.append(name)
            return ["127.0.0.1"]

        async def on_conn(reader, writer):
            proxy_tasks.add(asyncio.current_task())
            await serve_connection(reader, writer, dst=dst, decide=decide_fn, ctx=Context("sbx-7"),
                                   connect=connect, resolve=resolve, scheme="https", server_name="example.test")
        proxy = await asyncio.start_server(on_conn, "127.0.0.1", 0, ssl=sandbox_ca.server_context("example.test"))
        port = proxy.sockets[0].getsockname()[1]
        conn = ClientConnection(*await open_connection("127.0.0.1", port, tls=True, server_name="example.test",
                                                       ssl_context=client_context(sandbox_ca)))
        url = f"https://example.test:{dst[1]}/p?q"
        resp = await conn.send(Request("GET", url))
        assert await resp.text() == f"handled {url} for sbx-7"
        state["policy"] = Policy()  # handler gone: egress, re-encrypted and verified
        resp = await conn.send(Request("GET", url))
        assert await resp.read() == b"real:/p?q"
        assert resolved == ["example.test"]
        await conn.aclose()
        for server, tasks in ((proxy, proxy_tasks), (upstream, upstream_tasks)):
            await _close(server, tasks)
    run(main())
