"""The runtime's side of networking: one host nft table, one transparent
proxy listener and one DNS forwarder for every sandbox, plus a netns + veth
+ /30 per sandbox (DESIGN §3). Slow teardown (the kernel takes ~30 ms to
delete a veth) runs in the background and is awaited when the runtime closes."""
from __future__ import annotations

import asyncio
import errno
import fcntl
import ipaddress
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Optional

import netns

from .errors import SandboxError
from .log import get_logger
from .proxy.dns import DNSForwarder, SyntheticNames
from .proxy.limits import raise_nofile_limit
from .proxy.listener import ProxyServer
from .proxy.resolve import NameResolver

log = get_logger("sandbox.network")
# The address plan (README "Defaults"). Every sandbox's veth is a /31
# point-to-point link (RFC 3021): host end .0 (its gateway), eth0 .1 -- two
# addresses per sandbox instead of a /30's four. Every runtime on the machine
# takes its own /17 of 10.192.0.0/12: 16 384 sandboxes per runtime, 32
# runtimes per host. Two runtimes handing out the same block would put one
# address on two host interfaces, and replies would leave through the wrong
# one; the proxy also names a sandbox by its source address (peer -> box in
# RuntimeNetwork._by_ip), so a block is never held twice. A slot is held by an
# flock on a file in LOCK_DIR for the runtime's lifetime (the kernel drops it
# when the process dies, however it dies), and a slot that any host interface
# already uses is skipped.
POOL_SPACE = ipaddress.ip_network("10.192.0.0/12")
SLOT_PREFIX = 17
BLOCK_PREFIX = 31
LOCK_DIR = "/run/sandbox-pools"
# Namespaces kept ready: making a netns + veth costs ~7 ms of kernel time, so
# start() takes a ready one and a replacement is made in the background.
WARM = 2


def host_resolver() -> str:
    """The first nameserver of the host's /etc/resolv.conf (SPEC §10 DNS)."""
    try:
        with open("/etc/resolv.conf") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    return parts[1]
    except OSError:
        pass
    return "127.0.0.1"


@dataclass
class SandboxNet:
    ns: Any
    veth: Any
    block: Any
    ifname: str
    sid: str          # its key in the runtime's state record

    @property
    def address(self) -> str:
        return str(self.block.peer)

    @property
    def gateway(self) -> str:
        return str(self.block.host)


class RuntimeNetwork:
    def __init__(self, *, tag: str, state_dir: str, resolver: str | None, state,
                 pool_blocks: int | None = None):
        self.tag = tag
        self.prefix = f"s{tag}h"
        self.state_dir = state_dir
        self.resolver = resolver or host_resolver()
        self._state = state
        self._pool = None
        self._pool_lock = -1
        self._by_ip: dict[str, Any] = {}
        self._index = 0
        self._pending: set[asyncio.Task] = set()
        self.names = SyntheticNames()
        self.host: Optional[netns.HostNetwork] = None
        self.dns: Optional[DNSForwarder] = None
        self.proxy: Optional[ProxyServer] = None
        self._ready: list[SandboxNet] = []
        self._filling: set[asyncio.Task] = set()
        self.warm = WARM
        self._closing = False
        self._unsettled: list = []   # (box, net) attached, netns fd still open
        self._pool_blocks = pool_blocks   # private: a smaller pool (tests of exhaustion)

    @staticmethod
    def raise_fd_limit() -> int:
        """RLIMIT_NOFILE soft -> hard, before the proxy sizes its connection bounds from
        it: ~1000 sandbox connections must not exhaust the runtime (issue 8, finding 8)."""
        return raise_nofile_limit()

    async def open(self) -> None:
        net, self._pool_lock = await asyncio.to_thread(claim_slot)
        self._pool = netns.AddressPool(str(net), block_prefix=BLOCK_PREFIX, limit=self._pool_blocks)
        # Validate the resolver before anything exists.
        self.dns = DNSForwarder(self.names, self.resolver, listen=("0.0.0.0", 0))
        # Name egress (SPEC §10) asks the same pinned resolver the forwarder forwards to.
        self.resolve = NameResolver(self.resolver)
        self.proxy = ProxyServer(self._by_ip.get, names=self.names, resolve=self.resolve.resolve)
        try:
            _, dns_port = await self.dns.start()
            _, proxy_port = await self.proxy.start()
            host = netns.HostNetwork(self.tag, self.prefix, proxy_port, dns_port)
            host.comment = owner_comment()
            self._state.update_host(table=host.table_name, mark=host.mark, rt_table=host.table,
                                    prefix=self.prefix, proxy_port=proxy_port, dns_port=dns_port)
            await asyncio.to_thread(host.setup)
            self.host = host
            self._refill()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        first = None
        self._closing = True
        for t in list(self._filling):
            await asyncio.gather(t, return_exceptions=True)
        for net in self._ready:
            self._pending.add(asyncio.ensure_future(
                self._teardown(net.sid, net, lambda sid=net.sid: self._state.remove_sandbox(sid))))
        self._ready.clear()
        if self._pending:
            for r in await asyncio.gather(*list(self._pending), return_exceptions=True):
                if isinstance(r, BaseException) and first is None:
                    first = r
        for step in (self._close_proxy, self._close_dns, self._close_host, self._release_slot):
            try:
                await step()
            except Exception as e:
                first = first or e
        if first is not None:
            raise first

    async def _close_proxy(self):
        if self.proxy is not None:
            p, self.proxy = self.proxy, None
            await p.aclose()

    async def _close_dns(self):
        if self.dns is not None:
            d, self.dns = self.dns, None
            await d.aclose()

    async def _release_slot(self):
        if self._pool_lock >= 0:
            os.close(self._pool_lock)
            self._pool_lock = -1

    async def _close_host(self):
        if self.host is not None:
            h, self.host = self.host, None
            await asyncio.to_thread(h.close)

    # -- per sandbox --------------------------------------------------------
    def _allocate(self):
        """A block for one more namespace, taken synchronously (a refill task
        scheduled now cannot lose it to a start that runs first)."""
        try:
            return self._pool.allocate()
        except netns.PoolExhausted as e:
            # Before anything of this sandbox exists (no record, netns, veth, cgroup).
            raise SandboxError(
                f"no sandbox address left: all {e.capacity} blocks (/{BLOCK_PREFIX}) of this "
                f"runtime's {e.network} are held by its sandboxes; destroy one first") from None

    async def _make(self, block) -> SandboxNet:
        self._index += 1
        sid = f"{self.tag}-n{self._index}"
        ifname = f"{self.prefix}{self._index}"
        path = netns.namespace.netns_dir(self.state_dir) + f"/{sid}"
        # Recorded before any of them exists: a crash from here on is collectable.
        self._state.add_sandbox(sid, netns=path, veth=ifname, block=str(block.network))
        ns = veth = None
        try:
            ns = await asyncio.to_thread(netns.NetNS.create, self.state_dir, sid)
            veth = await asyncio.to_thread(netns.Veth.create, ns, ifname, block)
        except BaseException:
            if veth is not None:
                veth.close()
            if ns is not None:
                ns.close()
            self._pool.release(block)
            self._state.remove_sandbox(sid)
            raise
        return SandboxNet(ns, veth, block, ifname, sid)

    def _refill(self) -> None:
        if self.host is None or self._closing:
            return
        # Bounded by the pool too: a full runtime keeps no address in reserve.
        while len(self._ready) + len(self._filling) < self.warm and self._pool.available:
            task = asyncio.ensure_future(self._make(self._allocate()))
            self._filling.add(task)
            task.add_done_callback(self._filled)

    def _filled(self, task: asyncio.Task) -> None:
        self._filling.discard(task)
        if task.cancelled() or task.exception() is not None:
            if not task.cancelled():
                log.warning("network.prepare_failed", error=str(task.exception()))
            return
        self._ready.append(task.result())

    async def attach(self, box, enable_internet: bool) -> SandboxNet:
        t0 = time.perf_counter()
        while not self._ready and not self._pool.available and (self._filling or self._pending):
            # The last addresses are in namespaces being made, or in those of
            # destroyed sandboxes still being torn down: wait for one.
            await asyncio.wait(self._filling | self._pending, return_when=asyncio.FIRST_COMPLETED)
        net = self._ready.pop() if self._ready else await self._make(self._allocate())
        try:
            self._state.update_sandbox(net.sid, cgroup=f"{self.tag}.{box.id}", name=box.name)
            if enable_internet:   # a fresh veth is never in the set: skip the nft call
                self.host.set_internet(net.ifname, True)
        except BaseException:
            self.detach(box, net, lambda: self._state.remove_sandbox(net.sid))
            raise
        self._by_ip[net.address] = box
        self._settle()
        self._unsettled.append((box, net))
        self._refill()
        log.debug("network.attach", sandbox=box.name, step="network", address=net.address,
                  ms=round((time.perf_counter() - t0) * 1000, 2))
        return net

    def _settle(self) -> None:
        """Close the netns fd of every attached sandbox whose PID 1 runs: the
        C core needed it only to place PID 1, and 10 000 of them would
        exhaust RLIMIT_NOFILE; the bind mount keeps the namespace and
        NetNS.run_in reopens it when a port is reached. Done at the next
        attach (the list holds only sandboxes still starting)."""
        keep = []
        for box, net in self._unsettled:
            if net.ns.closed:
                continue
            if box.running:
                net.ns.release_fd()
            else:
                keep.append((box, net))
        self._unsettled = keep

    def set_internet(self, net: SandboxNet, on: bool) -> None:
        self.host.set_internet(net.ifname, on)

    def detach(self, box, net: SandboxNet, done) -> None:
        """Instant part now (no more proxy traffic, no more internet); the veth
        and netns go in the background."""
        self._by_ip.pop(net.address, None)
        try:
            if self.host is not None and box.enable_internet:
                self.host.set_internet(net.ifname, False)
        finally:
            task = asyncio.ensure_future(self._teardown(box.id, net, done))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _teardown(self, sid: str, net: SandboxNet, done) -> None:
        def work():
            first = None
            for close in (net.veth.close, net.ns.close):
                try:
                    close()
                except Exception as e:
                    first = first or e
            if first is not None:
                raise first
        await asyncio.to_thread(work)
        self._pool.release(net.block)   # only once its veth is gone: never two hosts of one address
        done()
        self._refill()


def owner_comment() -> str:
    """"owner_<pid>_<start ticks>": read by `sandbox gc` when no state file names us."""
    from .state import _start_ticks
    return f"owner_{os.getpid()}_{_start_ticks(os.getpid())}"


def _host_addresses() -> list:
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        return [ipaddress.ip_address(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr(family=socket.AF_INET)]


def claim_slot() -> tuple[ipaddress.IPv4Network, int]:
    from netns._threads import run_in_thread
    used = run_in_thread(_host_addresses, name="addr-scan")
    os.makedirs(LOCK_DIR, mode=0o700, exist_ok=True)
    for net in POOL_SPACE.subnets(new_prefix=SLOT_PREFIX):
        if any(a in net for a in used):
            continue
        fd = os.open(os.path.join(LOCK_DIR, str(net.network_address)), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return net, fd
    raise OSError(errno.EADDRINUSE, f"no free /{SLOT_PREFIX} left in {POOL_SPACE} for sandbox addresses")
