"""Per-sandbox /30 blocks from one runtime-wide IPv4 range.

A /30 is the smallest block with two usable addresses: ``.1`` (host end of
the veth, the sandbox's gateway) and ``.2`` (``eth0`` inside).  The proxy
identifies a sandbox by its source address, so a block must never be handed
out twice while held.  Not thread-safe: the runtime allocates from its asyncio
loop thread only.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


@dataclass(frozen=True)
class Block:
    """One /30: ``network``, ``host`` (gateway, .1) and ``peer`` (sandbox, .2)."""

    network: ipaddress.IPv4Network

    @property
    def host(self) -> ipaddress.IPv4Address:
        return self.network.network_address + 1

    @property
    def peer(self) -> ipaddress.IPv4Address:
        return self.network.network_address + 2

    @property
    def prefixlen(self) -> int:
        return self.network.prefixlen


class AddressPool:
    """Hands out /30 blocks of ``cidr``; ``release()`` makes one available again.

    Allocation takes the lowest free block, so addresses stay small and
    predictable; a released block may be reused by the next allocation.
    """

    def __init__(self, cidr: str = "10.213.0.0/16") -> None:
        try:
            net = ipaddress.IPv4Network(cidr)
        except (ipaddress.AddressValueError, ipaddress.NetmaskValueError, ValueError) as exc:
            raise ValueError(f"cidr: not an IPv4 network: {cidr!r} ({exc})") from None
        if net.prefixlen > 30:
            raise ValueError(f"cidr: {cidr!r} is smaller than one /30")
        self._net = net
        self._size = 1 << (30 - net.prefixlen)  # number of /30 blocks
        self._held: set[int] = set()
        self._next = 0  # lowest index that may be free

    @property
    def network(self) -> ipaddress.IPv4Network:
        return self._net

    @property
    def capacity(self) -> int:
        return self._size

    def __len__(self) -> int:
        """Number of blocks currently held."""
        return len(self._held)

    def allocate(self) -> Block:
        i = self._next
        while i in self._held:
            i += 1
        if i >= self._size:
            raise RuntimeError(f"address pool {self._net} exhausted ({self._size} blocks)")
        self._held.add(i)
        self._next = i + 1
        return self._block(i)

    def release(self, block: Block) -> None:
        """Return ``block``; releasing a block that is not held is a ValueError."""
        i = self._index(block)
        if i not in self._held:
            raise ValueError(f"block {block.network} is not held")
        self._held.remove(i)
        self._next = min(self._next, i)

    def reserve(self, block: Block) -> None:
        """Mark a specific block held (e.g. one recorded by a previous process)."""
        i = self._index(block)
        if i in self._held:
            raise ValueError(f"block {block.network} is already held")
        self._held.add(i)

    def _block(self, i: int) -> Block:
        base = int(self._net.network_address) + 4 * i
        return Block(ipaddress.IPv4Network((base, 30)))

    def _index(self, block: Block) -> int:
        net = block.network
        if net.prefixlen != 30 or not net.subnet_of(self._net):
            raise ValueError(f"block {net} is not a /30 of {self._net}")
        return (int(net.network_address) - int(self._net.network_address)) // 4
