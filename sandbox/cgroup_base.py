"""The vocabulary and cgroupfs primitives shared by `sandbox.cgroups`' parts.

Limits (validation and the files each backend writes for them), small
cgroupfs file helpers, /proc/self/mounts parsing, and the mkdir/rmdir of a
sandbox's directory under the shared parent.  Both backends and the `Cgroup`
object build on this; nothing here knows which backend is in use.

Imports nothing from `sandbox`: the cgroup code works without the C extension.
"""
from __future__ import annotations

import dataclasses
import errno
import math
import os
import re

MiB = 1 << 20
SHARED_PARENT = "sandbox"
CGROUP_ROOT = "/sys/fs/cgroup"
CPU_PERIOD_US = 100_000
# The kernel refuses a CFS quota below 1 ms.
MIN_CPUS = 1000 / CPU_PERIOD_US
V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")
V2_CONTROLLERS = ("memory", "pids", "cpu")
REQUIRED = ("memory", "pids")  # SPEC §9: memory and PID limits on every sandbox
UNLIMITED_V1 = 1 << 62  # v1 reports "no limit" as PAGE_COUNTER_MAX * page size
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_SIZE_RE = re.compile(r"\s*(\d+)\s*([kmg]?)\s*", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


class CgroupError(OSError):
    """A cgroup could not be made, limited or removed: errno, path and why."""


def parse_size(value: int | str) -> int:
    """Bytes (int or digits) or "<n>[KMG]", case-insensitive, binary units."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"size must be an int or a str like '256M', not {type(value).__name__}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must be >= 0, got {value}")
        return value
    m = _SIZE_RE.fullmatch(value)
    if m is None:
        raise ValueError(f"bad size {value!r}: expected bytes or '<n>[KMG]' like '256M'")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


@dataclasses.dataclass(frozen=True)
class Limits:
    """Validated limits of one sandbox.  `memory` includes swap; `cpus=None`: no quota."""

    memory: int = 512 * MiB
    pids: int = 1024
    cpus: float | None = None

    def __post_init__(self) -> None:
        memory = parse_size(self.memory)
        if memory < MiB:
            raise ValueError(f"memory must be >= 1M, got {memory} bytes")
        if isinstance(self.pids, bool) or not isinstance(self.pids, int):
            raise TypeError(f"pids must be an int, not {type(self.pids).__name__}")
        if self.pids < 1:
            raise ValueError(f"pids must be >= 1, got {self.pids}")
        cpus = self.cpus
        if cpus is not None:
            if isinstance(cpus, bool) or not isinstance(cpus, (int, float)):
                raise TypeError(f"cpus must be a float or None, not {type(cpus).__name__}")
            if not math.isfinite(cpus) or cpus < MIN_CPUS:
                raise ValueError(f"cpus must be a finite number >= {MIN_CPUS}, got {cpus}")
            cpus = float(cpus)
        object.__setattr__(self, "memory", memory)
        object.__setattr__(self, "cpus", cpus)

    @classmethod
    def from_args(cls, memory=None, pids=None, cpus=None) -> "Limits":
        """`rt.sandbox(memory=, pids=, cpus=)`: None means the documented default."""
        kw = {k: v for k, v in (("memory", memory), ("pids", pids)) if v is not None}
        return cls(cpus=cpus, **kw)

    def cpu_quota_us(self) -> int | None:
        return None if self.cpus is None else max(1000, round(self.cpus * CPU_PERIOD_US))


def v2_limit_writes(limits: Limits) -> list[tuple[str, str]]:
    """(file, value) pairs the v2 backend writes, in order; optional files may be absent."""
    quota = limits.cpu_quota_us()
    return [
        ("memory.max", str(limits.memory)),
        # "swap included": with swap.max 0 nothing can swap past memory.max.
        ("memory.swap.max", "0"),
        ("pids.max", str(limits.pids)),
        ("cpu.max", f"{'max' if quota is None else quota} {CPU_PERIOD_US}"),
    ]


def v1_limit_writes(limits: Limits) -> list[tuple[str, str, str]]:
    """(controller, file, value) triples for v1, in order.

    memsw (memory+swap) must be >= the memory limit at every moment, so the memory
    limit goes first; both equal means the sandbox cannot swap past its limit.
    """
    quota = limits.cpu_quota_us()
    return [
        ("memory", "memory.limit_in_bytes", str(limits.memory)),
        ("memory", "memory.memsw.limit_in_bytes", str(limits.memory)),
        # v1 charges socket buffers to the cgroup only once a TCP limit is
        # set (v2 always does): without it a 64M sandbox held 607 MiB of the
        # host's TCP memory. The same bound as memory; the kernel then also
        # counts it under memory.limit_in_bytes' pressure.
        ("memory", "memory.kmem.tcp.limit_in_bytes", str(limits.memory)),
        ("pids", "pids.max", str(limits.pids)),
        ("cpu", "cpu.cfs_period_us", str(CPU_PERIOD_US)),
        ("cpu", "cpu.cfs_quota_us", str(-1 if quota is None else quota)),
    ]


# -- small file helpers ----------------------------------------------------------

def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None


def _write(path: str, value: str) -> None:
    # One write(2) per value: cgroup files parse each write separately.
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    except OSError as e:
        raise CgroupError(e.errno, f"write {value!r}: {os.strerror(e.errno)}", path) from None
    finally:
        os.close(fd)


def _keyed(text: str | None) -> dict[str, int]:
    """Parse "key value" lines (cpu.stat, memory.events, memory.oom_control)."""
    out = {}
    for line in (text or "").splitlines():
        k, _, v = line.partition(" ")
        if v.strip().lstrip("-").isdigit():
            out[k] = int(v)
    return out


def _int(text: str | None, unlimited: int | None = None) -> int | None:
    if text is None or text.strip() == "max":
        return None
    n = int(text.split()[0])
    return None if unlimited is not None and n >= unlimited else n


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"bad cgroup {what} {name!r}: expected [A-Za-z0-9][A-Za-z0-9_.-]{{0,127}}")


def _mounts(path: str = "/proc/self/mounts") -> list[tuple[str, str, set[str]]]:
    """(mountpoint, fstype, options) of every cgroup mount; \\040-style escapes undone."""
    out = []
    with open(path) as f:
        for line in f:
            _, mnt, fstype, opts, *_ = line.split()
            if fstype in ("cgroup", "cgroup2"):
                mnt = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), mnt)
                out.append((mnt, fstype, set(opts.split(","))))
    return out


def _v1_mounts(mounts_file: str = "/proc/self/mounts") -> dict[str, str]:
    """controller -> mountpoint of its v1 hierarchy (first mount wins)."""
    found: dict[str, str] = {}
    for mnt, fstype, opts in _mounts(mounts_file):
        if fstype == "cgroup":
            for c in V1_CONTROLLERS:
                if c in opts:
                    found.setdefault(c, mnt)
    return found


def _v2_controllers(root: str) -> set[str]:
    return set((_read(os.path.join(root, "cgroup.controllers")) or "").split())


# -- the shared parent's children -----------------------------------------------

def _rmdir_parent(path: str) -> None:
    """Remove the shared parent when empty; another runtime may still use or recreate it."""
    try:
        os.rmdir(path)
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EBUSY, errno.EEXIST):
            raise


def _mkdir_child(parent: str, name: str, prepare=None) -> str:
    """mkdir parent/name; parent may be removed concurrently by another runtime's close()."""
    path = os.path.join(parent, name)
    for _ in range(16):
        os.makedirs(parent, exist_ok=True)
        if prepare is not None:
            prepare()
        try:
            os.mkdir(path)
            return path
        except FileNotFoundError:
            continue  # the empty shared parent was just removed: make it again
        except FileExistsError:
            raise CgroupError(errno.EEXIST, "cgroup already exists", path) from None
    raise CgroupError(errno.EAGAIN, "shared parent keeps disappearing", parent)


def _subdirs(path: str) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(path) if e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return []
