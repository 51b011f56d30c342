"""linux.cgroupsPath and linux.resources on cgroup v1 (and v2 when unified).

The cgroupfs helpers and mount parsing are sandbox/cgroup_base's; this adds
what an OCI config needs beyond the Python API's Limits: an arbitrary path,
every v1 hierarchy joined (as runc), and the resources table written as given.
Layout when the config names no path: /sandbox-oci/<id> (not the API's shared
`sandbox/` parent, which `sandbox gc` sweeps).
"""
from __future__ import annotations

import errno
import os
import signal
import time

from ..cgroup_base import _mounts, _read
from .state import OciError

SKIP_V1 = ("name=systemd", "misc", "rdma", "net_cls", "net_prio", "perf_event")


def hierarchies() -> dict[str, str]:
    """name (the mount's controllers, "cpu,cpuacct") -> mountpoint; "" -> v2 root if unified."""
    out: dict[str, str] = {}
    for mnt, fstype, opts in _mounts():
        if fstype == "cgroup2" and mnt == "/sys/fs/cgroup":
            return {"": mnt}
        if fstype == "cgroup":
            name = os.path.basename(mnt)
            if name in SKIP_V1 or "name=systemd" in opts or name.startswith("name="):
                continue
            out.setdefault(name, mnt)
    return out


def resolve_path(cgroups_path: str | None, cid: str) -> str:
    p = cgroups_path or f"/sandbox-oci/{cid}"
    if ":" in p and not p.startswith("/"):
        raise OciError("systemd cgroup paths (slice:prefix:name) are not supported; "
                       "use a cgroupfs path")
    p = os.path.normpath("/" + p.lstrip("/"))
    if p == "/":
        raise OciError("cgroupsPath must not be the root cgroup")
    return p


def _write(path: str, value) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise OciError(f"cgroup file {path} does not exist on this host") from None
    try:
        os.write(fd, str(value).encode())
    except OSError as e:
        raise OciError(f"write {value!r} to {path}: {e.strerror}") from None
    finally:
        os.close(fd)


def _dev(rule: dict) -> str:
    t = rule.get("type") or "a"
    major = rule.get("major", -1)
    minor = rule.get("minor", -1)
    num = lambda v: "*" if v is None or v < 0 else str(v)  # noqa: E731
    return f"{t} {num(major)}:{num(minor)} {rule.get('access') or 'rwm'}"


# runc always allows these (specconv.AllowedDevices), after the config's rules.
DEFAULT_ALLOW = ({"type": "c", "major": 1, "minor": 3}, {"type": "c", "major": 1, "minor": 5},
                 {"type": "c", "major": 1, "minor": 7}, {"type": "c", "major": 1, "minor": 8},
                 {"type": "c", "major": 1, "minor": 9}, {"type": "c", "major": 5, "minor": 0},
                 {"type": "c", "major": 5, "minor": 1}, {"type": "c", "major": 5, "minor": 2},
                 {"type": "c", "major": 136, "minor": -1}, {"type": "c", "major": 10, "minor": 200})


def v1_writes(res: dict) -> list[tuple[str, str, object]]:
    """(controller, file, value) for linux.resources, in a safe order."""
    w: list[tuple[str, str, object]] = []
    mem = res.get("memory") or {}
    if mem.get("limit") is not None:
        w.append(("memory", "memory.limit_in_bytes", mem["limit"]))
    if mem.get("swap") is not None:
        w.append(("memory", "memory.memsw.limit_in_bytes", mem["swap"]))
    if mem.get("reservation") is not None:
        w.append(("memory", "memory.soft_limit_in_bytes", mem["reservation"]))
    if mem.get("kernel") is not None:
        w.append(("memory", "memory.kmem.limit_in_bytes", mem["kernel"]))
    if mem.get("kernelTCP") is not None:
        w.append(("memory", "memory.kmem.tcp.limit_in_bytes", mem["kernelTCP"]))
    if mem.get("swappiness") is not None and 0 <= mem["swappiness"] <= 100:
        w.append(("memory", "memory.swappiness", mem["swappiness"]))
    if mem.get("disableOOMKiller"):
        w.append(("memory", "memory.oom_control", 1))
    pids = res.get("pids") or {}
    if pids.get("limit") is not None:
        w.append(("pids", "pids.max", "max" if pids["limit"] <= 0 else pids["limit"]))
    cpu = res.get("cpu") or {}
    for key, fname in (("shares", "cpu.shares"), ("period", "cpu.cfs_period_us"),
                       ("quota", "cpu.cfs_quota_us"), ("realtimePeriod", "cpu.rt_period_us"),
                       ("realtimeRuntime", "cpu.rt_runtime_us")):
        if cpu.get(key) not in (None, 0) or (key == "quota" and cpu.get(key) is not None):
            w.append(("cpu", fname, cpu[key]))
    if cpu.get("cpus"):
        w.append(("cpuset", "cpuset.cpus", cpu["cpus"]))
    if cpu.get("mems"):
        w.append(("cpuset", "cpuset.mems", cpu["mems"]))
    blk = res.get("blockIO") or {}
    if blk.get("weight") is not None:
        w.append(("blkio", "blkio.weight", blk["weight"]))
    if blk.get("leafWeight") is not None:
        w.append(("blkio", "blkio.leaf_weight", blk["leafWeight"]))
    for key, fname in (("throttleReadBpsDevice", "blkio.throttle.read_bps_device"),
                       ("throttleWriteBpsDevice", "blkio.throttle.write_bps_device"),
                       ("throttleReadIOPSDevice", "blkio.throttle.read_iops_device"),
                       ("throttleWriteIOPSDevice", "blkio.throttle.write_iops_device")):
        for d in blk.get(key) or ():
            w.append(("blkio", fname, f"{d['major']}:{d['minor']} {d['rate']}"))
    for d in blk.get("weightDevice") or ():
        if d.get("weight") is not None:
            w.append(("blkio", "blkio.weight_device", f"{d['major']}:{d['minor']} {d['weight']}"))
    for h in res.get("hugepageLimits") or ():
        w.append(("hugetlb", f"hugetlb.{h['pageSize']}.limit_in_bytes", h["limit"]))
    net = res.get("network") or {}
    if net.get("classID") is not None:
        w.append(("net_cls", "net_cls.classid", net["classID"]))
    for p in net.get("priorities") or ():
        w.append(("net_prio", "net_prio.ifpriomap", f"{p['name']} {p['priority']}"))
    devs = res.get("devices")
    if devs is not None:
        for rule in list(devs) + [dict(r, allow=True, access="rwm") for r in DEFAULT_ALLOW]:
            w.append(("devices", "devices.allow" if rule.get("allow") else "devices.deny",
                      _dev(rule)))
    return w


def v2_writes(res: dict) -> list[tuple[str, str, object]]:
    w: list[tuple[str, str, object]] = []
    mem = res.get("memory") or {}
    if mem.get("limit") is not None:
        w.append(("", "memory.max", "max" if mem["limit"] < 0 else mem["limit"]))
        if mem.get("swap") is not None:
            sw = mem["swap"]
            w.append(("", "memory.swap.max", "max" if sw < 0 else max(0, sw - mem["limit"])))
    pids = res.get("pids") or {}
    if pids.get("limit") is not None:
        w.append(("", "pids.max", "max" if pids["limit"] <= 0 else pids["limit"]))
    cpu = res.get("cpu") or {}
    if cpu.get("quota") is not None or cpu.get("period"):
        q = cpu.get("quota")
        w.append(("", "cpu.max", f"{'max' if q is None or q < 0 else q} {cpu.get('period') or 100000}"))
    if cpu.get("shares"):
        w.append(("", "cpu.weight", 1 + ((cpu["shares"] - 2) * 9999) // 262142))
    for k in ("cpus", "mems"):
        if cpu.get(k):
            w.append(("", f"cpuset.{k}", cpu[k]))
    return w


class Cgroups:
    """The container's cgroup directories (name -> dir)."""

    def __init__(self, dirs: dict[str, str]):
        self.dirs = dirs

    @classmethod
    def create(cls, path: str, resources: dict | None) -> "Cgroups":
        dirs = {name: mnt + path for name, mnt in hierarchies().items()}
        made = []
        cg = cls(dirs)
        try:
            for name, d in dirs.items():
                parent = os.path.dirname(d)
                if not os.path.isdir(d):
                    os.makedirs(d)
                    made.append(d)
                if "cpuset" in name.split(","):
                    # A new v1 cpuset starts empty: nothing could join it.
                    _inherit_cpuset(parent, d)
            cg.apply(resources or {})
        except OSError as e:
            cg.dirs = {n: d for n, d in dirs.items() if d in made}
            cg.remove()
            raise OciError(f"cgroup {path}: {e.strerror or e}") from None
        except BaseException:
            cg.dirs = {n: d for n, d in dirs.items() if d in made}
            cg.remove()
            raise
        return cg

    def _dir(self, controller: str) -> str | None:
        if "" in self.dirs:
            return self.dirs[""]
        for name, d in self.dirs.items():
            if controller in name.split(","):
                return d
        return None

    def apply(self, res: dict) -> None:
        writes = v2_writes(res) if "" in self.dirs else v1_writes(res)
        for controller, fname, value in writes:
            d = self._dir(controller)
            if d is None:
                raise OciError(f"cgroup controller {controller} is not available on this host")
            _write(os.path.join(d, fname), value)

    def procs_fds(self) -> list[int]:
        return [os.open(os.path.join(d, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
                for d in dict.fromkeys(self.dirs.values())]

    def pids(self) -> list[int]:
        seen: set[int] = set()
        for d in dict.fromkeys(self.dirs.values()):
            seen.update(int(p) for p in (_read(os.path.join(d, "cgroup.procs")) or "").split())
        return sorted(seen)

    def kill_all(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = self.pids()
            if not pids:
                return
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            wait_gone(pids, deadline)

    def remove(self) -> None:
        for d in sorted(dict.fromkeys(self.dirs.values()), reverse=True):
            for _ in range(50):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        raise
                    self.kill_all(2.0)
            # the runtime's default parent, when now empty
            parent = os.path.dirname(d)
            if os.path.basename(parent) == "sandbox-oci":
                try:
                    os.rmdir(parent)
                except OSError:
                    pass


def _inherit_cpuset(parent: str, d: str) -> None:
    for f in ("cpuset.cpus", "cpuset.mems"):
        if not (_read(os.path.join(d, f)) or "").strip():
            if not (_read(os.path.join(parent, f)) or "").strip():
                _inherit_cpuset(os.path.dirname(parent), parent)
            _write(os.path.join(d, f), (_read(os.path.join(parent, f)) or "").strip())


def wait_gone(pids: list[int], deadline: float) -> None:
    """Wait (pidfds, no sleep) until every pid has exited."""
    import select
    fds = []
    for p in pids:
        try:
            fds.append(os.pidfd_open(p))
        except OSError:
            pass
    try:
        poll = select.poll()
        for fd in fds:
            poll.register(fd, select.POLLIN)
        pending = set(fds)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            for fd, _ in poll.poll(left * 1000):
                pending.discard(fd)
                poll.unregister(fd)
    finally:
        for fd in fds:
            os.close(fd)
