"""The per-connection HTTP relay, handlers and the client, on loopback.

A fake upstream (plain h11, independent of the code under test) stands for the real
destination; the proxy is `serve_connection` behind a loopback listener whose `dst` is
that upstream, as TPROXY would report it.
"""

import asyncio
import hashlib
import tracemalloc
from urllib.parse import parse_qs, urlsplit

import h11
import pytest
from sandbox.log import capture_logs

from sandbox.proxy.client import ClientConnection, fetch, open_connection
from sandbox.proxy.handlers import Context, UrlHandler, as_handler, call_handler
from sandbox.proxy.http import serve_connection
from sandbox.proxy.models import Request, Response
from sandbox.proxy.policy import Facts, Policy, Route, decide, parse_target

pytestmark = pytest.mark.timeout(60)

MB = 1 << 20
CHUNK = 64 * 1024


def run(coro):
    return asyncio.run(coro)


async def close_server(server, tasks):
    """Stop listening, then let every connection task finish (their peers have closed);
    cancel stragglers so no socket outlives the test (the leak guard checks fds)."""
    server.close()
    pending = [t for t in tasks if not t.done()]
    if pending:
        _, late = await asyncio.wait(pending, timeout=5)
        for t in late:
            t.cancel()
        if late:
            await asyncio.wait(late)
    await server.wait_closed()


# -- a fake upstream ---------------------------------------------------------------------

class Upstream:
    """h11 server on 127.0.0.1 that records requests. Routes:
    /big?n=N streams N bytes; /count hashes the body without keeping it; /close answers
    with Connection: close; anything else echoes method, path and body."""

    def __init__(self):
        self.requests = []
        self.connections = 0
        self.tasks = set()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        await close_server(self.server, self.tasks)

    async def _serve(self, reader, writer):
        self.tasks.add(asyncio.current_task())
        self.connections += 1
        conn = h11.Connection(h11.SERVER)

        async def next_event():
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    conn.receive_data(await reader.read(CHUNK))
                    continue
                return ev

        async def send(ev):
            writer.write(conn.send(ev))
            await writer.drain()

        try:
            while True:
                ev = await next_event()
                if not isinstance(ev, h11.Request):
                    break
                path = ev.target.decode()
                headers = {k.decode().lower(): v.decode() for k, v in ev.headers}
                digest, size, body = hashlib.sha256(), 0, []
                while True:
                    bev = await next_event()
                    if isinstance(bev, h11.Data):
                        size += len(bev.data)
                        digest.update(bev.data)
                        if not path.startswith("/count"):
                            body.append(bytes(bev.data))
                    elif isinstance(bev, h11.EndOfMessage):
                        break
                    else:
                        return
                self.requests.append({"method": ev.method.decode(), "path": path, "headers": headers,
                                      "body": b"".join(body), "size": size})
                if path.startswith("/big"):
                    n = int(parse_qs(urlsplit(path).query)["n"][0])
                    await send(h11.Response(status_code=200, headers=[("Content-Length", str(n))]))
                    block = bytes(range(256)) * (CHUNK // 256)
                    left = n
                    while left:
                        piece = block[:min(left, CHUNK)]
                        await send(h11.Data(data=piece))
                        left -= len(piece)
                    await send(h11.EndOfMessage())
                elif path.startswith("/count"):
                    out = f"{size} {digest.hexdigest()}".encode()
                    await send(h11.Response(status_code=200, headers=[("Content-Length", str(len(out)))]))
                    await send(h11.Data(data=out))
                    await send(h11.EndOfMessage())
                else:
                    out = f"{ev.method.decode()} {path} ".encode() + b"".join(body)
                    extra = [("Connection", "close")] if path.startswith("/close") else []
                    # No Content-Length: h11 answers chunked, exercising chunked responses.
                    await send(h11.Response(status_code=200, headers=[("X-Up", "1")] + extra))
                    await send(h11.Data(data=out))
                    await send(h11.EndOfMessage())
                if conn.our_state is h11.MUST_CLOSE:
                    break
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError):
            pass
        finally:
            writer.close()


# -- the proxy under test ----------------------------------------------------------------

class Proxy:
    """Loopback listener running serve_connection; `policy` may be swapped at any time."""

    def __init__(self, upstream_port, policy=None, sandbox_id="sbx-1"):
        self.dst = ("127.0.0.1", upstream_port)
        self.policy = policy or Policy()
        self.ctx = Context(sandbox_id)
        self.accepted = 0
        self.tasks = set()

    def decide(self, host, dst):
        return decide(Facts.make(host, dst[0], dst[1]), self.policy)

    async def resolve(self, name):
        # SPEC §10: a name egresses to that name, resolved by the runtime (here: a fake
        # pinned resolver that knows the one test name).
        self.resolved.append(name)
        return ["127.0.0.1"] if name == "site.test" else []

    async def __aenter__(self):
        self.resolved = []

        async def on_conn(reader, writer):
            self.tasks.add(asyncio.current_task())
            self.accepted += 1
            await serve_connection(reader, writer, dst=self.dst, decide=self.decide, ctx=self.ctx,
                                   resolve=self.resolve)
        self.server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        await close_server(self.server, self.tasks)

    async def connect(self):
        return ClientConnection(*await open_connection("127.0.0.1", self.port))


def policy_with(port, mapping=None, **kw):
    """Routes keyed by host name, at the upstream's port (the 'original destination')."""
    rs = tuple(Route(parse_target(f"{host}:{port}"), h) for host, h in (mapping or {}).items())
    return Policy(routes=rs, **kw)


def url(port, path="/", host="site.test"):
    return f"http://{host}:{port}{path}"


async def send(conn, method, u, body=None, headers=None):
    resp = await conn.send(Request(method, u, headers, body))
    return resp.status, resp.headers, await resp.read()


async def agen(chunks):
    for c in chunks:
        yield c


# -- tests -------------------------------------------------------------------------------

def test_egress_keepalive_and_upstream_reuse():
    async def main():
        async with Upstream() as up, Proxy(up.port) as px:
            conn = await px.connect()
            for i in range(3):
                status, headers, body = await send(conn, "GET", url(up.port, f"/r{i}?q=1"))
                assert (status, body) == (200, f"GET /r{i}?q=1 ".encode())
                assert headers["x-up"] == "1"
                assert conn.reusable
            await conn.aclose()
            assert px.accepted == 1 and up.connections == 1
            assert up.requests[0]["headers"]["host"] == f"site.test:{up.port}"
    run(main())


def test_handler_swap_on_live_keepalive_connection():
    async def h1(request, ctx):
        return Response("one")

    class H2:
        async def fetch(self, request):
            return Response("two:" + request.url)

    async def main():
        async with Upstream() as up, Proxy(up.port) as px:
            px.policy = policy_with(up.port, {"site.test": h1})
            conn = await px.connect()
            assert (await send(conn, "GET", url(up.port)))[2] == b"one"
            px.policy = policy_with(up.port, {"site.test": H2()})
            assert (await send(conn, "GET", url(up.port, "/x")))[2] == f"two:{url(up.port, '/x')}".encode()
            px.policy = Policy()  # handler removed: egress
            assert (await send(conn, "GET", url(up.port, "/y")))[2] == b"GET /y "
            px.policy = Policy(denied_hosts=(parse_target("site.test"),))
            status, headers, body = await send(conn, "GET", url(up.port))
            assert (status, body) == (403, b"denied by denied_hosts: site.test")
            assert headers["content-type"].startswith("text/plain")
            px.policy = Policy(enable_internet=False)
            assert (await send(conn, "GET", url(up.port)))[2] == b"denied by no internet: site.test"
            px.policy = Policy(allowed_hosts=(parse_target("other.test"),))
            assert (await send(conn, "GET", url(up.port)))[2] == b"denied by allowed_hosts: site.test"
            await conn.aclose()
            assert px.accepted == 1
    run(main())


def test_handler_exception_gives_502_and_connection_survives():
    calls = []

    async def flaky(request, ctx):
        calls.append(ctx.sandbox_id)
        if len(calls) == 1:
            raise RuntimeError("boom")
        if len(calls) == 2:
            return "not a response"
        return Response("ok")

    async def main():
        async with Upstream() as up, Proxy(up.port, sandbox_id="sbx-9") as px:
            px.policy = policy_with(up.port, {"site.test": flaky})
            conn = await px.connect()
            with capture_logs() as logs:
                assert (await send(conn, "POST", url(up.port), b"x" * 5000))[0] == 502
                assert (await send(conn, "GET", url(up.port)))[0] == 502
                assert (await send(conn, "GET", url(up.port))) [::2] == (200, b"ok")
            await conn.aclose()
            assert px.accepted == 1 and calls == ["sbx-9"] * 3
            errors = [e for e in logs if e["event"] == "proxy.handler_error"]
            assert len(errors) == 2 and "boom" in errors[0]["error"]
            decisions = [e for e in logs if e["event"] == "proxy.decision"]
            assert [d["status"] for d in decisions] == [502, 502, 200]
            d = decisions[-1]
            assert (d["sandbox"], d["host"], d["rule"], d["action"], d["bytes"]) == \
                ("sbx-9", "site.test", "routes", "handler", 2)
            assert d["ms"] >= 0
    run(main())


def test_chunked_request_and_response_through_egress():
    async def main():
        async with Upstream() as up, Proxy(up.port) as px:
            conn = await px.connect()
            parts = [b"alpha-", b"beta-", b"gamma"]
            status, headers, body = await send(conn, "POST", url(up.port, "/echo"), agen(parts))
            assert (status, body) == (200, b"POST /echo alpha-beta-gamma")
            assert up.requests[-1]["headers"].get("transfer-encoding") == "chunked"
            # Response came chunked from upstream; our client saw chunked as well.
            assert headers.get("transfer-encoding") == "chunked"
            # Still keep-alive afterwards.
            assert (await send(conn, "GET", url(up.port, "/again")))[2] == b"GET /again "
            await conn.aclose()
    run(main())


def test_large_bodies_are_streamed_not_buffered():
    size = 20 * MB

    async def upload():
        block = b"\x5a" * CHUNK
        for _ in range(size // CHUNK):
            yield block

    async def main():
        async with Upstream() as up, Proxy(up.port) as px:
            conn = await px.connect()
            tracemalloc.start()
            try:
                # Download: count chunks as they arrive.
                resp = await conn.send(Request("GET", url(up.port, f"/big?n={size}")))
                assert resp.status == 200 and resp.headers["content-length"] == str(size)
                got = 0
                async for chunk in resp.body:
                    got += len(chunk)
                assert got == size
                # Upload with a known Content-Length, streamed.
                resp = await conn.send(Request("PUT", url(up.port, "/count"), {"Content-Length": str(size)},
                                               upload()))
                h = hashlib.sha256()
                for _ in range(size // CHUNK):
                    h.update(b"\x5a" * CHUNK)
                expect = h.hexdigest()
                assert await resp.read() == f"{size} {expect}".encode()
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert peak < 4 * MB, f"peak {peak} bytes: the body was buffered"
            await conn.aclose()
            assert up.connections == 1
    run(main())


def test_streaming_handler_echo():
    async def echo(request, ctx):
        async def gen():
            async for chunk in request.body:
                yield chunk.upper()
        return Response(gen(), headers={"X-Echo": "1"})

    async def main():
        async with Upstream() as up, Proxy(up.port) as px:
            px.policy = policy_with(up.port, {"site.test": echo})
            conn = await px.connect()
            status, headers, body = await send(conn, "POST", url(up.port), agen([b"ab", b"cd"]))
            assert (status, body, headers["x-echo"]) == (200, b"ABCD", "1")
            # A handler that ignores the request body: drained, connection reused.
            px.policy = policy_with(up.port, {"site.test": lambda r, c: _const("fine")})
            assert (await send(conn, "POST", url(up.port), b"y" * 100_000))[2] == b"fine"
            assert (await send(conn, "GET", url(up.port)))[2] == b"fine"
            await conn.aclose()
            assert px.accepted == 1
    run(main())


async def _const(text):
    return Response(text)


def test_url_handler_gets_sandbox_id_and_original_url():
    async def main():
        async with Upstream() as up, Upstream() as orchestrator, Proxy(up.port, sandbox_id="sbx-42") as px:
            px.policy = policy_with(up.port, {"my.kv": f"http://127.0.0.1:{orchestrator.port}"})
            conn = await px.connect()
            original = url(up.port, "/key/a?x=1&y=2", host="my.kv")
            status, _, body = await send(conn, "PUT", original, b"value",
                                         {"X-Sandbox-Id": "forged", "X-Custom": "c"})
            assert status == 200 and body == b"PUT /key/a?x=1&y=2 value"
            seen = orchestrator.requests[-1]
            assert seen["headers"]["x-sandbox-id"] == "sbx-42"
            assert seen["headers"]["x-original-url"] == original
            assert seen["headers"]["x-custom"] == "c"
            assert seen["headers"]["host"] == f"127.0.0.1:{orchestrator.port}"
            assert (seen["method"], seen["path"], seen["body"]) == ("PUT", "/key/a?x=1&y=2", b"value")
            assert up.requests == []  # the real destination was never contacted
            await conn.aclose()
    run(main())


def test_head_expect_continue_and_http10():
    async def main():
        async with Upstream() as up, Proxy(up.port) as px:
            reader, writer = await asyncio.open_connection("127.0.0.1", px.port)
            # Expect: 100-continue: the proxy says 100 when it starts reading the body.
            writer.write(f"POST /e HTTP/1.1\r\nHost: site.test:{up.port}\r\nContent-Length: 3\r\n"
                         "Expect: 100-continue\r\n\r\n".encode())
            await writer.drain()
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100")
            writer.write(b"abc")
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            # HTTP/1.0 without Host: URL falls back to the destination IP; close-delimited.
            writer.write(b"GET /old HTTP/1.0\r\n\r\n")
            await writer.drain()
            rest = await reader.read()
            assert rest.endswith(b"GET /old ") or b"GET /old " in rest
            writer.close()
            assert up.requests[-1]["headers"]["host"] == f"127.0.0.1:{up.port}"
            conn = await px.connect()
            resp = await conn.send(Request("HEAD", url(up.port, "/big?n=1000")))
            assert resp.status == 200 and resp.headers["content-length"] == "1000"
            assert await resp.read() == b""
            await conn.aclose()
    run(main())


def test_bad_requests_and_upstream_down():
    async def main():
        async with Upstream() as up:
            dead_port = up.port
        async with Proxy(dead_port) as px:
            conn = await px.connect()
            with capture_logs() as logs:
                status, _, body = await send(conn, "GET", url(dead_port))
            assert (status, body) == (502, b"upstream error\n")
            assert any(e["event"] == "proxy.upstream_error" for e in logs)
            await conn.aclose()
            reader, writer = await asyncio.open_connection("127.0.0.1", px.port)
            writer.write(b"GARBAGE\r\n\r\n")
            assert (await reader.read()).startswith(b"HTTP/1.1 400")
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", px.port)
            writer.write(b"GET /x HTTP/1.1\r\nHost: bad host\r\n\r\n")
            assert (await reader.read()).startswith(b"HTTP/1.1 400")
            writer.close()
    run(main())


def test_upstream_closing_connection_is_replaced():
    async def main():
        async with Upstream() as up, Proxy(up.port) as px:
            conn = await px.connect()
            assert (await send(conn, "GET", url(up.port, "/close")))[2] == b"GET /close "
            assert (await send(conn, "GET", url(up.port, "/next")))[2] == b"GET /next "
            await conn.aclose()
            assert px.accepted == 1 and up.connections == 2
    run(main())


def test_fetch_and_handler_forms():
    async def main():
        async with Upstream() as up:
            resp = await fetch(f"http://127.0.0.1:{up.port}/f?a=1", method="POST", body="hi",
                               headers={"X-A": "b"})
            assert (resp.status, await resp.text()) == (200, "POST /f?a=1 hi")
            assert up.requests[-1]["headers"]["x-a"] == "b"
            resp = await fetch(Request("GET", f"http://127.0.0.1:{up.port}/big?n=200000"))
            assert len(await resp.read()) == 200000
            with pytest.raises(TypeError):
                await fetch(Request("GET", "http://h/"), method="POST")
            with pytest.raises(TypeError):
                await fetch(b"http://h/")
            ctx = Context("s")
            req = Request("GET", "http://x/")
            assert (await (await call_handler(UrlHandler(f"http://127.0.0.1:{up.port}/base/"), req, ctx))
                    .read()) == b"GET /base/ "

            class Obj:
                async def fetch(self, request):
                    return Response(request.method)
            assert await (await call_handler(Obj(), req, ctx)).read() == b"GET"
        for bad in ["ftp://x", "http://", "http://h:99999", "http://h/?q=1", 42, None]:
            with pytest.raises((TypeError, ValueError)):
                as_handler(bad)
    run(main())
