"""cgroup v1 backend: one directory per controller hierarchy per sandbox.

memory, pids, cpu and cpuacct, co-mounted or not.  There is no
CLONE_INTO_CGROUP on v1: the runtime calls `Cgroup.join(pid)` after clone,
while the child still waits on its sync pipe.  Re-exported by `sandbox.cgroups`.
"""
from __future__ import annotations

import errno
import os

from .cgroup_base import (CGROUP_ROOT, REQUIRED, CgroupError, Limits, _mkdir_child, _subdirs,
                          _v1_mounts, _write, v1_limit_writes)
from .cgroup_object import Cgroup


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
