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

Parts: `cgroup_base` (limits, cgroupfs helpers, mount parsing), `cgroup_object`
(`Cgroup`), `cgroup_v1` / `cgroup_v2` (the backends).  This module picks a
backend and is the public API: import from here, not from the parts.

None of these modules imports anything else from `sandbox`: they work without
the C extension.
"""
from __future__ import annotations

import errno

# Re-exported: `sandbox.cgroups.<name>` is the public (and, for the private
# helpers, the tests' and gc's) way to reach them.
from .cgroup_base import (  # noqa: F401
    CGROUP_ROOT, CPU_PERIOD_US, MIN_CPUS, REQUIRED, SHARED_PARENT, UNLIMITED_V1, V1_CONTROLLERS,
    V2_CONTROLLERS, CgroupError, Limits, MiB, _check_name, _int, _keyed, _mkdir_child, _mounts,
    _read, _rmdir_parent, _subdirs, _v1_mounts, _v2_controllers, _write, parse_size,
    v1_limit_writes, v2_limit_writes)
from .cgroup_object import Cgroup, _rmdir, _wait_readable  # noqa: F401
from .cgroup_v1 import V1Backend
from .cgroup_v2 import V2Backend

__all__ = [
    "MiB", "SHARED_PARENT", "CgroupError", "Limits", "parse_size", "detect",
    "default_backend", "V1Backend", "V2Backend", "Cgroup", "create_cgroup",
    "list_cgroups", "remove_cgroup_by_name", "v2_limit_writes", "v1_limit_writes",
]


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
