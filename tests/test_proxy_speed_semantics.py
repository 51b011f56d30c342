"""What the proxy must keep while it gets fast (issue 13): WebSocket relayed after the
policy decision and spliced (10 MB each way, exact bytes), denied before the upgrade,
answered by a handler; per-request policy on a keep-alive connection whose upstream is
pooled; 1000 concurrent connections from one sandbox all served.

The upstream lives in a netns this test makes; the runtime's resolver is a fake DNS
there that maps every name to it.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket

import pytest

import netns
import sandbox
from sandbox import Response

from helpers import FakeDNS, listen_socket, run

pytestmark = pytest.mark.timeout(120)

MB10 = 10 * 1024 * 1024


class _EveryName(dict):
    def __init__(self, ip):
        super().__init__()
        self.ip = ip

    def get(self, name, default=None):
        return self.ip


class Upstream:
    """Port 80: `Upgrade: websocket` -> 101 then a raw echo; anything else -> 200 with
    `up <path>`, keep-alive. `upgrades` counts 101s, `requests` the plain ones."""

    def __init__(self, tmp_path):
        self.dir = str(tmp_path)
        self.upgrades = 0
        self.requests: list[str] = []
        self._writers = set()

    async def __aenter__(self):
        self.ns = await asyncio.to_thread(netns.NetNS.create, self.dir, "upstream")
        self.veth = self.server = self.dns = None
        try:
            block = netns.AddressPool("10.215.0.0/24").allocate()
            self.veth = await asyncio.to_thread(netns.Veth.create, self.ns, f"sbs{os.getpid() % 100000}", block)
            self.ip = str(block.peer)
            self.server = await asyncio.start_server(self._serve, sock=listen_socket(self.ns, self.ip, 80))
            self.dns = FakeDNS(listen_socket(self.ns, self.ip, 53, socket.SOCK_DGRAM),
                               listen_socket(self.ns, self.ip, 53), _EveryName(self.ip))
            await self.dns.__aenter__()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc):
        if self.dns is not None:
            await self.dns.__aexit__(None, None, None)
        if self.server is not None:
            self.server.close()
            for w in list(self._writers):
                w.close()
            await self.server.wait_closed()
        await asyncio.sleep(0)
        if self.veth is not None:
            await asyncio.to_thread(self.veth.close)
        await asyncio.to_thread(self.ns.close)

    async def _serve(self, reader, writer):
        self._writers.add(writer)
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                path = head.split(" ", 2)[1]
                if "upgrade: websocket" in head.lower():
                    self.upgrades += 1
                    writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\n\r\n")
                    while data := await reader.read(1 << 16):
                        writer.write(data)
                        await writer.drain()
                    writer.write_eof()
                    return
                self.requests.append(path)
                body = f"up {path}".encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, IndexError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


def runtime(tmp_path, up) -> sandbox.Runtime:
    return sandbox.Runtime(state_dir=str(tmp_path / "state"), resolver=f"{up.ip}:53")


# Inside the sandbox: a WebSocket-style upgrade, then MB10 bytes each way at once.
WS = r'''
import hashlib, json, socket, sys, threading
host, n = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((host, 80), timeout=60)
s.sendall(b"GET /ws HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n" % host.encode())
head = b""
while b"\r\n\r\n" not in head:
    d = s.recv(1)
    if not d: break
    head += d
status = int(head.split(b" ")[1]) if head else 0
out = {"status": status, "head": head.decode("latin-1")}
if status != 101:
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    rest = b""
    while len(rest) < length and (d := s.recv(length - len(rest))):
        rest += d
    out["body"] = rest.decode("latin-1")
else:
    block = bytes(range(256)) * 4096  # 1 MiB
    sent = hashlib.sha256()
    def send():
        for i in range(n // len(block)):
            chunk = block[i % 256:] + block[:i % 256]
            sent.update(chunk); s.sendall(chunk)
        s.shutdown(socket.SHUT_WR)
    t = threading.Thread(target=send); t.start()
    got, size = hashlib.sha256(), 0
    while d := s.recv(1 << 16):
        got.update(d); size += len(d)
    t.join()
    out.update(size=size, same=got.hexdigest() == sent.hexdigest())
print(json.dumps(out))
'''

# Inside: `n` connections open at once, then one request on each, all answers read.
MANY = r'''
import asyncio, json, resource, sys
host, n = sys.argv[1], int(sys.argv[2])
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))   # the default soft 1024 < n + a few
async def main():
    import socket
    ip = socket.gethostbyname(host)   # once: the DNS forwarder bounds queries in flight
    conns = await asyncio.gather(*(asyncio.open_connection(ip, 80) for _ in range(n)),
                                 return_exceptions=True)
    ok = [c for c in conns if not isinstance(c, BaseException)]
    for i, (r, w) in enumerate(ok):
        w.write(b"GET /%d HTTP/1.1\r\nHost: %s\r\n\r\n" % (i, host.encode()))
    async def answer(r):
        try:
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 60)
            return head.split(b" ")[1] == b"200"
        except Exception:
            return False
    answers = await asyncio.gather(*(answer(r) for r, w in ok))
    for r, w in ok:
        w.close()
    errors = sorted({repr(c) for c in conns if isinstance(c, BaseException)})
    print(json.dumps({"connected": len(ok), "served": sum(answers), "errors": errors,
                      "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)}))
asyncio.run(main())
'''

KEEPALIVE = r'''
import http.client, json, sys
c = http.client.HTTPConnection(sys.argv[1], 80, timeout=20)
for line in iter(sys.stdin.readline, ""):
    c.request("GET", line.strip()); r = c.getresponse()
    print(json.dumps({"status": r.status, "body": r.read().decode(), "lport": c.sock.getsockname()[1]}), flush=True)
'''


async def py(box, script: str, *args: str, timeout: float = 90) -> dict:
    out = await asyncio.wait_for((await box.exec(["python3", "-c", script, *args])).output(), timeout)
    assert out.exit_code == 0, out.stderr.decode()[-2000:]
    return json.loads(out.stdout)


@run
async def test_websocket_relayed_and_spliced_10mb_each_way(tmp_path):
    async with Upstream(tmp_path) as up, runtime(tmp_path, up) as rt:
        box = rt.sandbox()
        box.set_allowed_hosts(["ws.test"])
        await box.start(enable_internet=False)
        r = await py(box, WS, "ws.test", str(MB10))
        assert r["status"] == 101, r
        assert r["size"] == MB10 and r["same"], r
        assert up.upgrades == 1


@run
async def test_websocket_denied_gets_403_before_any_upgrade(tmp_path):
    async with Upstream(tmp_path) as up, runtime(tmp_path, up) as rt:
        box = rt.sandbox()
        box.set_denied_hosts(["ws.test"])
        await box.start(enable_internet=True)
        r = await py(box, WS, "ws.test", "0")
        assert r["status"] == 403 and "denied by denied_hosts: ws.test" in r["body"], r
        assert up.upgrades == 0 and up.requests == []   # the upstream never saw it


@run
async def test_handler_answers_an_upgrade_with_a_plain_response(tmp_path):
    """A handler receives the Upgrade request (headers intact) and answers it like any
    request: its response is sent as is and the connection does not switch protocols."""
    seen = []

    async def handler(request, ctx):
        seen.append(request.headers.get("upgrade"))
        return Response("no websockets here\n", status=426, headers={"Upgrade": "websocket"})

    async with Upstream(tmp_path) as up, runtime(tmp_path, up) as rt:
        box = rt.sandbox()
        await box.intercept_outbound_http("ws.test", handler)
        await box.start(enable_internet=True)
        r = await py(box, WS, "ws.test", "0")
        assert r["status"] == 426 and "no websockets here" in r["body"], r
        assert seen == ["websocket"] and up.upgrades == 0


@run
async def test_keepalive_egress_then_policy_change_applies_to_next_request(tmp_path):
    """The upstream connection is pooled across requests of one sandbox connection; a
    policy change between two requests still decides the second one."""
    async with Upstream(tmp_path) as up, runtime(tmp_path, up) as rt:
        box = rt.sandbox()
        box.set_allowed_hosts(["api.test"])
        await box.start(enable_internet=False)
        proc = await box.exec(["python3", "-c", KEEPALIVE, "api.test"], stdin="pipe", stderr="combined")
        buf = b""

        async def get(path):
            nonlocal buf
            proc.stdin.write(path.encode() + b"\n")
            await proc.stdin.drain()
            while b"\n" not in buf:
                chunk = await asyncio.wait_for(proc.stdout.read(65536), 30)
                assert chunk, buf
                buf += chunk
            line, _, buf = buf.partition(b"\n")
            return json.loads(line)

        r1 = await get("/one")
        r2 = await get("/two")
        box.set_allowed_hosts(["other.test"])
        r3 = await get("/three")
        proc.stdin.close()
        await asyncio.wait_for(proc.exit_code, 20)
        assert (r1["status"], r1["body"], r2["body"]) == (200, "up /one", "up /two")
        assert r1["lport"] == r2["lport"] == r3["lport"]
        assert r3["status"] == 403 and r3["body"] == "denied by allowed_hosts: api.test"
        assert up.requests == ["/one", "/two"]


@run
async def test_1000_concurrent_connections_from_one_sandbox_all_served(tmp_path):
    """The per-sandbox bound is sufficient for 1000 open connections (it still exists:
    test_boundary_net's flood test)."""
    async def ok(request, ctx):
        return Response("ok")

    async with Upstream(tmp_path) as up, runtime(tmp_path, up) as rt:
        box = rt.sandbox()
        await box.intercept_outbound_http("many.test", ok)
        await box.start(enable_internet=False)
        r = await py(box, MANY, "many.test", "1000")
        assert (r["connected"], r["served"]) == (1000, 1000), r
