"""What bounds the proxy and the DNS forwarder against a sandbox that opens too much.

A sandbox controls how many connections and queries it sends (SPEC §9: it "can waste
only its own limits"). Every listener therefore counts what is open per sandbox
(`PER_SANDBOX`) and in total (derived from the runtime's file-descriptor limit), refuses
the excess at once and cheaply (a reset, no task, no log line per connection), backs off
when the kernel says the process is out of descriptors (an `accept` that fails with
EMFILE leaves the connection queued and the socket readable: retrying at once spins
forever), and logs repeated errors at most once per interval.
"""

from __future__ import annotations

import asyncio
import errno
import resource
import socket
import struct
import time
from collections import Counter
from typing import Any, Optional

__all__ = ["PER_SANDBOX", "ConnectionLimits", "LogLimiter", "AcceptBackoff", "fd_budget",
           "raise_nofile_limit", "reset"]

# Concurrent proxy connections of one sandbox: enough for a client with a thousand open
# connections (a load test, a crawler) to be served, not queued or reset; still a bound
# (the excess is reset), and the total keeps its last quarter for sandboxes holding few.
# On a process with few descriptors, a quarter of them (never below PER_SANDBOX_MIN):
# one sandbox must not take the descriptors every other sandbox needs.
PER_SANDBOX = 1024
PER_SANDBOX_MIN = 256
FDS_PER_CONN = 3      # sandbox side + upstream + (URL handler) orchestrator
FD_RESERVE = 1536     # for everything else: DNS forwarder, sandboxes' pidfds, pipes, netns
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def raise_nofile_limit() -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to its hard limit; returns the soft
    limit now in force. (Processes the runtime starts inherit it, as with Docker's
    default nofile of its hard limit.)"""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            return soft
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (OSError, ValueError):
            pass
    return soft


def fd_budget() -> int:
    """Descriptors this process may open (the current soft RLIMIT_NOFILE)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


class ConnectionLimits:
    """Counts open connections per key (a sandbox's address) and in total.

    A few heavy sandboxes must not take the whole total from the others: once three
    quarters of it are in use, a key that already holds `FAIR` connections gets no
    more, so the last quarter stays for sandboxes that hold few.
    """

    FAIR = 16

    def __init__(self, per_key: Optional[int] = None, total: Optional[int] = None) -> None:
        if total is None:
            total = max(64, (fd_budget() - FD_RESERVE) // FDS_PER_CONN)
        self._fixed = per_key is not None
        self._per_key, self.total = min(PER_SANDBOX if per_key is None else per_key, total), total
        self.busy = total * 3 // 4
        self._open: Counter[str] = Counter()
        self._sum = 0

    @property
    def per_key(self) -> int:
        """The bound in force: by default re-read against the descriptors the process
        has now (the limit may be lowered while running)."""
        if self._fixed:
            return self._per_key
        return min(self._per_key, max(PER_SANDBOX_MIN, fd_budget() // 4))

    def acquire(self, key: str) -> bool:
        n = self._open.get(key, 0)
        if self._sum >= self.total or n >= self.per_key:
            return False
        if self._sum >= self.busy and n >= min(self.FAIR, self._per_key):
            return False
        self._open[key] += 1
        self._sum += 1
        return True

    def release(self, key: str) -> None:
        n = self._open[key] - 1
        if n <= 0:
            del self._open[key]
        else:
            self._open[key] = n
        self._sum -= 1

    def count(self, key: Optional[str] = None) -> int:
        return self._sum if key is None else self._open.get(key, 0)


class LogLimiter:
    """At most one log line per event name per `interval`; the line carries how many
    were suppressed since the last one."""

    def __init__(self, logger: Any, interval: float = 5.0) -> None:
        self._log, self._interval = logger, interval
        self._next: dict[str, float] = {}
        self._dropped: Counter[str] = Counter()

    def __call__(self, level: str, event: str, **fields: Any) -> None:
        now = time.monotonic()
        if now < self._next.get(event, 0.0):
            self._dropped[event] += 1
            return
        self._next[event] = now + self._interval
        suppressed = self._dropped.pop(event, 0)
        if suppressed:
            fields["suppressed"] = suppressed
        getattr(self._log, level)(event, **fields)


class AcceptBackoff:
    """Sleep schedule after `accept` failed for lack of resources: 50 ms doubling to 1 s,
    back to nothing after a success. Also yields to the loop every `YIELD_EVERY` accepts:
    `loop.sock_accept` on a socket with a queued connection completes without
    suspending, so a flood of connections could otherwise starve everything else."""

    YIELD_EVERY = 64

    def __init__(self) -> None:
        self.delay = 0.0
        self._streak = 0

    def failed(self, exc: OSError) -> Optional[float]:
        """The pause before the next accept, or None when `exc` is not about resources
        (ECONNABORTED and friends: the next accept may succeed at once)."""
        if exc.errno not in RESOURCE_ERRNOS:
            return None
        self.delay = min(1.0, max(0.05, self.delay * 2))
        return self.delay

    async def succeeded(self) -> None:
        self.delay = 0.0
        self._streak += 1
        if self._streak >= self.YIELD_EVERY:
            self._streak = 0
            await asyncio.sleep(0)


def reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0): the peer learns at once, nothing lingers here."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()
