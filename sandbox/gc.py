"""`sandbox gc`: remove what dead runtimes left behind (SPEC §7, §10 "gc and leaks").

Input: the records of `sandbox.state` under `<state_dir>/runtimes/`.  A record
whose owner (pid + start time) is still running is never touched.  For a dead
owner, in this order:

  for each sandbox, newest first:
    1. its cgroup: SIGKILL everything inside, wait for it, rmdir
       (processes first: nothing may run while its network disappears);
    2. its veth host end (deletes the pair; before the netns, because freeing
       the netns deletes the veth only asynchronously, keeping the name taken);
    3. its netns bind mount (and the mount-point file);
  then the runtime's host objects:
    4. leftover links / cgroups with the runtime's own prefixes (names the
       record could not list; only prefixes that contain the runtime's tag);
    5. the nft table;
    6. the ip rule (fwmark) and the local route of its routing table;
    7. the record itself, last, and only if every step above succeeded, so a
       failed or interrupted gc is simply run again.
  per state dir: the `<state_dir>/netns` directory mount, if nothing is pinned
  in it any more (the kernel's EBUSY is the refcount, under the same flock the
  runtimes take); per machine: the empty shared cgroup parent.

Every step tolerates a half-made or already-removed object (a crash can come
between any two steps of a runtime, or of an earlier gc), so collect() is
idempotent.  It never raises for a kernel object: failures are collected in the
report and the remaining steps still run.

Names come from root-owned files, but they are still checked before use: a
netns path must lie in the state dir's netns directory, a table must carry the
runtime prefix, a cgroup must be a plain name under the shared parent.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import re
from typing import Any, Iterator

from . import cgroups as _cgroups
from . import state as _state
from .log import get_logger

__all__ = ["Report", "Removed", "collect", "DEFAULT_STATE_DIR"]

log = get_logger("sandbox.gc")

DEFAULT_STATE_DIR = "/run/sandbox"


@dataclasses.dataclass(frozen=True)
class Removed:
    kind: str     # "process", "cgroup", "link", "netns", "nft-table", "ip-rule", "mount", "state"
    name: str
    detail: str = ""

    @property
    def verb(self) -> str:
        return "killed" if self.kind == "processes" else "removed"

    def __str__(self) -> str:
        return f"{self.kind} {self.name}" + (f" ({self.detail})" if self.detail else "")


@dataclasses.dataclass
class Report:
    removed: list[Removed] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)   # live/foreign runtimes
    problems: list[str] = dataclasses.field(default_factory=list)  # unreadable records (left alone)
    errors: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def collect(state_dirs: list[str | os.PathLike]) -> Report:
    """Collect every dead runtime recorded under `state_dirs` (duplicates are ignored)."""
    report = Report()
    ctx = _Context(report)
    seen: set[str] = set()
    for sd in state_dirs:
        sd = os.path.abspath(os.fspath(sd))
        key = os.path.realpath(sd)
        if key in seen:
            continue
        seen.add(key)
        ctx.step("state dir " + sd, _collect_state_dir, ctx, sd)
    ctx.step("orphans", _sweep_orphans, ctx)
    ctx.step("cgroup parent", _remove_empty_cgroup_parent, ctx)
    return report


_OWNER = re.compile(r"set owner_(\d+)_(\d+) ")


def _sweep_orphans(ctx: _Context) -> None:
    """Runtimes no scanned state dir knows (e.g. their state dir is gone):
    their nft table names the owner (pid + start ticks). A dead owner's table,
    links, cgroups and netns pins are removed by the tag in their names. A
    table without an owner comment, or with a live owner, is left alone."""
    from netns import gc as netns_gc
    from netns.nft import Nft
    from netns.rules import TABLE_PREFIX, derive_mark_table

    nft = Nft()
    try:
        for table in netns_gc.list_tables(TABLE_PREFIX):
            try:
                text = nft.run(f"list table inet {table}")
            except Exception:
                continue
            m = _OWNER.search(text)
            if m is None or _state.is_alive(int(m.group(1)), 0.0, int(m.group(2))):
                continue
            tag = table[len(TABLE_PREFIX):]
            for path in _nsfs_mounts(f"{tag}-n"):
                ctx.step(f"orphan {tag}: netns {path}", _remove_netns_pin, ctx, path)
            _sweep_prefixes(ctx, tag, {"prefix": f"s{tag}h", "cgroup_prefix": f"{tag}."})
            ctx.step(f"orphan {tag}: nft table", _remove_table, ctx, table)
            mark, rt_table = derive_mark_table(tag)
            ctx.step(f"orphan {tag}: ip rule", _remove_rule, ctx, mark, rt_table)
    finally:
        nft.close()


def _nsfs_mounts(basename_prefix: str) -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            sep = parts.index("-")
            if parts[sep + 1] == "nsfs" and os.path.basename(parts[4]).startswith(basename_prefix):
                out.append(parts[4])
    return out


def _remove_netns_pin(ctx: _Context, path: str) -> None:
    from netns import gc as netns_gc
    netns_gc.remove_netns(path)
    ctx.removed("netns", path)


class _Context:
    """Shared per-collect things: the report, a lazily detected cgroup backend."""

    def __init__(self, report: Report):
        self.report = report
        self._backend: Any = None
        self._backend_error: BaseException | None = None

    def backend(self):
        if self._backend is None and self._backend_error is None:
            try:
                self._backend = _cgroups.default_backend()
            except Exception as e:
                self._backend_error = e
        if self._backend_error is not None:
            raise self._backend_error
        return self._backend

    def removed(self, kind: str, name: str, detail: str = "") -> None:
        self.report.removed.append(Removed(kind, name, detail))
        log.debug("gc.removed", kind=kind, name=name, detail=detail or None)

    def step(self, what: str, fn, *args) -> Any:
        """Run one step; an exception becomes an error line and the caller carries on."""
        try:
            return fn(*args)
        except Exception as e:
            msg = f"{what}: {_one_line(e)}"
            self.report.errors.append(msg)
            log.warning("gc.error", step=what, error=_one_line(e))
            return None


def _one_line(e: BaseException) -> str:
    return (str(e) or type(e).__name__).replace("\n", " ")


# -- per state dir ---------------------------------------------------------------------

def _collect_state_dir(ctx: _Context, state_dir: str) -> None:
    runtimes = _state.runtimes_dir(state_dir)
    if os.path.isdir(runtimes):
        with _flock(runtimes):
            # Under the lock: two gcs at once neither double-report nor race a
            # half-finished collection; runtimes never take this lock.
            problems: list[tuple[str, str]] = []
            for record in _state.load_all(state_dir, problems):
                _collect_runtime(ctx, state_dir, record)
            ctx.report.problems.extend(f"{p}: {why}" for p, why in problems)
    ctx.step(f"netns dir {_netns_dir(state_dir)}", _release_netns_dir, ctx, state_dir)
    ctx.step(f"image store {state_dir}/images", _collect_images, ctx, state_dir)


def _collect_images(ctx: _Context, state_dir: str) -> None:
    """What pulls that died left in the state dir's image store (temp blobs,
    half-unpacked layers): only entries whose lock no live pull holds."""
    from .images.maint import collect_debris
    root = os.path.join(state_dir, "images")
    if os.path.isdir(root):
        for path in collect_debris(root):
            ctx.removed("image-debris", path)


@contextlib.contextmanager
def _flock(directory: str) -> Iterator[None]:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _netns_dir(state_dir: str) -> str:
    return os.path.join(state_dir, "netns")


# -- one runtime -----------------------------------------------------------------------

def _collect_runtime(ctx: _Context, state_dir: str, record: dict[str, Any]) -> None:
    path, tag = record["path"], record["tag"]
    status = _state.owner_status(record)
    if status != "dead":
        why = "alive" if status == "alive" else "another pid namespace"
        ctx.report.skipped.append(f"runtime {tag} (pid {record['pid']}, {why})")
        log.debug("gc.skip_runtime", tag=tag, pid=record["pid"], status=status)
        return
    log.debug("gc.runtime", tag=tag, pid=record["pid"], path=path)
    errors_before = len(ctx.report.errors)
    host = record["host"]
    # The namespaces of a runtime always live in <its state dir>/netns (where
    # its record is); host["netns_dir"] is informational and never widens that.
    default_netns_dir = os.path.realpath(_netns_dir(state_dir))
    netns_dirs = {default_netns_dir}

    for sid, objs in reversed(list(record["sandboxes"].items())):
        _collect_sandbox(ctx, tag, str(sid), objs, netns_dirs, default_netns_dir)

    _sweep_prefixes(ctx, tag, host)
    ctx.step(f"runtime {tag}: cert dirs", _remove_cert_dirs, ctx, state_dir, tag)
    table = host.get("table")
    if table is not None:
        ctx.step(f"runtime {tag}: nft table {table!r}", _remove_table, ctx, table)
    mark, rt_table = host.get("mark"), host.get("rt_table")
    if mark is not None or rt_table is not None:
        ctx.step(f"runtime {tag}: ip rule", _remove_rule, ctx, mark, rt_table)

    if len(ctx.report.errors) == errors_before:
        ctx.step(f"runtime {tag}: state {path}", _remove_record, ctx, path)
    else:
        log.warning("gc.runtime_incomplete", tag=tag, path=path)


def _collect_sandbox(ctx: _Context, tag: str, sid: str, objs: dict[str, Any],
                     netns_dirs: set[str], default_netns_dir: str) -> None:
    where = f"runtime {tag} sandbox {sid}"
    cgroup = objs.get("cgroup")
    if cgroup is not None:
        ctx.step(f"{where}: cgroup {cgroup!r}", _remove_cgroup, ctx, cgroup)
    veth = objs.get("veth")
    if veth is not None:
        ctx.step(f"{where}: link {veth!r}", _remove_link, ctx, veth)
    ns = objs.get("netns")
    if ns is not None:
        ctx.step(f"{where}: netns {ns!r}", _remove_netns, ctx, ns, netns_dirs, default_netns_dir)


def _remove_cgroup(ctx: _Context, name: str) -> None:
    if not isinstance(name, str):
        raise ValueError("not a cgroup name")
    _cgroups._check_name(name, "name")
    cg = ctx.backend().open(_cgroups.SHARED_PARENT, name)
    if cg is None:
        return
    pids = cg.pids()
    try:
        if pids and not cg.kill_all():
            raise _cgroups.CgroupError(errno.EBUSY, "processes survive SIGKILL", cg.paths[0])
    finally:
        cg.close()  # rmdir (kills again on EBUSY) and the shared parent if empty
    if pids:
        ctx.removed("processes", " ".join(map(str, pids)), f"cgroup {name}")
    ctx.removed("cgroup", f"{_cgroups.SHARED_PARENT}/{name}")


def _remove_link(ctx: _Context, ifname: str) -> None:
    from netns import gc as netns_gc

    if not isinstance(ifname, str):
        raise ValueError("not an interface name")
    if netns_gc.remove_link(ifname):
        ctx.removed("link", ifname)


def _remove_netns(ctx: _Context, ns: str, netns_dirs: set[str], default_dir: str) -> None:
    from netns import gc as netns_gc

    if not isinstance(ns, str) or not ns or "\0" in ns:
        raise ValueError("not a netns path")
    path = ns if "/" in ns else os.path.join(default_dir, ns)
    parent = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    if parent not in netns_dirs or os.path.basename(path) in ("", ".", ".."):
        raise ValueError(f"outside the netns directory ({', '.join(sorted(netns_dirs))})")
    path = os.path.join(parent, os.path.basename(path))
    mounts = _mount_points()
    mounted = path in mounts
    if not mounted and not os.path.lexists(path):
        return
    netns_gc.remove_netns(path)  # also unmounts the directory if this was the last one
    ctx.removed("netns", path, "" if mounted else "unmounted file")
    if parent in mounts and parent not in _mount_points():
        ctx.removed("mount", parent)


def _sweep_prefixes(ctx: _Context, tag: str, host: dict[str, Any]) -> None:
    """Objects named with the runtime's own prefixes that no sandbox entry lists.

    The runtime records names before creating objects, so this normally finds
    nothing; it is a second net for a runtime bug.  Only prefixes containing the
    tag are used, so a bad record cannot sweep another runtime's objects.
    """
    prefix = host.get("prefix")
    if isinstance(prefix, str) and tag in prefix:
        from netns import gc as netns_gc

        names = ctx.step(f"runtime {tag}: list links {prefix}*", netns_gc.list_links, prefix) or []
        for name in names:
            ctx.step(f"runtime {tag}: link {name!r}", _remove_link, ctx, name)
    cg_prefix = host.get("cgroup_prefix")
    if isinstance(cg_prefix, str) and tag in cg_prefix:
        names = ctx.step(f"runtime {tag}: list cgroups", lambda: _cgroups.list_cgroups(
            backend=ctx.backend())) or []
        for name in names:
            if name.startswith(cg_prefix):
                ctx.step(f"runtime {tag}: cgroup {name!r}", _remove_cgroup, ctx, name)


def _remove_cert_dirs(ctx: _Context, state_dir: str, tag: str) -> None:
    """<state_dir>/certs/<tag>.* (a sandbox entry's `certs`, and any the
    record missed): runtime-owned, the sandboxes only had read-only binds."""
    from . import certdir
    for path in certdir.sweep(state_dir, tag):
        ctx.removed("dir", path, "sandbox cert dir")


def _remove_table(ctx: _Context, table: str) -> None:
    from netns import gc as netns_gc
    from netns.rules import TABLE_PREFIX

    if not isinstance(table, str) or not table.startswith(TABLE_PREFIX):
        raise ValueError(f"not a runtime table (must start with {TABLE_PREFIX!r})")
    if table in netns_gc.list_tables(TABLE_PREFIX):
        netns_gc.remove_table(table)
        ctx.removed("nft-table", f"inet {table}")


def _remove_rule(ctx: _Context, mark: Any, rt_table: Any) -> None:
    from netns import gc as netns_gc

    for v in (mark, rt_table):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < 1 << 32:
            raise ValueError(f"bad mark/rt_table {v!r}")
    if rt_table in (253, 254, 255):
        raise ValueError(f"refusing reserved routing table {rt_table}")
    if netns_gc.remove_rule(mark, rt_table):
        ctx.removed("ip-rule", f"fwmark {mark:#x} lookup {rt_table}", "and its local route")


def _remove_record(ctx: _Context, path: str) -> None:
    tmp = path[: -len(".json")] + ".json.tmp"
    try:
        os.unlink(tmp)  # a write the runtime never finished
    except FileNotFoundError:
        pass
    _state.remove_journals(path)   # the record's per-sandbox journal (state.py): first, the record names it
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    ctx.removed("state", path)


# -- shared leftovers ------------------------------------------------------------------

def _release_netns_dir(ctx: _Context, state_dir: str) -> None:
    """Unmount `<state_dir>/netns` if no namespace is mounted in it any more.

    Same protocol as netns.namespace (the last NetNS out does this): under the
    state dir's flock, a *non-lazy* umount that the kernel refuses with EBUSY
    while any bind mount sits inside, so a live runtime's namespaces are safe.
    """
    from netns.namespace import _dir_lock, _release_dir_mount

    directory = _netns_dir(state_dir)
    real = os.path.realpath(directory)
    if not os.path.isdir(directory) or real not in _mount_points():
        return
    with _dir_lock(directory):
        _release_dir_mount(directory)
    if real not in _mount_points():
        ctx.removed("mount", real)


def _remove_empty_cgroup_parent(ctx: _Context) -> None:
    """rmdir the shared `sandbox/` parent in every hierarchy if it is empty.

    Safe against a runtime creating a cgroup at the same moment: cgroups.py
    recreates a parent that vanished under it.
    """
    try:
        backend = ctx.backend()
    except Exception:
        return  # no usable cgroups here: nothing of ours can exist either
    if backend.version == "v2":
        roots = [backend.root]
    else:
        roots = sorted(set(backend.mounts.values()))
    for root in roots:
        parent = os.path.join(root, _cgroups.SHARED_PARENT)
        try:
            os.rmdir(parent)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTEMPTY, errno.EBUSY, errno.EEXIST):
                continue
            raise
        ctx.removed("cgroup", parent, "empty shared parent")


_OCTAL = re.compile(r"\\([0-7]{3})")


def _mount_points() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {_OCTAL.sub(lambda m: chr(int(m.group(1), 8)), line.split(" ", 5)[4]) for line in f}
