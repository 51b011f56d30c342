"""The veth pair that connects one sandbox netns to the host.

Inside the namespace there are exactly two interfaces: ``lo`` and ``eth0``
(``<block>.2/30``, default route via ``<block>.1``).  The host end is
``<prefix><index>`` with ``<block>.1/30``; the runtime's nft table matches the
prefix.  IPv6 is disabled inside (and on the host end), so the only path out
is IPv4 through the filtered host end.

How it is built (fastest of what we measured, all in-process netlink):

1. in the host netns, one RTM_NEWLINK creates the pair with the peer placed
   straight into the namespace by fd (``IFLA_NET_NS_FD``) and already named
   ``eth0`` — no rename, no move, no second request;
2. the host end gets its address and goes up;
3. the same thread ``setns``es into the namespace and opens its *own*
   netlink socket there (a socket's netns is fixed at creation) to configure
   sysctls, ``lo``, ``eth0`` and the route.

Measured here (scripts/bench_netns_setup.py, median of 50): 7-9 ms for
NetNS.create + Veth.create, mostly pyroute2's Python; deleting a veth costs
~30 ms in the kernel (RCU grace periods), so callers should close off their
hot path.

pyroute2's ``NetNS``/``IPRoute(netns=...)`` forks a helper process per
namespace (slow) and its ``pushns``/``popns`` are process-global (unsafe with
threads), so neither is used.
"""

from __future__ import annotations

import errno
import os
import re

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import _sys
from ._threads import run_in_thread
from .addrpool import Block
from .namespace import NetNS

INNER_IFNAME = "eth0"
LOOPBACK_IFINDEX = 1  # the kernel's constant: lo is ifindex 1 in every netns

# IFNAMSIZ is 16 including the NUL: at most 15 characters.  Stricter than the
# kernel on purpose: interface names end up inside nft command text and
# sysctl paths, so only plain characters are accepted.
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")


def check_ifname(name: str, what: str = "ifname") -> None:
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, not {type(name).__name__}")
    if not _IFNAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"{what}: invalid interface name {name!r} (1..15 of A-Z a-z 0-9 _ . -)")


def _write_sysctl(path: str, value: str) -> None:
    # Opened by the calling thread: /proc/sys/net resolves to the netns of the
    # thread that opens it, so this configures whatever namespace we are in.
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


class Veth:
    """Owns one veth pair (host end ``host_ifname``, ``eth0`` in ``ns``).

    ``close()`` deletes the host end, which deletes the pair; it is idempotent
    and tolerates the link being gone already (e.g. its netns died).
    """

    __slots__ = ("_ifname", "_index", "_block")

    def __init__(self, ifname: str, index: int, block: Block) -> None:
        self._ifname = ifname
        self._index = index
        self._block = block

    @classmethod
    def create(cls, ns: NetNS, host_ifname: str, block: Block) -> "Veth":
        check_ifname(host_ifname)
        if ns.closed:
            raise ValueError(f"{ns!r} is closed")
        with _sys.netlink_errors(f"create veth {host_ifname}"):
            index = run_in_thread(_create, ns.fd, host_ifname, block, name="netns-veth")
        return cls(host_ifname, index, block)

    @property
    def host_ifname(self) -> str:
        return self._ifname

    @property
    def host_index(self) -> int:
        """ifindex of the host end (0 after close)."""
        return self._index

    @property
    def block(self) -> Block:
        return self._block

    @property
    def closed(self) -> bool:
        return self._index == 0

    def close(self) -> None:
        index, self._index = self._index, 0
        if index:
            with _sys.netlink_errors(f"delete veth {self._ifname}"):
                run_in_thread(_delete_link, index, name="netns-veth-del")

    def __enter__(self) -> "Veth":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Veth {self._ifname} {self._block.network}{' closed' if self.closed else ''}>"


def _create(ns_fd: int, ifname: str, block: Block) -> int:
    # One throwaway thread does everything: it opens the host netlink socket
    # first, then setns()es into the namespace and opens a second socket
    # there.  Each socket stays in the netns it was created in, so the thread
    # can drive both sides (and roll back the host side) without switching
    # back.  Measured faster than a host thread plus a netns thread.
    with IPRoute() as host:
        host.link(
            "add",
            ifname=ifname,
            kind="veth",
            peer={"ifname": INNER_IFNAME, "net_ns_fd": ns_fd},
        )
        try:
            # One GETLINK gives both ifindexes: ours, and the peer's (in its
            # netns) as IFLA_LINK — no lookup needed inside.
            msg = host.link("get", ifname=ifname)[0]
            index, peer_index = msg["index"], msg.get("link")
            # No IPv6 on the host end either: no link-local address, no
            # router/neighbour solicitations, nothing for the inet table to miss.
            _write_sysctl(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6", "1")
            host.addr("add", index=index, address=str(block.host), prefixlen=block.prefixlen)
            host.link("set", index=index, state="up")
            _sys.setns(ns_fd, _sys.CLONE_NEWNET)
            _configure_inside(peer_index, block)
        except BaseException:
            try:
                host.link("del", ifname=ifname)
            except NetlinkError:
                pass  # the first error is the one worth reporting
            raise
        return index


def _configure_inside(eth0: int, block: Block) -> None:
    # The thread is inside the namespace now.  IPv6 off first, before any
    # interface is up, so no IPv6 address ever exists in here ("all" applies
    # to existing interfaces, "default" to any created later).
    for conf in ("all", "default"):
        _write_sysctl(f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6", "1")
    with IPRoute() as ipr:
        ipr.link("set", index=LOOPBACK_IFINDEX, state="up")
        ipr.addr("add", index=eth0, address=str(block.peer), prefixlen=block.prefixlen)
        ipr.link("set", index=eth0, state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway=str(block.host), oif=eth0)


def _delete_link(index: int) -> None:
    with IPRoute() as ipr:
        try:
            ipr.link("del", index=index)
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise


def delete_link(ifname: str) -> bool:
    """Delete a link by name in the host netns; False if it did not exist."""
    check_ifname(ifname)
    with _sys.netlink_errors(f"delete link {ifname}"):
        return run_in_thread(_delete_by_name, ifname, name="netns-link-del")


def _delete_by_name(ifname: str) -> bool:
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return False
        try:
            ipr.link("del", index=found[0])
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise
            return False
        return True


def list_links(prefix: str) -> list[str]:
    """Names of host-netns links starting with ``prefix``."""
    with _sys.netlink_errors("list links"):
        return run_in_thread(_list_links, prefix, name="netns-link-list")


def _list_links(prefix: str) -> list[str]:
    with IPRoute() as ipr:
        names = (msg.get("ifname") for msg in ipr.link("dump"))
        return sorted(n for n in names if n and n.startswith(prefix))
