"""Outbound traffic end to end (SPEC §3 intercept_*, §5, §10): Cloudflare's "Handle
outbound traffic" and "Connect to Workers over HTTP" examples, in Python, against real
sandboxes.

Fake upstreams only: an `Upstream` is a server in a network namespace this test made
(10.215.0.0/24 over a veth), which both the proxy (egress from the host netns) and the
sandbox (direct, with enable_internet) can reach; URL-string handlers point at a server
on the host's loopback, which only the proxy reaches. No other address is ever a target,
and no test needs DNS beyond the runtime's synthetic names.
"""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import ssl

import netns
import pytest

import sandbox
from sandbox import Request, Response
from sandbox.proxy.tls import CertificateAuthority

from helpers import FakeDNS, listen_socket, run

pytestmark = pytest.mark.timeout(60)

CA_FILE = "/etc/sandbox/certs/sandbox-ca.crt"
CF_CA_FILE = "/etc/cloudflare/certs/cloudflare-containers-ca.crt"

# -- the sandbox side: one python3 inside, driven line by line ---------------------------
# Each stdin line is a JSON request; each stdout line the JSON result. Connections are
# kept alive per (host, port, tls) so that a test can act between two requests on one
# connection. "lport" (the client's local port) identifies the TCP connection.
CLIENT = r'''
import http.client, json, socket, ssl, sys
conns = {}
for line in sys.stdin:
    r = json.loads(line)
    tls = r.get("tls", False)
    port = r.get("port", 443 if tls else 80)
    key = (r["host"], port, tls)
    try:
        c = conns.get(key)
        if c is None or r.get("new"):
            if c is not None:
                c.close()
            if tls:
                ctx = ssl.create_default_context(cafile=r.get("cafile"))
                c = http.client.HTTPSConnection(r["host"], port, context=ctx, timeout=20)
                if r.get("sni"):
                    raw = socket.create_connection((r["host"], port), timeout=20)
                    c.sock = ctx.wrap_socket(raw, server_hostname=r["sni"])
            else:
                c = http.client.HTTPConnection(r["host"], port, timeout=20)
            conns[key] = c
        body = r.get("body")
        c.request(r.get("method", "GET"), r.get("path", "/"),
                  body=body.encode() if body is not None else None, headers=r.get("headers") or {})
        resp = c.getresponse()
        data = resp.read()
        out = {"status": resp.status, "body": data.decode("utf-8", "replace"),
               "headers": {k.lower(): v for k, v in resp.getheaders()},
               "lport": c.sock.getsockname()[1] if c.sock else None}
        if tls:
            out["issuer"] = dict(x[0] for x in c.sock.getpeercert()["issuer"])
        if resp.will_close:
            c.close(); conns.pop(key, None)
    except Exception as e:
        conns.pop(key, None)
        out = {"error": type(e).__name__ + ": " + str(e)}
    print(json.dumps(out), flush=True)
'''


class Inside:
    """`async with Inside(box) as c: await c.get("my.kv", "/key")` — HTTP from inside."""

    def __init__(self, box):
        self.box = box
        self._buf = b""

    async def __aenter__(self):
        self.proc = await self.box.exec(["python3", "-c", CLIENT], stdin="pipe", stderr="combined")
        return self

    async def __aexit__(self, *exc):
        self.proc.stdin.close()
        await asyncio.wait_for(self.proc.exit_code, 20)

    async def get(self, host, path="/", **kw) -> dict:
        self.proc.stdin.write((json.dumps({"host": host, "path": path, **kw}) + "\n").encode())
        await self.proc.stdin.drain()
        while b"\n" not in self._buf:
            chunk = await asyncio.wait_for(self.proc.stdout.read(65536), 30)
            if not chunk:
                raise AssertionError(f"client inside died: {self._buf!r}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            return json.loads(line)
        except ValueError:
            raise AssertionError(f"client inside said: {line + self._buf!r}") from None


async def inside_once(box, host, path="/", **kw) -> dict:
    async with Inside(box) as c:
        return await c.get(host, path, **kw)


async def sh(box, script: str) -> sandbox.ExecOutput:
    return await (await box.exec(["sh", "-c", script])).output()


# -- fake upstreams ------------------------------------------------------------------------
class Upstream:
    """An echo server (HTTP/1.1 keep-alive, optionally TLS) inside a netns this test made.

    Answers JSON {method, path, host, body, authorized, seen_headers} — never echoing an
    Authorization header (the credential-injection test checks it here, not in the
    sandbox). `requests` records everything it saw, headers included.
    """

    POOL = "10.215.0.0/24"

    def __init__(self, tmp_path, ports=(80,), tls_ports=(), cert_name="tls.upstream.test"):
        self.dir = str(tmp_path)
        self.ports, self.tls_ports, self.cert_name = tuple(ports), tuple(tls_ports), cert_name
        self.requests: list[dict] = []
        self.ca = CertificateAuthority("upstream test CA") if tls_ports else None
        self._servers = []
        self._writers = set()

    async def __aenter__(self):
        self.ns = await asyncio.to_thread(netns.NetNS.create, self.dir, "upstream")
        try:
            block = netns.AddressPool(self.POOL).allocate()
            self.veth = await asyncio.to_thread(netns.Veth.create, self.ns, f"sbt{os.getpid() % 100000}", block)
            self.ip = str(block.peer)
            for port, tls in [(p, False) for p in self.ports] + [(p, True) for p in self.tls_ports]:
                sock = self.ns.run_in(self._listen, self.ip, port)
                ctx = self.ca.server_context(self.cert_name) if tls else None
                self._servers.append(await asyncio.start_server(self._serve, sock=sock, ssl=ctx))
            # The pinned resolver of `runtime(tmp_path, up)`: SPEC §10 sends a request
            # allowed by name to that name, resolved by the runtime; here every test name
            # is this upstream.
            self.dns = FakeDNS(listen_socket(self.ns, self.ip, 53, socket.SOCK_DGRAM),
                               listen_socket(self.ns, self.ip, 53), _EveryName(self.ip))
            await self.dns.__aenter__()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc):
        if getattr(self, "dns", None) is not None:
            await self.dns.__aexit__(None, None, None)
        for s in self._servers:
            s.close()
        for w in list(self._writers):
            w.close()
        for s in self._servers:
            await s.wait_closed()
        await asyncio.sleep(0)
        if getattr(self, "veth", None) is not None:
            await asyncio.to_thread(self.veth.close)
        await asyncio.to_thread(self.ns.close)

    @staticmethod
    def _listen(ip, port):
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((ip, port))
        s.listen(128)
        s.setblocking(False)
        return s

    @property
    def ca_pem(self) -> str:
        return self.ca.ca_pem.decode()

    async def _serve(self, reader, writer):
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if line:
                        k, _, v = line.partition(":")
                        headers[k.strip().lower()] = v.strip()
                if headers.get("transfer-encoding", "").lower() == "chunked":
                    body = b""
                    while True:
                        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                        if size == 0:
                            await reader.readuntil(b"\r\n")   # no trailers: the last CRLF
                            break
                        body += await reader.readexactly(size)
                        await reader.readexactly(2)
                else:
                    n = int(headers.get("content-length", "0"))
                    body = await reader.readexactly(n) if n else b""
                self.requests.append({"method": method, "path": target, "headers": headers, "body": body})
                data = json.dumps({
                    "upstream": True, "method": method, "path": target, "host": headers.get("host"),
                    "body": body.decode("utf-8", "replace"), "authorized": "authorization" in headers,
                    "seen_headers": sorted(k for k in headers if k != "authorization"),
                }).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, ValueError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


class LoopbackServer:
    """An echo server on the host's 127.0.0.1 (for URL-string handlers)."""

    def __init__(self):
        self.requests = []

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = "http://127.0.0.1:%d" % self.server.sockets[0].getsockname()[1]
        self._writers = set()
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        for w in list(self._writers):
            w.close()
        await self.server.wait_closed()

    async def _serve(self, reader, writer):
        self._writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:] if l)}
            n = int(headers.get("content-length", "0"))
            body = await reader.readexactly(n) if n else b""
            self.requests.append({"method": method, "path": target, "headers": headers, "body": body})
            data = json.dumps({"from": "orchestrator", "path": target, "method": method,
                               "sandbox_id": headers.get("x-sandbox-id"),
                               "original_url": headers.get("x-original-url"),
                               "body": body.decode()}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(data), data))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


class _EveryName(dict):
    """FakeDNS answers: every name is the upstream."""

    def __init__(self, ip):
        super().__init__()
        self.ip = ip

    def get(self, name, default=None):
        return self.ip


def runtime(tmp_path, up=None) -> sandbox.Runtime:
    """A runtime with its own state dir: other runtimes on this machine (another test
    session) never share its names. With `up`, its resolver is the upstream's FakeDNS."""
    return sandbox.Runtime(state_dir=str(tmp_path / "state"),
                           resolver=f"{up.ip}:53" if up is not None else None)


def text(body: str):
    async def handler(request, ctx):
        return Response(body)
    return handler


# -- SPEC §5: block, deny, allow -----------------------------------------------------------
@run
async def test_enable_internet_false_blocks_egress_and_other_ports(tmp_path):
    """enableInternet = false: HTTP is denied by the proxy, other ports refused at once."""
    async with Upstream(tmp_path, ports=(80, 8080)) as up, runtime(tmp_path, up) as rt:
        box = rt.sandbox()
        await box.start(enable_internet=False)
        async with Inside(box) as c:
            r = await c.get(up.ip, "/x", headers={"Host": "example.test"})
            assert r["status"] == 403 and r["body"] == "denied by no internet: example.test"
            r = await c.get(up.ip, "/x", port=8080)
            assert "ConnectionRefused" in r["error"] or "refused" in r["error"].lower()
        assert up.requests == []
        # Live: the same sandbox gets the internet without a restart.
        box.set_internet(True)
        assert (await inside_once(box, up.ip, "/y", port=8080))["status"] == 200
        assert (await inside_once(box, up.ip, "/z", headers={"Host": "example.test"}))["status"] == 200
        assert [r["path"] for r in up.requests] == ["/y", "/z"]


@run
async def test_denied_hosts_with_internet_on(tmp_path):
    """deniedHosts = ["some-nefarious-website.com", "141.101.64.0/18"] style."""
    async with Upstream(tmp_path) as up, runtime(tmp_path, up) as rt:
        box = rt.sandbox()
        box.set_denied_hosts(["nefarious.test", "*.evil.test", "10.215.0.0/30:80"])
        await box.start()
        async with Inside(box) as c:
            r = await c.get(up.ip, headers={"Host": "nefarious.test"})
            assert (r["status"], r["body"]) == (403, "denied by denied_hosts: nefarious.test")
            r = await c.get(up.ip, headers={"Host": "a.b.evil.test"})
            assert r["status"] == 403
            # The CIDR rule matches the destination IP whatever the Host header says.
            r = await c.get(up.ip, headers={"Host": "fine.test"})
            assert (r["status"], r["body"]) == (403, "denied by denied_hosts: fine.test")
        box.set_denied_hosts(["nefarious.test"])      # live
        async with Inside(box) as c:
            assert (await c.get(up.ip, headers={"Host": "fine.test"}))["status"] == 200
            assert (await c.get(up.ip, headers={"Host": "NEFARIOUS.test."}))["status"] == 403
        assert [r["headers"]["host"] for r in up.requests] == ["fine.test"]


@run
async def test_allowed_hosts_is_deny_by_default(tmp_path):
    """enableInternet = false + allowedHosts: only listed hosts egress."""
    async with Upstream(tmp_path) as up, runtime(tmp_path, up) as rt:
        box = rt.sandbox()
        box.set_allowed_hosts(["allowed.test", "*.cdn.test"])
        await box.start(enable_internet=False)
        async with Inside(box) as c:
            r = await c.get(up.ip, "/a", headers={"Host": "allowed.test"})
            assert r["status"] == 200 and json.loads(r["body"])["host"] == "allowed.test"
            assert (await c.get(up.ip, "/b", headers={"Host": "x.cdn.test"}))["status"] == 200
            r = await c.get(up.ip, "/c", headers={"Host": "other.test"})
            assert (r["status"], r["body"]) == (403, "denied by allowed_hosts: other.test")
            # With the internet on, the allowlist still denies by default.
        box.set_internet(True)
        r = await inside_once(box, up.ip, "/d", headers={"Host": "other.test"})
        assert r["status"] == 403
        # By IP: the allowlist entry names the destination.
        box.set_allowed_hosts([up.ip])
        r = await inside_once(box, up.ip, "/e", headers={"Host": "whatever.test"})
        assert r["status"] == 200
        assert [r["path"] for r in up.requests] == ["/a", "/b", "/e"]


# -- handlers ------------------------------------------------------------------------------
@run
async def test_my_kv_and_my_r2_handlers(tmp_path):
    """Workers over HTTP: http://my.kv/key and http://my.r2/file.png, scoped by ctx."""
    kv = {"some-key": "some-value"}
    r2: dict[str, bytes] = {}
    async with runtime(tmp_path) as rt:
        box = rt.sandbox()

        async def my_kv(request, ctx):
            key = request.url.split("/", 3)[3]
            if request.method == "PUT":
                kv[key] = await request.text()
                return Response("", status=204)
            value = kv.get(key)
            return Response(value or "", status=200 if value is not None else 404)

        async def my_r2(request, ctx):
            path = ctx.sandbox_id + "/" + request.url.split("/", 3)[3]
            if request.method == "PUT":
                r2[path] = await request.read()
                return Response("", status=201)
            obj = r2.get(path)
            return Response(obj or b"", status=200 if obj is not None else 404)

        await box.intercept_outbound_http("my.kv", my_kv)
        await box.intercept_outbound_http("my.r2", my_r2)
        await box.start(enable_internet=False)
        async with Inside(box) as c:
            assert (await c.get("my.kv", "/some-key"))["body"] == "some-value"
            assert (await c.get("my.kv", "/missing"))["status"] == 404
            assert (await c.get("my.kv", "/k2", method="PUT", body="v2"))["status"] == 204
            assert (await c.get("my.kv", "/k2"))["body"] == "v2"
            assert (await c.get("my.r2", "/file.png", method="PUT", body="PNG"))["status"] == 201
            assert (await c.get("my.r2", "/file.png"))["body"] == "PNG"
        assert r2 == {f"{box.id}/file.png": b"PNG"}
        # curl-style from a shell tool: the name resolves inside (synthetic DNS).
        out = await sh(box, "getent hosts my.kv")
        assert out.exit_code == 0 and out.stdout.split()[1] == b"my.kv"


@run
async def test_credential_injection_secret_never_inside(tmp_path):
    """outboundByHost["github.com"] adds Authorization and forwards with fetch: the
    upstream sees the header; the sandbox's environment and files never hold it."""
    secret = "ghp_" + secrets.token_hex(16)
    async with Upstream(tmp_path) as up, runtime(tmp_path, up) as rt:
        box = rt.sandbox()

        async def github(request, ctx):
            headers = request.headers.copy()
            headers["Authorization"] = f"Bearer {secret}"
            path = "/" + request.url.split("/", 3)[3]
            return await box.fetch(Request(request.method, f"http://{up.ip}{path}", headers,
                                           await request.read()))

        await box.intercept_outbound_http("api.github.test", github)
        await box.start(env={"GITHUB_TOKEN": "placeholder"}, enable_internet=False)
        r = await inside_once(box, "api.github.test", "/repos/x", method="POST", body="{}")
        assert r["status"] == 200
        echo = json.loads(r["body"])
        assert echo["authorized"] and echo["path"] == "/repos/x" and echo["body"] == "{}"
        assert up.requests[-1]["headers"]["authorization"] == f"Bearer {secret}"
        assert up.requests[-1]["headers"]["host"] == "api.github.test"
        assert secret not in json.dumps(r)
        # Nowhere inside: every process's environment, and every file outside the
        # read-only host /usr view (which the runtime never writes to).
        out = await sh(box, f"cat /proc/[0-9]*/environ | grep -c {secret}; "
                            f"grep -rsl {secret} / --exclude-dir=proc --exclude-dir=sys --exclude-dir=usr; "
                            f"echo done")
        assert out.stdout.split() == [b"0", b"done"], out


@run
async def test_live_handler_swap_on_keepalive_connection(tmp_path):
    """Open connections pick up a new handler on their next request."""
    async with runtime(tmp_path) as rt:
        box = rt.sandbox()
        await box.intercept_outbound_http("svc.test", text("one"))
        await box.start(enable_internet=False)
        async with Inside(box) as c:
            r1 = await c.get("svc.test", "/")
            await box.intercept_outbound_http("svc.test", text("two"))
            r2 = await c.get("svc.test", "/")
            box.remove_outbound_route("svc.test")
            r3 = await c.get("svc.test", "/")
        assert (r1["body"], r2["body"]) == ("one", "two")
        assert r1["lport"] == r2["lport"] == r3["lport"]     # one TCP connection
        assert (r3["status"], r3["body"]) == (403, "denied by no internet: svc.test")


@run
async def test_handler_error_is_502_and_connection_survives(tmp_path):
    calls = []

    async def flaky(request, ctx):
        calls.append(request.url)
        if request.url.endswith("/boom"):
            raise RuntimeError("handler bug")
        return Response("ok")

    async with runtime(tmp_path) as rt:
        box = rt.sandbox()
        await box.intercept_outbound_http("flaky.test", flaky)
        await box.start()
        async with Inside(box) as c:
            r1 = await c.get("flaky.test", "/boom")
            r2 = await c.get("flaky.test", "/fine")
        assert r1["status"] == 502 and r2["status"] == 200 and r2["body"] == "ok"
        assert r1["lport"] == r2["lport"]
        assert len(calls) == 2


@run
async def test_url_string_handler_gets_sandbox_id_and_original_url(tmp_path):
    async with LoopbackServer() as orch, runtime(tmp_path) as rt:
        box = rt.sandbox()
        await box.intercept_outbound_http("my.api", orch.url)
        await box.start(enable_internet=False)
        r = await inside_once(box, "my.api", "/v1/items?q=1", method="POST", body="hello",
                              headers={"X-Sandbox-Id": "forged"})
        assert r["status"] == 200
        got = json.loads(r["body"])
        assert got == {"from": "orchestrator", "path": "/v1/items?q=1", "method": "POST",
                       "sandbox_id": box.id, "original_url": "http://my.api/v1/items?q=1",
                       "body": "hello"}


@run
async def test_catch_all_handler_method_policy_and_fetch(tmp_path):
    """MyContainer.outbound: non-GET gets 405, GET is forwarded with fetch(request)."""
    async with Upstream(tmp_path) as up, runtime(tmp_path, up) as rt:
        box = rt.sandbox()

        async def outbound(request, ctx):
            if request.method != "GET":
                return Response("Method Not Allowed", status=405)
            return await box.fetch(request)   # to where the sandbox was going (Host)

        await box.intercept_all_outbound_http(outbound)
        await box.start()
        async with Inside(box) as c:
            r = await c.get(up.ip, "/post", method="POST", body="x")
            assert (r["status"], r["body"]) == (405, "Method Not Allowed")
            r = await c.get(up.ip, "/get")
            assert r["status"] == 200 and json.loads(r["body"])["path"] == "/get"
        assert [q["method"] for q in up.requests] == ["GET"]


# -- targets: globs, IPs, CIDRs, ports, IPv6 -------------------------------------------------
@run
async def test_glob_semantics_end_to_end(tmp_path):
    async with Upstream(tmp_path) as up, runtime(tmp_path, up) as rt:
        box = rt.sandbox()
        await box.intercept_outbound_http("*.svc.test", text("glob"))
        await box.intercept_outbound_http("x.svc.test", text("exact"))
        await box.intercept_outbound_http("google.*", text("google"))
        await box.intercept_outbound_http("api.*.com", text("api"))
        await box.start()
        async with Inside(box) as c:
            # Names with a handler resolve inside, glob ones too.
            assert (await c.get("a.b.svc.test"))["body"] == "glob"
            assert (await c.get("x.svc.test"))["body"] == "exact"      # exact beats glob
            assert (await c.get("X.SVC.test."))["body"] == "exact"     # case, trailing dot

            async def via_upstream(host):
                r = await c.get(up.ip, headers={"Host": host})
                return r["body"] if "upstream" not in r["body"] else "upstream"
            assert await via_upstream("svc.test") == "upstream"        # *.x needs a label
            assert await via_upstream("google.co.uk") == "google"
            assert await via_upstream("api.stripe.com") == "api"
            assert await via_upstream("api.stripe.co.uk") == "upstream"
            assert await via_upstream("x.svc.test:80") == "exact"


@run
async def test_ip_cidr_and_port_targets(tmp_path):
    async with Upstream(tmp_path, ports=(80, 443)) as up, runtime(tmp_path, up) as rt:
        box = rt.sandbox()
        await box.intercept_outbound_http("10.215.0.0/24", text("cidr"))
        await box.intercept_outbound_http(up.ip, text("ip"))                  # port 80
        await box.intercept_outbound_http(f"{up.ip}:443", text("ip:443"))      # plain HTTP on 443
        await box.intercept_outbound_http("[2001:db8::1]:80", text("v6"))
        await box.intercept_outbound_http("2001:db8::/32", text("v6net"))
        await box.start()
        async with Inside(box) as c:
            assert (await c.get(up.ip))["body"] == "ip"                        # IP beats CIDR
            assert (await c.get(up.ip, headers={"Host": "named.test"}))["body"] == "ip"
            assert (await c.get(up.ip, port=443))["body"] == "ip:443"
            # Another address of the CIDR: the handler answers, nothing leaves the host.
            assert (await c.get("10.215.0.9"))["body"] == "cidr"
            # An IP literal in Host that is not the destination is refused (SPEC §10:
            # IP rules match the destination the kernel saw, never a Host literal).
            r = await c.get("10.215.0.9", headers={"Host": "[2001:db8::1]"})
            assert r["status"] == 400, r
            r = await c.get("10.215.0.9", headers={"Host": "[2001:db8:1::5]:80"})
            assert r["status"] == 400, r
        assert up.requests == []


@pytest.mark.parametrize("bad", [
    "", " x.test", "[2001:db8::1", "[2001:db8::1]x", "[example.com]:80", "1.2.3.4:99999",
    "1.2.3.4:0", "10.0.0.0/33", "2001:db8::/129", "exa mple.test", "a..b", "host:port",
    "x.test:80:80", "bad_$.test",
])
@run
async def test_malformed_targets_are_value_errors(bad, tmp_path):
    async with runtime(tmp_path) as rt:
        box = rt.sandbox()
        with pytest.raises(ValueError):
            await box.intercept_outbound_http(bad, text("x"))
        with pytest.raises(ValueError):
            await box.intercept_outbound_https(bad, text("x"))
        with pytest.raises(ValueError):
            box.set_allowed_hosts([bad])
        with pytest.raises(ValueError):
            box.set_denied_hosts([bad])
        with pytest.raises(TypeError):
            await box.intercept_outbound_http("ok.test", 42)
        # Well-formed IPv4/IPv6 forms are accepted.
        for good in ("1.2.3.4", "1.2.3.4:8080", "10.0.0.0/8", "::1", "2001:db8::1",
                     "[2001:db8::1]:8080", "2001:db8::/32", "[2001:db8::/32]:443", "*.x.test:8443"):
            await box.intercept_outbound_http(good, text("x"))
        await box.destroy()


# -- HTTPS ---------------------------------------------------------------------------------
@run
async def test_https_interception_verifies_against_sandbox_ca(tmp_path):
    async with runtime(tmp_path) as rt:
        box = rt.sandbox()
        await box.start(enable_internet=False)

        async def secure(request, ctx):
            return Response(f"secure {request.method} {request.url}")

        # Registered after start: the CA is inside before the call returns.
        await box.intercept_outbound_https("secure.test", secure)
        out = await sh(box, f"cmp {CA_FILE} {CF_CA_FILE} && grep -c 'BEGIN CERTIFICATE' {CA_FILE}"
                            f" && ls /etc/sandbox/certs")
        assert out.exit_code == 0 and out.stdout.split() == [b"1", b"sandbox-ca.crt"], out
        async with Inside(box) as c:
            r = await c.get("secure.test", "/p?q=1", tls=True, cafile=CA_FILE)
            assert (r["status"], r["body"]) == (200, "secure GET https://secure.test/p?q=1")
            r2 = await c.get("secure.test", "/again", tls=True, cafile=CF_CA_FILE, new=True)
            assert r2["status"] == 200
            # Without trusting the CA the sandbox refuses our certificate.
            r3 = await c.get("secure.test", "/", tls=True, new=True)
            assert "CERTIFICATE_VERIFY_FAILED" in r3["error"]
            # Plain HTTP to the same name is not routed by an HTTPS registration.
            r4 = await c.get("secure.test", "/")
            assert r4["status"] == 403
        # The key never entered the sandbox.
        out = await sh(box, "grep -rsl 'PRIVATE KEY' /etc /tmp /root /workspace; echo end")
        assert out.stdout.split() == [b"end"]


@run
async def test_https_passthrough_when_not_intercepted(tmp_path):
    """interception off: the sandbox sees the upstream's own certificate."""
    async with Upstream(tmp_path, ports=(), tls_ports=(443,)) as up, runtime(tmp_path, up) as rt:
        box = rt.sandbox()
        await box.intercept_outbound_http("unrelated.test", text("x"))   # HTTP only: no CA
        await box.start()
        assert box.ca is None
        w = await box.exec(["sh", "-c", "cat > /tmp/up.crt"], stdin=up.ca_pem.encode())
        assert (await w.output()).exit_code == 0
        async with Inside(box) as c:
            r = await c.get(up.ip, "/tls", tls=True, cafile="/tmp/up.crt", sni=up.cert_name)
            assert r["status"] == 200, r
            assert "upstream test CA" in r["issuer"]["commonName"]
            assert json.loads(r["body"])["path"] == "/tls"
        # Denied by SNI: closed after the ClientHello.
        box.set_denied_hosts([up.cert_name])
        r = await inside_once(box, up.ip, "/", tls=True, cafile="/tmp/up.crt", sni=up.cert_name)
        assert "error" in r
        assert [q["path"] for q in up.requests] == ["/tls"]


@run
async def test_intercept_https_on_routes_http_handlers_and_egress(tmp_path):
    """interceptHttps = true: per-host handlers see HTTPS too; other HTTPS is terminated
    and re-encrypted to the real destination (which the proxy verifies)."""
    async with runtime(tmp_path) as rt:
        box = rt.sandbox()
        await box.intercept_outbound_http("api.test", text("handled"))
        box.set_intercept_https(True)
        await box.start(enable_internet=False)
        r = await inside_once(box, "api.test", "/", tls=True, cafile=CF_CA_FILE)
        assert (r["status"], r["body"]) == (200, "handled")
        assert r["issuer"]["commonName"].startswith("sandbox")
