"""cgroup v2 backend: one directory per sandbox in the unified hierarchy.

Its `dirfd` goes to clone3(CLONE_INTO_CGROUP), so the child is born inside
its limits.  Re-exported by `sandbox.cgroups`.
"""
from __future__ import annotations

import errno
import os

from .cgroup_base import (CGROUP_ROOT, REQUIRED, V2_CONTROLLERS, CgroupError, Limits,
                          _mkdir_child, _read, _subdirs, _v2_controllers, _write, v2_limit_writes)
from .cgroup_object import Cgroup


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
