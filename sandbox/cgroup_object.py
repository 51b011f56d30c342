"""`Cgroup`: one sandbox's cgroup, whatever the backend that made it.

Split from `sandbox.cgroups` (which re-exports it): the backends in
`cgroup_v1` / `cgroup_v2` make these objects, and `cgroups` picks a backend,
so the class lives below both to keep the imports acyclic.
"""
from __future__ import annotations

import errno
import os
import select
import signal
import time

from .cgroup_base import UNLIMITED_V1, CgroupError, _int, _keyed, _read, _rmdir_parent, _write


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
