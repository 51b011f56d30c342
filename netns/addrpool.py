"""Per-sandbox point-to-point blocks (/30 or /31) from one runtime-wide IPv4 range.

A block holds the two ends of one veth: ``host`` (the host end, the sandbox's
gateway) and ``peer`` (``eth0`` inside).  A /30 spends four addresses on that
(``.1`` and ``.2``; network and broadcast unused); a /31 (RFC 3021: no
network or broadcast address on a point-to-point link, which Linux honours)
spends two: ``.0`` host, ``.1`` peer — twice the sandboxes from one range.
The proxy identifies a sandbox by its source address, so a block must never be
handed out twice while held.  Not thread-safe: the runtime allocates from its
asyncio loop thread only.

Allocation and release are O(log n) whatever the number held (a heap of
released indexes below a high-water mark), so a runtime holding 10 000 blocks
allocates as fast as an empty one.
"""

from __future__ import annotations

import heapq
import ipaddress
from dataclasses import dataclass


class PoolExhausted(RuntimeError):
    """Every block of the pool is held: ``capacity`` blocks of ``network``."""

    def __init__(self, network: ipaddress.IPv4Network, capacity: int, held: int) -> None:
        super().__init__(f"address pool {network} exhausted ({held} of {capacity} blocks held)")
        self.network = network
        self.capacity = capacity
        self.held = held


@dataclass(frozen=True)
class Block:
    """One /30 or /31: ``network``, ``host`` (gateway) and ``peer`` (sandbox)."""

    network: ipaddress.IPv4Network

    @property
    def host(self) -> ipaddress.IPv4Address:
        return self.network.network_address + (1 if self.network.prefixlen == 30 else 0)

    @property
    def peer(self) -> ipaddress.IPv4Address:
        return self.network.network_address + (2 if self.network.prefixlen == 30 else 1)

    @property
    def prefixlen(self) -> int:
        return self.network.prefixlen


class AddressPool:
    """Hands out blocks of ``cidr`` (/30 by default, ``block_prefix=31`` for /31);
    ``release()`` makes one available again.

    Allocation takes the lowest free block, so addresses stay small and
    predictable; a released block may be reused by the next allocation.
    ``limit`` caps the number of blocks below the range's size (tests).
    """

    def __init__(self, cidr: str = "10.213.0.0/16", *, block_prefix: int = 30,
                 limit: int | None = None) -> None:
        if block_prefix not in (30, 31):
            raise ValueError(f"block_prefix: must be 30 or 31, not {block_prefix!r}")
        try:
            net = ipaddress.IPv4Network(cidr)
        except (ipaddress.AddressValueError, ipaddress.NetmaskValueError, ValueError) as exc:
            raise ValueError(f"cidr: not an IPv4 network: {cidr!r} ({exc})") from None
        if net.prefixlen > block_prefix:
            raise ValueError(f"cidr: {cidr!r} is smaller than one /{block_prefix}")
        self._net = net
        self._bits = block_prefix
        self._step = 1 << (32 - block_prefix)
        self._size = 1 << (block_prefix - net.prefixlen)  # number of blocks
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise ValueError(f"limit: must be a positive int, not {limit!r}")
            self._size = min(self._size, limit)
        self._held: set[int] = set()
        self._free: list[int] = []   # heap of released indexes below _top
        self._top = 0                # every index >= _top is free

    @property
    def network(self) -> ipaddress.IPv4Network:
        return self._net

    @property
    def block_prefix(self) -> int:
        return self._bits

    @property
    def capacity(self) -> int:
        return self._size

    @property
    def available(self) -> int:
        return self._size - len(self._held)

    def __len__(self) -> int:
        """Number of blocks currently held."""
        return len(self._held)

    def allocate(self) -> Block:
        while self._free:
            i = heapq.heappop(self._free)
            if i not in self._held:      # reserve() may have taken it meanwhile
                break
        else:
            while self._top in self._held:   # skip reserve()d indexes
                self._top += 1
            if self._top >= self._size:
                raise PoolExhausted(self._net, self._size, len(self._held))
            i = self._top
            self._top += 1
        self._held.add(i)
        return self._block(i)

    def release(self, block: Block) -> None:
        """Return ``block``; releasing a block that is not held is a ValueError."""
        i = self._index(block)
        if i not in self._held:
            raise ValueError(f"block {block.network} is not held")
        self._held.remove(i)
        if i < self._top:
            heapq.heappush(self._free, i)

    def reserve(self, block: Block) -> None:
        """Mark a specific block held (e.g. one recorded by a previous process)."""
        i = self._index(block)
        if i in self._held:
            raise ValueError(f"block {block.network} is already held")
        if i >= self._size:
            raise ValueError(f"block {block.network} is beyond the pool's limit")
        self._held.add(i)

    def _block(self, i: int) -> Block:
        base = int(self._net.network_address) + self._step * i
        return Block(ipaddress.IPv4Network((base, self._bits)))

    def _index(self, block: Block) -> int:
        net = block.network
        if net.prefixlen != self._bits or not net.subnet_of(self._net):
            raise ValueError(f"block {net} is not a /{self._bits} of {self._net}")
        return (int(net.network_address) - int(self._net.network_address)) // self._step
