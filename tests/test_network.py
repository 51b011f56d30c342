"""Sandbox networking end to end, on the real kernel (SPEC §3 get_tcp_port, §5, §10 DNS
and Ports; DESIGN §3).

A fake internet made here stands in for the world: three network namespaces of our own,
each behind a veth whose host end is routed from the host netns —

- ``up``: the upstream host: HTTP on 80, a TCP echo on 8080 and a UDP echo on 8080;
- ``dns``: the resolver given to ``Runtime(resolver=...)``: UDP+TCP 53, logs every query
  and answers any A query with the upstream's address;
- ``decoy``: a second DNS server (UDP+TCP 53) that must never receive anything.

Every server is a socket created inside its namespace and served by asyncio in the test
process, so each one logs who talked to it. Traffic goes only to these namespaces and to
loopback; the one exception on purpose, 9.9.9.9:53, is only ever sent with
``enable_internet=False``, where a broken DNS redirect would still be refused by the host
(never forwarded). Code inside the sandbox runs as ``python3 -c PROBE op...`` (the host's
read-only /usr): each op prints one JSON result with the errno name and the time it took.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import os
import shutil
import socket
import sys

import dns.message
import dns.rrset
import pytest

import netns
import sandbox
from sandbox.proxy.models import Response
from sandbox import network as sandbox_network

pytestmark = pytest.mark.timeout(60)

_ID = os.getpid() % 100000
BLOCK = sandbox_network.BLOCK_PREFIX   # a sandbox's link: /31 (sandbox/network.py)
WORLD_CIDR = f"10.214.{os.getpid() % 256}.0/24"   # the fake internet's /30s
FAST = 1.0   # seconds: a refused connection must fail well within this
LONG = 20.0  # seconds: upper bound for one probe exec


# -- the fake internet -----------------------------------------------------------------


class Machine:
    """One fake host: a netns of ours plus a veth; ``ip`` inside, ``gw`` the host end."""

    def __init__(self, state_dir: str, name: str, ifname: str, block) -> None:
        self.ns = netns.NetNS.create(state_dir, name)
        try:
            self.veth = netns.Veth.create(self.ns, ifname, block)
        except BaseException:
            self.ns.close()
            raise
        self.ip = str(block.peer)
        self.gw = str(block.host)

    def listen(self, kind: int, port: int) -> socket.socket:
        """A bound (and for TCP listening) non-blocking socket inside this netns."""
        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, kind | socket.SOCK_CLOEXEC)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("0.0.0.0", port))
                if kind == socket.SOCK_STREAM:
                    s.listen(64)
                s.setblocking(False)
            except BaseException:
                s.close()
                raise
            return s
        return self.ns.run_in(make)

    def close(self) -> None:
        try:
            self.veth.close()
        finally:
            self.ns.close()


class World:
    """The three machines (sync part: kernel objects; see ``Servers`` for the rest)."""

    def __init__(self, stack: contextlib.ExitStack, state_dir: str) -> None:
        pool = netns.AddressPool(WORLD_CIDR)
        self.machines = {}
        for role, letter in (("up", "u"), ("dns", "r"), ("decoy", "x")):
            m = Machine(state_dir, f"w-{role}", f"tw{_ID}{letter}", pool.allocate())
            stack.callback(m.close)
            self.machines[role] = m
        self.up, self.dns, self.decoy = (self.machines[r] for r in ("up", "dns", "decoy"))


@pytest.fixture
def world(tmp_path):
    with contextlib.ExitStack() as stack:
        yield World(stack, str(tmp_path / "world"))


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, handle) -> None:
        self.handle = handle

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        reply = self.handle(data, addr, "udp")
        if reply is not None:
            self.transport.sendto(reply, addr)


class Servers:
    """Every server of the fake internet, with logs. ``async with Servers(world)``."""

    def __init__(self, world: World) -> None:
        self.w = world
        self.http: list[tuple] = []        # (peer ip, method, path, host header)
        self.echo: list[str] = []          # peer ips of TCP echo connections
        self.udp: list[str] = []           # peer ips of UDP echo datagrams
        self.dns: list[tuple] = []         # (transport, qname, peer ip) at the resolver
        self.decoy: list[tuple] = []       # same, at the decoy: must stay empty
        self._servers: list = []
        self._transports: list = []
        self._tasks: set[asyncio.Task] = set()

    async def __aenter__(self) -> "Servers":
        try:
            up, res, decoy = self.w.up, self.w.dns, self.w.decoy
            await self._tcp(up.listen(socket.SOCK_STREAM, 80), self._serve_http)
            await self._tcp(up.listen(socket.SOCK_STREAM, 8080), self._serve_echo)
            await self._udp(up.listen(socket.SOCK_DGRAM, 8080), self._udp_echo)
            answer = self.w.up.ip
            for m, log in ((res, self.dns), (decoy, self.decoy)):
                handler = self._dns_handler(log, answer if m is res else "10.0.0.99")
                await self._udp(m.listen(socket.SOCK_DGRAM, 53), handler)
                await self._tcp(m.listen(socket.SOCK_STREAM, 53), self._dns_tcp(handler))
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        for s in self._servers:
            s.close()
        for t in self._transports:
            t.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        for s in self._servers:
            await s.wait_closed()
        await asyncio.sleep(0)   # let transports' close callbacks run (fds)

    async def _tcp(self, sock, serve) -> None:
        async def tracked(reader, writer):
            self._tasks.add(asyncio.current_task())
            try:
                await serve(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                pass
            finally:
                writer.close()
                self._tasks.discard(asyncio.current_task())
        try:
            self._servers.append(await asyncio.start_server(tracked, sock=sock))
        except BaseException:
            sock.close()
            raise

    async def _udp(self, sock, handle) -> None:
        try:
            t, _ = await asyncio.get_running_loop().create_datagram_endpoint(lambda: _Udp(handle), sock=sock)
        except BaseException:
            sock.close()
            raise
        self._transports.append(t)

    async def _serve_http(self, reader, writer) -> None:
        peer = writer.get_extra_info("peername")[0]
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, v in
                       (line.split(":", 1) for line in lines[1:] if ":" in line)}
            if int(headers.get("content-length", 0)):
                await reader.readexactly(int(headers["content-length"]))
            self.http.append((peer, method, path, headers.get("host")))
            body = f"upstream saw {peer} {path}".encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()

    async def _serve_echo(self, reader, writer) -> None:
        self.echo.append(writer.get_extra_info("peername")[0])
        while data := await reader.read(4096):
            writer.write(data)
            await writer.drain()

    def _udp_echo(self, data, addr, _):
        self.udp.append(addr[0])
        return data

    @staticmethod
    def _dns_handler(log: list, answer_ip: str):
        def handle(data, addr, transport):
            q = dns.message.from_wire(data)
            name = q.question[0].name.to_text()
            log.append((transport, name, addr[0]))
            r = dns.message.make_response(q)
            r.answer.append(dns.rrset.from_text(name, 60, "IN", "A", answer_ip))
            return r.to_wire()
        return handle

    @staticmethod
    def _dns_tcp(handle):
        async def serve(reader, writer):
            peer = writer.get_extra_info("peername")
            while True:
                try:
                    n = int.from_bytes(await reader.readexactly(2), "big")
                except asyncio.IncompleteReadError:
                    return
                reply = handle(await reader.readexactly(n), peer, "tcp")
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await writer.drain()
        return serve


# -- code run inside the sandbox ---------------------------------------------------------

PROBE = r'''
import errno, json, os, random, socket, struct, sys, time

def ename(e):
    if isinstance(e, socket.timeout):
        return "TIMEOUT"
    return errno.errorcode.get(e.errno, str(e))

def tcp(ip, port, data=""):
    with socket.create_connection((ip, int(port)), timeout=5) as s:
        if not data:
            return "connected"
        s.sendall(data.encode())
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(4096):
            out += chunk
        return out.decode()

def udp(ip, port, data="ping"):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.connect((ip, int(port)))
        s.send(data.encode())
        return s.recv(4096).decode()   # an ICMP error surfaces here

def http(ip, path):
    import http.client
    c = http.client.HTTPConnection(ip, 80, timeout=5)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return [r.status, r.read().decode()]
    finally:
        c.close()

def _query(name):
    qid = random.randrange(1, 65535)
    wire = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    wire += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return qid, wire + struct.pack(">HH", 1, 1)

def _skip(m, i):
    while True:
        n = m[i]
        if n == 0:
            return i + 1
        if n & 0xC0 == 0xC0:
            return i + 2
        i += 1 + n

def _answers(m, qid):
    rid, flags, qd, an = struct.unpack(">HHHH", m[:8])
    if rid != qid:
        raise OSError(errno.EPROTO, "wrong query id")
    i = 12
    for _ in range(qd):
        i = _skip(m, i) + 4
    out = []
    for _ in range(an):
        i = _skip(m, i)
        typ, _c, _t, n = struct.unpack(">HHIH", m[i:i + 10])
        i += 10
        if typ == 1:
            out.append(socket.inet_ntoa(m[i:i + 4]))
        i += n
    return out

def dns_udp(server, name):
    qid, q = _query(name)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.sendto(q, (server, 53))
        m, src = s.recvfrom(4096)
        return [src[0], _answers(m, qid)]

def dns_tcp(server, name):
    qid, q = _query(name)
    with socket.create_connection((server, 53), timeout=3) as s:
        s.sendall(struct.pack(">H", len(q)) + q)
        f = s.makefile("rb")
        n = struct.unpack(">H", f.read(2))[0]
        return _answers(f.read(n), qid)

def resolve(name):
    return sorted({a[4][0] for a in socket.getaddrinfo(name, 80, socket.AF_INET, socket.SOCK_STREAM)})

def _netlink(msg_type, flags, body):
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0) as s:
        s.bind((0, 0))
        s.settimeout(3)
        s.send(struct.pack("=IHHII", 16 + len(body), msg_type, flags, 1, 0) + body)
        m = s.recv(65536)
        if struct.unpack("=H", m[4:6])[0] != 2:   # NLMSG_ERROR (with ACK)
            raise OSError(errno.EPROTO, "no netlink ack")
        code = struct.unpack("=i", m[16:20])[0]
        if code:
            raise OSError(-code, os.strerror(-code))
        return "accepted"

NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 1, 4, 0x200, 0x400

def nl_route_add():
    # RTM_NEWROUTE 10.99.0.0/24 dev eth0 (main table, static, unicast)
    idx = socket.if_nametoindex("eth0")
    body = struct.pack("=BBBBBBBBI", socket.AF_INET, 24, 0, 0, 254, 4, 0, 1, 0)
    body += struct.pack("=HH4s", 8, 1, socket.inet_aton("10.99.0.0"))   # RTA_DST
    body += struct.pack("=HHi", 8, 4, idx)                              # RTA_OIF
    return _netlink(24, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body)

def nl_link_down():
    # RTM_NEWLINK eth0: change IFF_UP to 0
    body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, socket.if_nametoindex("eth0"), 0, 1)
    return _netlink(16, NLM_F_REQUEST | NLM_F_ACK, body)

def nl_addr_add():
    # RTM_NEWADDR 10.99.1.1/32 on eth0
    body = struct.pack("=BBBBI", socket.AF_INET, 32, 0, 0, socket.if_nametoindex("eth0"))
    body += struct.pack("=HH4s", 8, 2, socket.inet_aton("10.99.1.1"))   # IFA_LOCAL
    return _netlink(20, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body)

def raw_icmp():
    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()
    return "created"

def ping_socket(ip):
    # the unprivileged "ping socket"; allowed only for groups in ping_group_range
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP) as s:
        s.settimeout(2)
        s.connect((ip, 0))
        s.send(struct.pack(">BBHHH", 8, 0, 0xF7FE, 0, 1))
        return s.recv(1024).hex()

def v6_route():
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.connect(("2001:db8::1", 53))   # a route lookup only: UDP connect sends nothing
        return s.getsockname()[0]

def read(path):
    with open(path) as f:
        return f.read()

def write(path, data):
    with open(path, "w") as f:
        f.write(data)
    return "written"

def listening(port, seconds):
    # bounded wait for a TCP listener on port (state 0A = LISTEN); returns its address
    suffix = ":%04X" % int(port)
    deadline = time.monotonic() + float(seconds)
    while time.monotonic() < deadline:
        with open("/proc/net/tcp") as f:
            for l in list(f)[1:]:
                local, state = l.split()[1], l.split()[3]
                if local.endswith(suffix) and state == "0A":
                    return socket.inet_ntoa(bytes.fromhex(local.split(":")[0])[::-1])
        time.sleep(0.01)
    raise OSError(errno.ETIMEDOUT, "nothing listening")

ops = globals()
args = sys.argv[1:]
while args:
    op, n = args[0], int(args[1])
    params, args = args[2:2 + n], args[2 + n:]
    t = time.monotonic()
    try:
        r = {"ok": ops[op](*params)}
    except OSError as e:
        r = {"err": ename(e)}
    r["s"] = round(time.monotonic() - t, 4)
    print(json.dumps(r), flush=True)
'''


async def probe(box, *calls: tuple) -> list[dict]:
    """Run ops inside ``box`` in one python3; one ``{"ok"|"err", "s"}`` per call."""
    argv = ["python3", "-c", PROBE]
    for op, *params in calls:
        argv += [op, str(len(params)), *map(str, params)]
    proc = await box.exec(argv)
    out = await asyncio.wait_for(proc.output(), LONG)
    assert out.exit_code == 0, out.stderr.decode()
    results = [json.loads(line) for line in out.stdout.decode().splitlines()]
    assert len(results) == len(calls), out
    return results


def refused_fast(r: dict, allowed=("ECONNREFUSED", "EHOSTUNREACH")) -> None:
    assert r.get("err") in allowed, r
    assert r["s"] < FAST, r


@contextlib.asynccontextmanager
async def runtime(tmp_path, world: World):
    async with sandbox.Runtime(state_dir=str(tmp_path / "rt"), resolver=f"{world.dns.ip}:53") as rt:
        yield rt


@contextlib.asynccontextmanager
async def other_runtime(state_dir, world: World):
    """A second runtime in its own process (OTHER_RUNTIME): yields its sandbox's
    address; closing its stdin makes it exit, killed if it does not in time."""
    other = await asyncio.create_subprocess_exec(
        sys.executable, "-c", OTHER_RUNTIME, str(state_dir), f"{world.dns.ip}:53",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    try:
        address = (await asyncio.wait_for(other.stdout.readline(), 20)).decode().strip()
        assert address, "the other runtime did not start"
        yield address
    finally:
        other.stdin.close()
        try:
            await asyncio.wait_for(other.wait(), 20)
        except asyncio.TimeoutError:
            other.kill()
            await other.wait()


def run(coro):
    return asyncio.run(coro)


# -- enable_internet=False ---------------------------------------------------------------


def test_no_internet_http_goes_to_proxy_and_allowed_hosts_relays(tmp_path, world):
    async def main():
        async with Servers(world) as srv, runtime(tmp_path, world) as rt:
            box = rt.sandbox()
            await box.start(enable_internet=False)
            up = world.up.ip
            [denied] = await probe(box, ("http", up, "/denied"))
            assert denied.get("ok") == [403, f"denied by no internet: {up}"], denied
            assert srv.http == [], "a denied request reached the upstream"

            box.set_allowed_hosts([up])          # live: no restart
            [ok, tcp] = await probe(box, ("http", up, "/allowed"), ("tcp", up, 8080, "x"))
            assert (ok.get("ok") or [None])[0] == 200, ok
            # Relayed by the proxy from the host netns: the upstream sees the host end of
            # its own veth, never the sandbox's address.
            assert srv.http == [(world.up.gw, "GET", "/allowed", up)]
            assert ok.get("ok")[1] == f"upstream saw {world.up.gw} /allowed"
            assert world.up.gw != box.address
            # allowed_hosts is HTTP(S) policy: it opens no other port.
            refused_fast(tcp)
            assert srv.echo == []

            # A name resolved through the pinned DNS, then allowed by name.
            box.set_allowed_hosts(["web.test"])
            [addr, byname, byip] = await probe(box, ("resolve", "web.test"),
                                               ("http", "web.test", "/byname"),
                                               ("http", up, "/byip"))
            assert addr.get("ok") == [up], addr
            assert byname.get("ok") == [200, f"upstream saw {world.up.gw} /byname"], byname
            assert byip.get("ok") == [403, f"denied by allowed_hosts: {up}"], byip
    run(main())


def test_no_internet_other_traffic_fails_fast(tmp_path, world):
    async def main():
        async with Servers(world) as srv, runtime(tmp_path, world) as rt:
            box = rt.sandbox()
            await box.start(enable_internet=False)
            up = world.up.ip
            tcp, udp, tcp_gw, raw, ping = await probe(
                box, ("tcp", up, 8080, "hello"), ("udp", up, 8080), ("tcp", world.up.gw, 8080),
                ("raw_icmp",), ("ping_socket", up))
            refused_fast(tcp)
            # UDP: the host answers with ICMP (admin-prohibited: EHOSTUNREACH; port
            # unreachable would be ECONNREFUSED) and the connected socket's recv fails.
            refused_fast(udp)
            # The host's own addresses are not reachable either (input chain).
            refused_fast(tcp_gw)
            assert srv.echo == [] and srv.udp == []
            # No ping: there is no ping binary here, and ICMP needs a raw socket
            # (CAP_NET_RAW is not in the default set) or a ping socket (the netns keeps
            # ping_group_range at "1 0": nobody). Either way no echo request leaves.
            assert raw.get("err") == "EPERM", raw
            assert ping.get("err") in ("EACCES", "EPERM", "EHOSTUNREACH", "ECONNREFUSED"), ping
            if shutil.which("ping"):
                proc = await box.exec(["ping", "-c1", "-W1", up])
                assert (await asyncio.wait_for(proc.output(), LONG)).exit_code != 0
    run(main())


@pytest.mark.parametrize("internet", [False, True], ids=["no-internet", "internet"])
def test_dns_is_pinned_to_the_resolver(tmp_path, world, internet):
    async def main():
        async with Servers(world) as srv, runtime(tmp_path, world) as rt:
            box = rt.sandbox()
            await box.start(enable_internet=internet)
            decoy = world.decoy.ip
            calls = [("dns_udp", decoy, "u-decoy.test"), ("dns_tcp", decoy, "t-decoy.test"),
                     ("resolve", "libc.test")]
            if not internet:
                # Only without internet: even if the redirect were broken, the host
                # would refuse this rather than forward it to the real 9.9.9.9.
                calls += [("dns_udp", "9.9.9.9", "u-quad9.test"), ("dns_tcp", "9.9.9.9", "t-quad9.test")]
            results = await probe(box, *calls)
            up = world.up.ip
            assert results[0].get("ok") == [decoy, [up]], results[0]   # reply seems to come from decoy
            assert results[1].get("ok") == [up], results[1]
            assert results[2].get("ok") == [up], results[2]
            if not internet:
                assert results[3].get("ok") == ["9.9.9.9", [up]], results[3]
                assert results[4].get("ok") == [up], results[4]
            # Each query reached the resolver once, over the transport the sandbox used.
            seen = {(q[1], q[0]) for q in srv.dns}
            for op, _server, name in (c for c in calls if len(c) == 3):
                assert (name + ".", op[-3:]) in seen, (name, srv.dns)
            assert "libc.test." in {q[1] for q in srv.dns}
            # From the host side (the forwarder), never from the sandbox's address.
            assert {q[2] for q in srv.dns} == {world.dns.gw}, srv.dns
            assert srv.decoy == [], f"the decoy resolver was reached: {srv.decoy}"
            assert srv.http == [] and srv.echo == [] and srv.udp == []
    run(main())


# -- enable_internet=True and the live switch ----------------------------------------------


LIVE = r'''
import socket, sys
s = socket.create_connection((sys.argv[1], 8080), timeout=5)
for line in sys.stdin:
    s.sendall(line.encode())
    print(s.recv(4096).decode(), end="", flush=True)
'''


def test_internet_nat_and_live_toggle(tmp_path, world):
    async def main():
        async with Servers(world) as srv, runtime(tmp_path, world) as rt:
            box = rt.sandbox()
            await box.start(enable_internet=True)
            up = world.up.ip
            tcp, udp = await probe(box, ("tcp", up, 8080, "hello"), ("udp", up, 8080, "dgram"))
            assert tcp.get("ok") == "hello" and udp.get("ok") == "dgram", (tcp, udp)
            # Masqueraded: the upstream sees the host, not the sandbox's address.
            assert srv.echo == [world.up.gw] and srv.udp == [world.up.gw]

            # A connection opened before the switch...
            live = await box.exec(["python3", "-c", LIVE, up], stdin="pipe")
            buf = bytearray()

            async def roundtrip(line: bytes) -> bytes:
                live.stdin.write(line)
                await live.stdin.drain()
                while b"\n" not in buf:
                    chunk = await asyncio.wait_for(live.stdout.read(4096), 5)
                    assert chunk, "the live connection's process ended"
                    buf.extend(chunk)
                out, _, rest = bytes(buf).partition(b"\n")
                buf[:] = rest
                return out

            assert await roundtrip(b"before\n") == b"before"
            box.set_internet(False)
            tcp, udp, http = await probe(box, ("tcp", up, 8080), ("udp", up, 8080), ("http", up, "/"))
            refused_fast(tcp)
            refused_fast(udp)
            assert http.get("ok") == [403, f"denied by no internet: {up}"], http
            # ...survives it (SPEC §5: no open connection is dropped).
            assert await roundtrip(b"during\n") == b"during"

            box.set_internet(True)
            tcp, http = await probe(box, ("tcp", up, 8080, "again"), ("http", up, "/on"))
            assert tcp.get("ok") == "again", tcp
            assert http.get("ok") == [200, f"upstream saw {world.up.gw} /on"], http
            live.stdin.close()
            assert await asyncio.wait_for(live.exit_code, 5) == 0
    run(main())


# -- reach-in: get_tcp_port ------------------------------------------------------------------


async def _host_connect(ip: str, port: int) -> BaseException | None:
    try:
        _, w = await asyncio.wait_for(asyncio.open_connection(ip, port), 3)
    except (OSError, asyncio.TimeoutError) as e:
        return e
    w.close()
    await w.wait_closed()
    return None


def test_get_tcp_port(tmp_path, world):
    async def main():
        async with runtime(tmp_path, world) as rt:
            box = rt.sandbox()
            await box.start(entrypoint=["python3", "-m", "http.server", "8080", "--bind", "127.0.0.1"],
                            enable_internet=False)
            [ready] = await probe(box, ("listening", 8080, 10))
            assert ready.get("ok") == "127.0.0.1", ready

            port = box.get_tcp_port(8080)
            resp = await port.fetch("/")
            assert isinstance(resp, Response) and resp.status == 200
            assert b"Directory listing for /" in await resp.read()
            resp = await port.fetch("/etc/resolv.conf")
            assert resp.status == 200 and b"nameserver" in await resp.read()

            reader, writer = await port.connect()
            writer.write(b"GET /nope HTTP/1.0\r\n\r\n")
            assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.0 404")
            writer.close()
            await writer.wait_closed()

            # Nothing is exposed on the host: the sandbox's address does not serve it.
            err = await _host_connect(box.address, 8080)
            assert isinstance(err, (ConnectionRefusedError, OSError)) and \
                getattr(err, "errno", None) in (errno.ECONNREFUSED, errno.EHOSTUNREACH), err

            # Nor from anywhere else (the fake internet stands for the LAN), even for a
            # server bound to 0.0.0.0.
            await box.exec(["python3", "-m", "http.server", "8082"], stdout="ignore", stderr="ignore")
            [ready] = await probe(box, ("listening", 8082, 10))
            assert ready.get("ok") == "0.0.0.0", ready
            from_lan = world.up.ns.run_in(_connect_once, box.address, 8082)
            assert from_lan in ("ECONNREFUSED", "EHOSTUNREACH"), from_lan
            assert (await box.get_tcp_port(8082).fetch("/")).status == 200

            for bad in (0, 70000, -1):
                with pytest.raises(ValueError):
                    box.get_tcp_port(bad)
            with pytest.raises(ConnectionRefusedError):
                await box.get_tcp_port(8081).connect()
    run(main())


def _connect_once(ip: str, port: int) -> str:
    with socket.socket() as s:
        s.settimeout(FAST)
        try:
            s.connect((ip, port))
        except socket.timeout:
            return "TIMEOUT"
        except OSError as e:
            return errno.errorcode[e.errno]
        return "connected"


def test_host_processes_cannot_reach_sandbox_services(tmp_path, world):
    async def main():
        async with runtime(tmp_path, world) as rt:
            box = rt.sandbox()
            await box.start(entrypoint=["python3", "-m", "http.server", "8082"], enable_internet=False)
            [ready] = await probe(box, ("listening", 8082, 10))
            assert ready.get("ok") == "0.0.0.0", ready
            assert _connect_once(box.address, 8082) in ("ECONNREFUSED", "EHOSTUNREACH")
    run(main())


# -- the sandbox cannot change its own network ----------------------------------------------


def test_root_inside_cannot_change_network(tmp_path, world):
    async def main():
        async with runtime(tmp_path, world) as rt:
            box = rt.sandbox()
            await box.start(enable_internet=False)
            for cmd in (["ip", "route", "add", "10.99.0.0/24", "dev", "eth0"],
                        ["ip", "link", "set", "eth0", "down"],
                        ["ip", "addr", "add", "10.99.1.1/32", "dev", "eth0"],
                        ["nft", "add", "table", "inet", "escape"],
                        ["nft", "flush", "ruleset"]):
                proc = await box.exec(cmd)
                out = await asyncio.wait_for(proc.output(), LONG)
                assert out.exit_code != 0, (cmd, out)
                assert b"Operation not permitted" in out.stderr, (cmd, out)
            # The same through a bare netlink socket (no tool needed), and the sysctls.
            r = await probe(box, ("nl_route_add",), ("nl_link_down",), ("nl_addr_add",),
                            ("write", "/proc/sys/net/ipv4/ip_forward", "1"),
                            ("write", "/proc/sys/net/ipv6/conf/all/disable_ipv6", "0"),
                            ("read", "/proc/net/route"))
            assert [x.get("err") for x in r[:3]] == ["EPERM"] * 3, r
            assert r[3].get("err") in ("EROFS", "EACCES", "EPERM"), r[3]
            assert r[4].get("err") in ("EROFS", "EACCES", "EPERM"), r[4]
            routes = r[5].get("ok").splitlines()[1:]
            assert sorted(line.split()[:2] for line in routes) == [
                ["eth0", "00000000"], ["eth0", "%08X" % int.from_bytes(
                    ipaddress.ip_network(f"{box.address}/{BLOCK}", strict=False).network_address.packed,
                    "little")]], routes
            # Still connected as configured.
            proc = await box.exec(["ip", "-o", "-4", "addr", "show", "dev", "eth0", "up"])
            out = await proc.output()
            assert f"inet {box.address}/{BLOCK}" in out.stdout.decode(), out
    run(main())


def test_resolv_conf_and_no_ipv6(tmp_path, world):
    async def main():
        async with runtime(tmp_path, world) as rt:
            box = rt.sandbox()
            await box.start()
            gateway = str(ipaddress.ip_address(box.address) - 1)
            conf, inet6, dis_all, dis_def, route6, links = await probe(
                box, ("read", "/etc/resolv.conf"), ("read", "/proc/net/if_inet6"),
                ("read", "/proc/sys/net/ipv6/conf/all/disable_ipv6"),
                ("read", "/proc/sys/net/ipv6/conf/default/disable_ipv6"),
                ("v6_route",), ("read", "/proc/net/dev"))
            servers = [line.split()[1] for line in conf.get("ok").splitlines()
                       if line.startswith("nameserver")]
            assert servers == [gateway], conf
            assert inet6.get("ok", "") == "", inet6          # no IPv6 address at all
            assert dis_all.get("ok", "").strip() == "1" and dis_def.get("ok", "").strip() == "1"
            assert route6.get("err") in ("ENETUNREACH", "EADDRNOTAVAIL", "EAFNOSUPPORT"), route6
            ifaces = sorted(line.split(":")[0].strip() for line in links.get("ok").splitlines()[2:])
            assert ifaces == ["eth0", "lo"], ifaces
    run(main())


# -- many at once ------------------------------------------------------------------------------


def test_twenty_concurrent_sandboxes(tmp_path, world):
    async def main():
        async with runtime(tmp_path, world) as rt:
            prefix, table = f"s{rt.tag}h", netns.table_name(rt.tag)
            boxes = [rt.sandbox() for _ in range(20)]
            await asyncio.gather(*(b.start(enable_internet=False) for b in boxes))
            addrs = [b.address for b in boxes]
            assert len(set(addrs)) == 20, addrs
            nets = {ipaddress.ip_network(f"{a}/{BLOCK}", strict=False) for a in addrs}
            assert len(nets) == 20 and all(ipaddress.ip_address(a).is_private for a in addrs)
            async def inside_address(b):
                proc = await b.exec(["ip", "-o", "-4", "addr", "show", "dev", "eth0"])
                return await asyncio.wait_for(proc.output(), LONG)
            outs = await asyncio.gather(*(inside_address(b) for b in boxes))
            for b, out in zip(boxes, outs):
                assert f"inet {b.address}/{BLOCK}" in out.stdout.decode(), out
            # 20, plus the namespaces the runtime keeps ready for the next start()
            assert len([n for n in os.listdir("/sys/class/net") if n.startswith(prefix)]) >= 20
            assert table in netns.nft.list_tables("inet")
            await asyncio.gather(*(b.destroy() for b in boxes[:10]))   # half by hand
        assert [n for n in os.listdir("/sys/class/net") if n.startswith(prefix)] == []
        assert table not in netns.nft.list_tables("inet")
        ns_dir = tmp_path / "rt" / "netns"
        assert not ns_dir.exists() or os.listdir(ns_dir) == []
    run(main())


# -- several runtimes on one machine ----------------------------------------------------------


OTHER_RUNTIME = r'''
import asyncio, sys
import sandbox

async def main():
    async with sandbox.Runtime(state_dir=sys.argv[1], resolver=sys.argv[2]) as rt:
        box = rt.sandbox()
        await box.start(enable_internet=False)
        print(box.address, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main())
'''


def test_two_runtimes_get_disjoint_addresses(tmp_path, world):
    """Another process's runtime (another orchestrator, `sandbox serve`) is already up.
    Regression: both used to hand out 10.213.0.0/30 first, one address then sat on two
    host interfaces, and replies to the later runtime's sandboxes left through the
    other's veth (its proxy and DNS timed out)."""
    async def main():
        async with Servers(world) as srv:
            async with other_runtime(tmp_path / "other", world) as other_address:
                async with runtime(tmp_path, world) as rt:
                    box = rt.sandbox()
                    await box.start(enable_internet=False)
                    [http, dns_] = await probe(box, ("http", world.up.ip, "/"),
                                               ("dns_udp", world.decoy.ip, "two.test"))
                    assert box.address != other_address
                    assert http.get("ok") == [403, f"denied by no internet: {world.up.ip}"], http
                    assert dns_.get("ok") == [world.decoy.ip, [world.up.ip]], dns_
            assert srv.decoy == []
    run(main())


def test_two_runtimes_share_a_state_dir(tmp_path, world):
    async def main():
        # tmp_path / "rt" is what runtime() uses too.
        async with other_runtime(tmp_path / "rt", world) as other_address:
            async with runtime(tmp_path, world) as rt:
                box = rt.sandbox()
                await box.start(enable_internet=False)
                assert box.address != other_address
    run(main())
