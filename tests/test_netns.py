"""netns on the real kernel: namespaces, veths, the runtime's nft table, gc.

Needs root.  All traffic stays on loopback or inside namespaces made here:
an "upstream" namespace plays the internet, reached through the host.
Names (link prefixes, nft tag, address ranges) are unique per test process so
a concurrent run of other suites cannot collide with ours.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import pytest
from pyroute2 import IPRoute

import netns
from netns import AddressPool, HostNetwork, NetNS, NftError, Veth
from netns import gc as netns_gc
from netns._threads import run_in_thread
from netns.nft import Nft

pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

_ID = os.getpid() % 100000
TAG = f"t{_ID}"
PREFIX = f"tn{_ID}-"  # sandbox host ends: tn12345-0 (<= 15 chars)
UP_PREFIX = f"tu{_ID}-"  # the fake internet's host end, outside PREFIX*
SANDBOX_CIDR = f"10.250.{_ID % 256}.0/24"
UPSTREAM_CIDR = f"10.251.{_ID % 256}.0/28"
MARK, TABLE = netns.derive_mark_table(TAG)
TABLE_NAME = netns.table_name(TAG)
IP_TRANSPARENT = 19  # SOL_IP option, not exported by Python's socket module
FAST = 1.0  # seconds: a refused connection must fail well within this


# -- kernel state snapshots ------------------------------------------------


def _links() -> list[str]:
    return netns_gc.list_links(PREFIX) + netns_gc.list_links(UP_PREFIX)


def _rules() -> list[tuple]:
    def dump():
        with IPRoute() as ipr:
            return sorted(
                (r.get("priority") or 0, r.get("FRA_FWMARK") or 0, r.get("FRA_TABLE") or r["table"])
                for r in ipr.rule("dump")
            )

    return run_in_thread(dump)


def _our_rules() -> list[tuple]:
    return [r for r in _rules() if r[1] == MARK or r[2] == TABLE]


def _routes_in_table(table: int) -> list:
    def dump():
        with IPRoute() as ipr:
            return [r.get("dst") for r in ipr.route("dump", table=table)]

    return run_in_thread(dump)


def _mounts_under(path) -> list[str]:
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(path + "/")]


def _snapshot(state_dir) -> dict:
    return {
        "links": _links(),
        "tables": _tables(),
        "rules": _rules(),
        "mounts": _mounts_under(state_dir),
        "table_routes": _routes_in_table(TABLE),
    }


def _tables() -> list[str]:
    return netns.nft.list_tables("inet")


@pytest.fixture(autouse=True)
def netns_leak_guard(tmp_path):
    """Fail the test if it leaves a link, table, rule, mount, thread or fd behind."""
    threads = set(threading.enumerate())
    fds = set(os.listdir("/proc/self/fd"))
    yield
    problems = []
    if _links():
        problems.append(f"links left: {_links()}")
    if TABLE_NAME in _tables():
        problems.append(f"nft table left: {TABLE_NAME}")
    if _our_rules():
        problems.append(f"ip rules left: {_our_rules()}")
    if _routes_in_table(TABLE):
        problems.append(f"routes left in table {TABLE}")
    if _mounts_under(tmp_path):
        problems.append(f"mounts left: {_mounts_under(tmp_path)}")
    extra_threads = set(threading.enumerate()) - threads
    if extra_threads:
        problems.append(f"threads left: {extra_threads}")
    extra_fds = set(os.listdir("/proc/self/fd")) - fds
    if extra_fds:
        problems.append(f"fds left: {sorted(extra_fds)}")
    assert not problems, "; ".join(problems)


# -- topology --------------------------------------------------------------


def _free_port_pair() -> tuple[socket.socket, socket.socket, int]:
    """A UDP socket on 0.0.0.0:P and a TCP listener on 0.0.0.0:P (same P)."""
    for _ in range(50):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("0.0.0.0", 0))
        port = udp.getsockname()[1]
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            tcp.bind(("0.0.0.0", port))
        except OSError:
            udp.close()
            tcp.close()
            continue
        tcp.listen(8)
        return udp, tcp, port
    raise RuntimeError("no free port pair")


class Topo:
    """A runtime's host network, one sandbox, one upstream "internet" netns."""

    def __init__(self, stack: contextlib.ExitStack, state_dir) -> None:
        self.proxy = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        self.proxy.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        self.proxy.bind(("127.0.0.1", 0))
        self.proxy.listen(8)
        self.proxy_port = self.proxy.getsockname()[1]
        self.dns_udp, self.dns_tcp, self.dns_port = _free_port_pair()
        stack.callback(self.dns_udp.close)
        stack.callback(self.dns_tcp.close)

        self.host = HostNetwork(TAG, PREFIX, self.proxy_port, self.dns_port)
        self.host.setup()
        stack.callback(self.host.close)

        self.pool = AddressPool(SANDBOX_CIDR)
        self.ns = stack.enter_context(NetNS.create(state_dir, "sb0"))
        self.block = self.pool.allocate()
        self.veth = stack.enter_context(Veth.create(self.ns, PREFIX + "0", self.block))

        up_pool = AddressPool(UPSTREAM_CIDR)
        self.up = stack.enter_context(NetNS.create(state_dir, "up"))
        self.up_block = up_pool.allocate()
        self.up_veth = stack.enter_context(Veth.create(self.up, UP_PREFIX + "0", self.up_block))
        self.up_ip = str(self.up_block.peer)

    def sandbox_socket(self, kind=socket.SOCK_STREAM) -> socket.socket:
        sock = self.ns.run_in(socket.socket, socket.AF_INET, kind)
        sock.settimeout(5)  # a dropped packet fails the test instead of hanging it
        return sock

    def upstream_listener(self, port: int = 0) -> socket.socket:
        def make():
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", port))
            s.listen(8)
            return s

        sock = self.up.run_in(make)
        sock.settimeout(5)
        return sock


@pytest.fixture
def topo(tmp_path):
    with contextlib.ExitStack() as stack:
        yield Topo(stack, tmp_path)


def _connect_refused(sock: socket.socket, addr) -> float:
    start = time.monotonic()
    with sock, pytest.raises(ConnectionRefusedError):
        sock.connect(addr)
    return time.monotonic() - start


# -- pure parts ------------------------------------------------------------


def test_address_pool():
    pool = AddressPool("10.9.0.0/28")
    assert pool.capacity == 4
    blocks = [pool.allocate() for _ in range(4)]
    assert [str(b.network) for b in blocks] == [f"10.9.0.{4 * i}/30" for i in range(4)]
    assert (str(blocks[1].host), str(blocks[1].peer), blocks[1].prefixlen) == ("10.9.0.5", "10.9.0.6", 30)
    with pytest.raises(RuntimeError):
        pool.allocate()
    pool.release(blocks[2])
    with pytest.raises(ValueError):
        pool.release(blocks[2])
    assert pool.allocate() == blocks[2]
    with pytest.raises(ValueError):
        AddressPool("10.9.0.0/31")
    with pytest.raises(ValueError):
        AddressPool("not a cidr")
    with pytest.raises(ValueError):
        pool.release(AddressPool("10.8.0.0/30").allocate())


def test_validation():
    with pytest.raises(ValueError):
        netns.check_ifname("x" * 16)
    with pytest.raises(ValueError):
        netns.check_ifname('a"b')
    with pytest.raises(ValueError):
        HostNetwork("bad-tag", PREFIX, 1, 2)
    with pytest.raises(ValueError):
        HostNetwork(TAG, 'p" ; flush ruleset', 1, 2)
    with pytest.raises(ValueError):
        HostNetwork(TAG, PREFIX, 0, 2)
    with pytest.raises(ValueError):
        HostNetwork(TAG, PREFIX, 1, True)
    with pytest.raises(ValueError):
        NetNS.create("/nonexistent-state", "../x")
    assert netns.derive_mark_table(TAG) == netns.derive_mark_table(TAG)
    assert netns.derive_mark_table("a")[0] != netns.derive_mark_table("b")[0]
    text = netns.build_ruleset(TABLE_NAME, PREFIX, 1234, 5353, MARK)
    assert "tproxy ip to 127.0.0.1:1234" in text and "redirect to :5353" in text


def test_nft_failure_is_loud():
    with Nft() as nft:
        assert nft.backend == "libnftables"
        with pytest.raises(NftError, match="(?i)error"):
            nft.run(f"add table inet {TABLE_NAME}\nadd chain inet {TABLE_NAME} c {{ type nonsense; }}\n")
    # The batch was atomic: the table from the first line is not there either.
    assert TABLE_NAME not in _tables()


# -- namespaces and veths --------------------------------------------------


def test_netns_create_run_in_close(tmp_path):
    ns = NetNS.create(tmp_path, "a")
    try:
        inside = ns.run_in(os.readlink, "/proc/thread-self/ns/net")
        assert inside == os.readlink(f"/proc/self/fd/{ns.fd}")
        assert inside != os.readlink("/proc/thread-self/ns/net")
        assert _mounts_under(tmp_path) == [os.path.realpath(tmp_path / "netns"), os.path.realpath(ns.path)]
        with pytest.raises(FileExistsError):
            NetNS.create(tmp_path, "a")
        with pytest.raises(ZeroDivisionError):
            ns.run_in(lambda: 1 / 0)
    finally:
        ns.close()
    ns.close()  # idempotent
    assert ns.fd == -1 and not os.path.exists(tmp_path / "netns" / "a")
    assert _mounts_under(tmp_path) == []
    with pytest.raises(ValueError):
        ns.run_in(int)


def test_inside_only_lo_and_eth0(topo):
    def look():
        with IPRoute() as ipr:
            links = {l.get("ifname"): l.get("operstate") for l in ipr.link("dump")}
            addrs = sorted((a.get("label"), a.get("address"), a["prefixlen"]) for a in ipr.addr("dump"))
            routes = [(r.get("dst"), r.get("gateway")) for r in ipr.route("dump", table=254)]
            v6 = [a for a in ipr.addr("dump") if a["family"] == socket.AF_INET6]
        sysctl = [
            open(f"/proc/sys/net/ipv6/conf/{c}/disable_ipv6").read().strip()
            for c in ("all", "default", "lo", "eth0")
        ]
        return links, addrs, routes, v6, sysctl

    links, addrs, routes, v6, sysctl = topo.ns.run_in(look)
    assert set(links) == {"lo", "eth0"}
    assert links["eth0"] == "UP"
    assert addrs == [("eth0", str(topo.block.peer), 30), ("lo", "127.0.0.1", 8)]
    assert (None, str(topo.block.host)) in routes
    assert v6 == [] and sysctl == ["1"] * 4
    # The host end has its address, and no IPv6 either.
    with open(f"/proc/sys/net/ipv6/conf/{PREFIX}0/disable_ipv6") as f:
        assert f.read().strip() == "1"


def test_ipv6_disabled_inside(topo):
    def try_v6():
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            try:
                s.connect(("::1", 9))
            except OSError as exc:
                return exc.errno
        return 0

    assert topo.ns.run_in(try_v6) in (errno.EADDRNOTAVAIL, errno.ENETUNREACH, errno.EAFNOSUPPORT)


def test_host_port_is_refused_fast(topo):
    with socket.socket() as server:
        server.bind((str(topo.block.host), 0))
        server.listen(1)
        port = server.getsockname()[1]
        assert port not in (80, 443)
        took = _connect_refused(topo.sandbox_socket(), (str(topo.block.host), port))
        assert took < FAST
        # Port 53 is redirected, not open: the host's own other ports stay closed
        # (also the proxy port addressed directly).
        took = _connect_refused(topo.sandbox_socket(), (str(topo.block.host), topo.proxy_port))
        assert took < FAST


def test_internet_toggle(topo):
    with topo.upstream_listener() as server:
        port = server.getsockname()[1]
        addr = (topo.up_ip, port)
        assert _connect_refused(topo.sandbox_socket(), addr) < FAST

        topo.host.set_internet(topo.veth.host_ifname, True)
        topo.host.set_internet(topo.veth.host_ifname, True)  # idempotent
        with topo.sandbox_socket() as client:
            client.connect(addr)
            conn, peer = server.accept()
            with conn:
                # Masqueraded: upstream sees the host's address, not the sandbox's.
                assert peer[0] == str(topo.up_block.host)
                client.sendall(b"ping")
                assert conn.recv(4) == b"ping"
                conn.sendall(b"pong")
                assert client.recv(4) == b"pong"

            topo.host.set_internet(topo.veth.host_ifname, False)
            topo.host.set_internet(topo.veth.host_ifname, False)  # idempotent
            assert _connect_refused(topo.sandbox_socket(), addr) < FAST

        # Nothing may enter a sandbox unasked, not even from the "internet".
        def connect_in():
            with socket.socket() as s:
                s.settimeout(5)
                try:
                    s.connect((str(topo.block.peer), 22))
                except OSError as exc:
                    return exc.errno
            return 0

        assert topo.up.run_in(connect_in) == errno.ECONNREFUSED


@pytest.mark.parametrize("port", [80, 443])
def test_http_goes_to_transparent_proxy(topo, port):
    with topo.sandbox_socket() as client:
        client.connect((topo.up_ip, port))
        topo.proxy.settimeout(5)
        conn, peer = topo.proxy.accept()
        with conn:
            assert conn.getsockname() == (topo.up_ip, port)  # the original destination
            assert peer == (str(topo.block.peer), client.getsockname()[1])
            client.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert conn.recv(5) == b"GET /"


def test_http_fails_closed_without_proxy(topo):
    # Internet on, but the proxy is gone: port 80 must not bypass it.
    topo.host.set_internet(topo.veth.host_ifname, True)
    topo.proxy.close()
    with topo.upstream_listener(80) as server:
        assert _connect_refused(topo.sandbox_socket(), (topo.up_ip, 80)) < FAST
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()


def test_dns_is_redirected(topo):
    with topo.sandbox_socket(socket.SOCK_DGRAM) as client:
        client.sendto(b"query", (topo.up_ip, 53))
        topo.dns_udp.settimeout(5)
        data, src = topo.dns_udp.recvfrom(100)
        assert data == b"query" and src[0] == str(topo.block.peer)
        topo.dns_udp.sendto(b"answer", src)
        data, src = client.recvfrom(100)
        assert (data, src) == (b"answer", (topo.up_ip, 53))  # un-NATed reply

    with topo.sandbox_socket() as client:
        client.connect(("192.0.2.53", 53))  # TCP too, to any address
        topo.dns_tcp.settimeout(5)
        conn, peer = topo.dns_tcp.accept()
        conn.close()
        assert peer[0] == str(topo.block.peer)

    # The forwarder's port is not reachable from other interfaces (dropped),
    # but is from lo.
    def probe():
        with socket.socket() as s:
            s.settimeout(0.3)  # bounded negative check: a drop never answers
            try:
                s.connect((str(topo.up_block.host), topo.dns_port))
            except TimeoutError:
                return "timeout"
            except OSError as exc:
                return errno.errorcode[exc.errno]
        return "connected"

    assert topo.up.run_in(probe) == "timeout"
    with socket.create_connection(("127.0.0.1", topo.dns_port), timeout=5):
        topo.dns_tcp.accept()[0].close()


def test_twenty_concurrent(tmp_path):
    pool = AddressPool(SANDBOX_CIDR)
    blocks = [pool.allocate() for _ in range(20)]

    def make(i):
        ns = NetNS.create(tmp_path, f"c{i}")
        try:
            return ns, Veth.create(ns, f"{PREFIX}{i}", blocks[i])
        except BaseException:
            ns.close()
            raise

    def address(ns):
        def get():
            with IPRoute() as ipr:
                return [a.get("address") for a in ipr.addr("dump", label="eth0")]

        return ns.run_in(get)

    made = []
    try:
        with ThreadPoolExecutor(20) as ex:
            futures = [ex.submit(make, i) for i in range(20)]
            errors = []
            for f in futures:
                try:
                    made.append(f.result())
                except Exception as exc:  # close what worked, then fail
                    errors.append(exc)
            assert not errors, errors
            seen = list(ex.map(lambda nv: address(nv[0]), made))
        assert seen == [[str(b.peer)] for b in blocks]
        assert len({s[0] for s in seen}) == 20
        assert len(_links()) == 20
    finally:
        with ThreadPoolExecutor(20) as ex:
            list(ex.map(lambda nv: (nv[1].close(), nv[0].close()), made))


def test_close_removes_everything(tmp_path):
    before = _snapshot(tmp_path)
    with contextlib.ExitStack() as stack:
        Topo(stack, tmp_path)
        during = _snapshot(tmp_path)
        assert TABLE_NAME in during["tables"]
        assert len(during["links"]) == 2 and len(during["mounts"]) == 3
        assert [r for r in during["rules"] if r[1] == MARK and r[2] == TABLE]
        assert during["table_routes"]
    assert _snapshot(tmp_path) == before


def test_gc_after_dead_runtime(tmp_path):
    """A runtime dies (a forked child exits without close); gc by names cleans up."""
    ns_path = str(tmp_path / "netns" / "dead")
    ifname = PREFIX + "9"
    pid = os.fork()
    if pid == 0:  # the doomed runtime
        code = 1
        try:
            HostNetwork(TAG, PREFIX, 1080, 1053).setup()
            ns = NetNS.create(tmp_path, "dead")
            Veth.create(ns, ifname, AddressPool(SANDBOX_CIDR).allocate())
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    try:
        assert os.waitstatus_to_exitcode(status) == 0
        _check_gc(tmp_path, ns_path, ifname)
    finally:
        # Whatever the assertions said, leave nothing behind.
        netns_gc.remove_link(ifname)
        netns_gc.remove_netns(ns_path)
        netns_gc.remove_table(TABLE_NAME)
        netns_gc.remove_rule(MARK, TABLE)


def _check_gc(tmp_path, ns_path, ifname):
    assert netns_gc.list_links(PREFIX) == [ifname]
    assert TABLE_NAME in netns_gc.list_tables("sandbox_")
    assert netns_gc.list_netns_mounts(tmp_path) == [os.path.realpath(ns_path)]
    assert _our_rules()

    # Links before namespaces: freeing the netns would make the kernel delete
    # the veth too, but asynchronously (the name stays taken for a while).
    assert netns_gc.remove_link(ifname) is True
    netns_gc.remove_netns(ns_path)
    netns_gc.remove_table(TABLE_NAME)
    assert netns_gc.remove_rule(MARK, TABLE) is True

    assert netns_gc.list_links(PREFIX) == []
    assert TABLE_NAME not in netns_gc.list_tables()
    assert netns_gc.list_netns_mounts(tmp_path) == []
    assert _mounts_under(tmp_path) == []
    assert not os.path.exists(ns_path)

    # Everything again: already gone is fine.
    netns_gc.remove_netns(ns_path)
    assert netns_gc.remove_link(ifname) is False
    netns_gc.remove_table(TABLE_NAME)
    assert netns_gc.remove_rule(MARK, TABLE) is False


def test_gc_half_made(tmp_path):
    # A table without rule, a rule without its route, a mount file without a mount.
    with Nft() as nft:
        nft.run(f"add table inet {TABLE_NAME}\n")

    def add_rule():
        with IPRoute() as ipr:
            ipr.rule("add", fwmark=MARK, table=TABLE)

    run_in_thread(add_rule)
    (tmp_path / "netns").mkdir()
    (tmp_path / "netns" / "half").touch()

    netns_gc.remove_table(TABLE_NAME)
    assert netns_gc.remove_rule(MARK, TABLE) is True
    netns_gc.remove_netns(tmp_path / "netns" / "half")
    assert not (tmp_path / "netns" / "half").exists()


def test_blocking_api_works_inside_an_event_loop(tmp_path):
    # pyroute2's sync API refuses to run in a thread with a running loop; ours
    # moves that work to throwaway threads, so coroutines may call it directly.
    import asyncio

    async def main():
        pool = AddressPool(SANDBOX_CIDR)
        with HostNetwork(TAG, PREFIX, 1080, 1053) as host:
            with NetNS.create(tmp_path, "loop") as ns, Veth.create(ns, PREFIX + "0", pool.allocate()) as veth:
                host.set_internet(veth.host_ifname, True)
                return ns.run_in(os.readlink, "/proc/thread-self/ns/net")

    assert asyncio.run(main()).startswith("net:[")


def test_netns_does_not_import_sandbox():
    import subprocess
    import sys

    code = "import sys, netns; sys.exit(any(m == 'sandbox' or m.startswith('sandbox.') for m in sys.modules))"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=20)


def test_errors_are_typed_and_roll_back(tmp_path):
    pool = AddressPool(SANDBOX_CIDR)
    with NetNS.create(tmp_path, "a") as a, NetNS.create(tmp_path, "b") as b:
        with Veth.create(a, PREFIX + "0", pool.allocate()):
            with pytest.raises(OSError) as info:
                Veth.create(b, PREFIX + "0", pool.allocate())
            assert info.value.errno == errno.EEXIST
            assert _links() == [PREFIX + "0"]
            # The failed attempt left nothing inside "b" either.
            def names():
                with IPRoute() as ipr:
                    return [link.get("ifname") for link in ipr.link("dump")]

            assert b.run_in(names) == ["lo"]

    with HostNetwork(TAG, PREFIX, 1080, 1053) as host:
        # A second runtime with the same tag must fail loudly, not take over.
        with pytest.raises(NftError, match="File exists"):
            HostNetwork(TAG, PREFIX, 1080, 1053).setup()
        assert TABLE_NAME in _tables() and len(_our_rules()) == 1
        with pytest.raises(ValueError):
            host.set_internet("eth0", True)  # not one of ours
    host.close()  # idempotent
