"""Removal of a dead runtime's network objects, by the names it recorded.

Everything here tolerates objects that are half-made or already gone: gc runs
after crashes, so "not found" is success.  Which names to pass is the caller's
business (its state files); these functions only know the kernel.

Order: remove links before the namespaces they lead into.  Unmounting the
last reference of a netns also deletes its veth pair, but asynchronously in
a kernel worker, so the host-end name would stay taken for a while.
"""

from __future__ import annotations

import os

from pyroute2 import IPRoute

from . import link, nft
from ._sys import netlink_errors
from ._threads import run_in_thread
from .namespace import NetNS, netns_dir
from .rules import TABLE_PREFIX, delete_local_route, delete_rule

__all__ = [
    "remove_netns",
    "remove_link",
    "remove_table",
    "remove_rule",
    "list_links",
    "list_tables",
    "list_netns_mounts",
]


def remove_netns(path: str | os.PathLike) -> None:
    """Unmount and unlink a namespace bind mount (``<state_dir>/netns/<name>``)."""
    NetNS.remove_mount(path)


def remove_link(ifname: str) -> bool:
    """Delete a host-netns link (a veth host end deletes its pair); False if absent."""
    return link.delete_link(ifname)


def remove_table(name: str) -> None:
    """Delete the ``inet`` nft table ``name`` if it exists."""
    nft.delete_table(name, "inet")


def remove_rule(mark: int, table: int) -> bool:
    """Delete the ``fwmark`` rule and the ``local`` route of ``table``; False if neither existed."""

    def work() -> bool:
        with IPRoute() as ipr:
            route = delete_local_route(ipr, table)
            rule = delete_rule(ipr, mark, table)
            return route or rule

    with netlink_errors(f"delete ip rule fwmark {mark:#x} table {table}"):
        return run_in_thread(work, name="netns-gc")


def list_links(prefix: str) -> list[str]:
    """Host-netns link names starting with ``prefix``."""
    return link.list_links(prefix)


def list_tables(prefix: str = TABLE_PREFIX) -> list[str]:
    """``inet`` nft table names starting with ``prefix``."""
    return [name for name in nft.list_tables("inet") if name.startswith(prefix)]


def list_netns_mounts(state_dir: str | os.PathLike) -> list[str]:
    """Paths of namespace bind mounts under ``<state_dir>/netns`` (from mountinfo)."""
    directory = os.path.realpath(netns_dir(state_dir)) + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # Field 5 is the mount point, with space/tab/newline/backslash
            # escaped as octal.
            mount_point = _unescape(line.split(" ", 5)[4])
            if mount_point.startswith(directory) and "/" not in mount_point[len(directory) :]:
                found.append(mount_point)
    return sorted(set(found))


def _unescape(field: str) -> str:
    if "\\" not in field:
        return field
    return field.encode().decode("unicode_escape").encode("latin-1").decode(errors="surrogateescape")
