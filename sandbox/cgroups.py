"""Per-sandbox cgroups: memory, PID and CPU limits, stats, kill and cleanup.

One interface (`Cgroup`, made by `create_cgroup`) over two small backends:

* `V2Backend`: one directory in the unified hierarchy.  Its `dirfd` goes to
  clone3(CLONE_INTO_CGROUP), so the child is born inside its limits.
* `V1Backend`: one directory per controller hierarchy (memory, pids, cpu and
  cpuacct, co-mounted or not).  There is no CLONE_INTO_CGROUP on v1: the runtime
  calls `join(pid)` after clone, while the child still waits on its sync pipe.

Layout: `<hierarchy root>/sandbox/<name>`, shared by every runtime of the machine.
We put `sandbox/` under the hierarchy root, not under the runtime's own cgroup
(here that is e.g. `memory:/process_api/<id>`), as runc and Docker's cgroupfs
driver do: a dead runtime's cgroups are then found by `sandbox gc` at a fixed path
without knowing which cgroup the runtime ran in, and v2's "no internal processes"
rule cannot bite (the runtime's own cgroup holds processes, so it could not enable
controllers for children).  The price: the runtime's own cgroup limits do not
cover its sandboxes.  Whoever must keep sandboxes inside a delegated subtree
passes that subtree as the backend root (`V2Backend(root=...)`,
`V1Backend(mounts={...})`).

This module imports nothing from `sandbox`: it works without the C extension.
"""
from __future__ import annotations

import dataclasses
import errno
import math
import os
import re
import select
import signal
import time

__all__ = [
    "MiB", "SHARED_PARENT", "CgroupError", "Limits", "parse_size", "detect",
    "default_backend", "V1Backend", "V2Backend", "Cgroup", "create_cgroup",
    "list_cgroups", "remove_cgroup_by_name", "v2_limit_writes", "v1_limit_writes",
]

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


def detect(root: str = CGROUP_ROOT, mounts_file: str = "/proc/self/mounts") -> str:
    """"v2" if `root` is cgroup2 with memory and pids; "v1" if those v1 hierarchies exist."""
    for mnt, fstype, _ in _mounts(mounts_file):
        if mnt == root and fstype == "cgroup2" and set(REQUIRED) <= _v2_controllers(root):
            return "v2"
    if set(REQUIRED) <= set(_v1_mounts(mounts_file)):
        return "v1"
    raise CgroupError(errno.ENOTSUP,
                      "no cgroup2 with memory+pids and no v1 memory+pids hierarchies", root)


def default_backend() -> "V1Backend | V2Backend":
    return V2Backend() if detect() == "v2" else V1Backend()


# -- the cgroup object -------------------------------------------------------------

class Cgroup:
    """One sandbox's cgroup: one directory (v2) or one per hierarchy (v1). Owner of `dirfd`."""

    def __init__(self, backend, parent: str, name: str, dirs: dict[str, str], dirfd: int | None):
        self.backend, self.parent, self.name = backend, parent, name
        self.dirs = dirs  # controller ("" on v2) -> directory; v1 co-mounts share one
        self.dirfd = dirfd  # O_RDONLY|O_DIRECTORY for CLONE_INTO_CGROUP (v2), else None
        self.closed = False

    def __repr__(self) -> str:
        return f"<Cgroup {self.backend.version} {self.parent}/{self.name}>"

    def __enter__(self) -> "Cgroup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def paths(self) -> list[str]:
        return list(dict.fromkeys(self.dirs.values()))

    def _file(self, controller: str, name: str) -> str | None:
        d = self.dirs.get("" if self.backend.version == "v2" else controller)
        return None if d is None else os.path.join(d, name)

    def _read(self, controller: str, name: str) -> str | None:
        path = self._file(controller, name)
        return None if path is None else _read(path)

    def join(self, pid: int) -> None:
        """Move `pid` (a whole thread group) into every directory of this cgroup."""
        for d in self.paths:
            _write(os.path.join(d, "cgroup.procs"), str(pid))

    def pids(self) -> list[int]:
        seen: set[int] = set()
        for d in self.paths:
            seen.update(int(p) for p in (_read(os.path.join(d, "cgroup.procs")) or "").split())
        return sorted(seen)

    def stats(self) -> dict[str, int | None]:
        """Uniform keys on both backends; None where this kernel has no such file."""
        if self.backend.version == "v2":
            cpu = _keyed(self._read("", "cpu.stat"))
            usage = cpu.get("usage_usec")
            throttled = cpu.get("throttled_usec")
            return {
                "memory_current": _int(self._read("", "memory.current")),
                "memory_max": _int(self._read("", "memory.max")),
                "pids_current": _int(self._read("", "pids.current")),
                "cpu_usage_ns": None if usage is None else usage * 1000,
                "nr_throttled": cpu.get("nr_throttled", 0 if usage is not None else None),
                "throttled_ns": None if throttled is None else throttled * 1000,
                "oom_kills": _keyed(self._read("", "memory.events")).get("oom_kill"),
            }
        cpu = _keyed(self._read("cpu", "cpu.stat"))
        return {
            "memory_current": _int(self._read("memory", "memory.usage_in_bytes")),
            "memory_max": _int(self._read("memory", "memory.limit_in_bytes"), UNLIMITED_V1),
            "pids_current": _int(self._read("pids", "pids.current")),
            "cpu_usage_ns": _int(self._read("cpuacct", "cpuacct.usage")),
            "nr_throttled": cpu.get("nr_throttled"),
            "throttled_ns": cpu.get("throttled_time"),
            "oom_kills": _keyed(self._read("memory", "memory.oom_control")).get("oom_kill"),
        }

    def oom_killed(self) -> bool:
        """True once the kernel's OOM killer has killed something in this cgroup.

        Tells an OOM kill from another SIGKILL: both end the process with 137.
        """
        return (self.stats()["oom_kills"] or 0) > 0

    def kill_all(self, timeout: float = 10.0) -> bool:
        """SIGKILL everything inside and wait until it is gone. True when empty.

        v2 has cgroup.kill (5.14+): the kernel kills atomically, forks included.
        Otherwise (v1) we loop: read cgroup.procs, SIGKILL each process through a
        pidfd, wait on the pidfds (readable once the process has exited), and
        read again, since a process may have forked before its kill landed; the
        pids limit bounds how many such rounds a fork loop can force.
        """
        kill_file = self._file("", "cgroup.kill") if self.backend.version == "v2" else None
        if kill_file and os.path.exists(kill_file):
            _write(kill_file, "1")
        deadline = time.monotonic() + timeout
        while True:
            pids = self.pids()
            if not pids:
                return True
            fds = [fd for fd in (self._pidfd_of_member(pid) for pid in pids) if fd is not None]
            if not fds and time.monotonic() >= deadline:
                return False  # members we cannot open (exiting, or fd limit): give up in time
            try:
                for fd in fds:
                    try:
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                if not _wait_readable(fds, deadline):
                    return not self.pids()
            finally:
                for fd in fds:
                    os.close(fd)

    def _pidfd_of_member(self, pid: int) -> int | None:
        """A pidfd for `pid`, if that pid (still) names a member of this cgroup.

        A pid read from cgroup.procs may exit and be reused before we open it; the
        pidfd pins the process, so checking membership *after* opening makes sure
        we never signal a stranger.
        """
        try:
            fd = os.pidfd_open(pid)
        except (ProcessLookupError, OSError):
            return None
        suffix = f"/{self.parent}/{self.name}"
        text = _read(f"/proc/{pid}/cgroup") or ""
        if any(line.rstrip().endswith(suffix) for line in text.splitlines()):
            return fd
        os.close(fd)
        return None

    def close(self) -> None:
        """Kill what is left, rmdir every directory, then the shared parent if empty.

        Idempotent; keeps going past errors and raises the first.
        """
        if self.closed:
            return
        self.closed = True
        if self.dirfd is not None:
            os.close(self.dirfd)
            self.dirfd = None
        first: BaseException | None = None
        for d in self.paths:
            try:
                _rmdir(d, self)
            except OSError as e:
                first = first or e
        for d in self.paths:
            try:
                _rmdir_parent(os.path.dirname(d))
            except OSError as e:
                first = first or e
        if first is not None:
            raise first


def _wait_readable(fds: list[int], deadline: float) -> bool:
    """Wait (poll, no sleep) until every pidfd is readable, i.e. its process exited."""
    p = select.poll()
    for fd in fds:
        p.register(fd, select.POLLIN)
    pending = set(fds)
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        for fd, _ in p.poll(left * 1000):
            pending.discard(fd)
            p.unregister(fd)
    return True


def _rmdir(path: str, cg: Cgroup) -> None:
    for _ in range(3):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise CgroupError(e.errno, f"rmdir: {os.strerror(e.errno)}", path) from None
        cg.kill_all()
    raise CgroupError(errno.EBUSY, "rmdir: still busy after kill_all", path)


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


# -- backends -------------------------------------------------------------------------

class V2Backend:
    """The unified hierarchy at `root` (default /sys/fs/cgroup).

    `required`: controllers without which `create` refuses (SPEC §9 wants memory
    and pids on every sandbox); tests pass () to exercise a controller-less cgroup2.
    """

    version = "v2"

    def __init__(self, root: str = CGROUP_ROOT, *, required=REQUIRED):
        self.root = root
        self.required = tuple(required)

    def controllers(self) -> set[str]:
        return _v2_controllers(self.root)

    def _enable(self, parent_dir: str, wanted: list[str]) -> None:
        # One controller per write: a missing one must not block the others.
        for d in (self.root, parent_dir):
            have = set((_read(os.path.join(d, "cgroup.subtree_control")) or "").split())
            for c in wanted:
                if c not in have:
                    _write(os.path.join(d, "cgroup.subtree_control"), f"+{c}")

    def create(self, parent: str, name: str, limits: Limits) -> Cgroup:
        available = self.controllers()
        missing = [c for c in self.required if c not in available]
        if missing:
            raise CgroupError(errno.ENOTSUP, f"cgroup2 lacks controllers {', '.join(missing)} "
                              f"(has: {' '.join(sorted(available)) or 'none'})", self.root)
        parent_dir = os.path.join(self.root, parent)
        wanted = [c for c in V2_CONTROLLERS if c in available]
        path = _mkdir_child(parent_dir, name, lambda: self._enable(parent_dir, wanted))
        cg = Cgroup(self, parent, name, {"": path}, None)
        try:
            for fname, value in v2_limit_writes(limits):
                if os.path.exists(os.path.join(path, fname)):
                    _write(os.path.join(path, fname), value)
            cg.dirfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except BaseException:
            cg.close()
            raise
        return cg

    def open(self, parent: str, name: str) -> Cgroup | None:
        path = os.path.join(self.root, parent, name)
        return Cgroup(self, parent, name, {"": path}, None) if os.path.isdir(path) else None

    def list(self, parent: str) -> list[str]:
        return _subdirs(os.path.join(self.root, parent))


class V1Backend:
    """v1 hierarchies; `mounts` maps controller -> mountpoint (default: /proc/self/mounts)."""

    version = "v1"

    def __init__(self, mounts: dict[str, str] | None = None):
        self.mounts = dict(mounts) if mounts is not None else _v1_mounts()
        missing = [c for c in REQUIRED if c not in self.mounts]
        if missing:
            raise CgroupError(errno.ENOTSUP, f"v1 hierarchies missing: {', '.join(missing)}",
                              CGROUP_ROOT)

    def _dirs(self, parent: str, name: str) -> dict[str, str]:
        return {c: os.path.join(m, parent, name) for c, m in self.mounts.items()}

    def create(self, parent: str, name: str, limits: Limits) -> Cgroup:
        dirs = self._dirs(parent, name)
        cg = Cgroup(self, parent, name, dirs, None)
        made: dict[str, str] = {}
        try:
            for d in cg.paths:
                _mkdir_child(os.path.dirname(d), name)
                made[d] = d
            for controller, fname, value in v1_limit_writes(limits):
                path = cg._file(controller, fname)
                if path is not None and os.path.exists(path):
                    _write(path, value)
                elif fname in ("memory.limit_in_bytes", "pids.max"):
                    raise CgroupError(errno.ENOTSUP, f"{fname} missing",
                                      os.path.dirname(path or ""))
        except BaseException:
            # Only remove what we made: an EEXIST must not delete someone else's cgroup.
            cg.dirs = {c: d for c, d in dirs.items() if d in made}
            cg.close()
            raise
        return cg

    def open(self, parent: str, name: str) -> Cgroup | None:
        dirs = {c: d for c, d in self._dirs(parent, name).items() if os.path.isdir(d)}
        return Cgroup(self, parent, name, dirs, None) if dirs else None

    def list(self, parent: str) -> list[str]:
        names: set[str] = set()
        for m in set(self.mounts.values()):
            names.update(_subdirs(os.path.join(m, parent)))
        return sorted(names)


def _subdirs(path: str) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(path) if e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return []


# -- module-level API -------------------------------------------------------------

def create_cgroup(parent_name: str = SHARED_PARENT, *, name: str, limits: Limits | None = None,
                  backend=None) -> Cgroup:
    """Make `<root>/<parent_name>/<name>` with `limits` (default `Limits()`)."""
    _check_name(parent_name, "parent")
    _check_name(name, "name")
    if limits is None:
        limits = Limits()
    elif not isinstance(limits, Limits):
        raise TypeError(f"limits must be a Limits, not {type(limits).__name__}")
    return (backend or default_backend()).create(parent_name, name, limits)


def list_cgroups(parent_name: str = SHARED_PARENT, backend=None) -> list[str]:
    """Names of the cgroups under the shared parent (every runtime's), for gc."""
    _check_name(parent_name, "parent")
    return (backend or default_backend()).list(parent_name)


def remove_cgroup_by_name(name: str, parent_name: str = SHARED_PARENT, backend=None) -> bool:
    """gc: kill what is inside, remove the cgroup and an empty shared parent. False if absent."""
    _check_name(parent_name, "parent")
    _check_name(name, "name")
    cg = (backend or default_backend()).open(parent_name, name)
    if cg is None:
        return False
    cg.close()
    return True
