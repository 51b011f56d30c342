"""config.json `root`, `mounts`, `linux.maskedPaths/readonlyPaths/devices`
-> the mount plan csrc/mount.c executes (the same ops as sandbox/rootfs.py).

Paths below the container's root are written root-relative with
AT_DST_IN_ROOT (resolved confined to the root by openat2 in C); bind sources
are the caller's host paths (trusted, as runc trusts them). Mount points are
created with AT_KEEP: made if missing, never replacing the bundle's files.
"""
from __future__ import annotations

import os
import stat

from .._native_api import (AT_DST_IN_ROOT, AT_KEEP, AT_SRC_IN_ROOT, OP_FILE, OP_MKDIR, OP_MKNOD,
                           OP_MOUNT, OP_PIVOT, OP_ROOT, OP_SYMLINK, MountOp)
from .state import OciError

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_SYNCHRONOUS = 1, 2, 4, 8, 16
MS_REMOUNT, MS_MANDLOCK, MS_DIRSYNC, MS_NOATIME, MS_NODIRATIME = 32, 64, 128, 1024, 2048
MS_BIND, MS_REC, MS_SILENT, MS_UNBINDABLE, MS_PRIVATE, MS_SLAVE, MS_SHARED = (
    4096, 16384, 32768, 1 << 17, 1 << 18, 1 << 19, 1 << 20)
MS_RELATIME, MS_STRICTATIME = 1 << 21, 1 << 24

# option -> (clear?, flag), as runc's parseMountOptions
FLAGS = {
    "async": (True, MS_SYNCHRONOUS), "atime": (True, MS_NOATIME), "bind": (False, MS_BIND),
    "defaults": (False, 0), "dev": (True, MS_NODEV), "diratime": (True, MS_NODIRATIME),
    "dirsync": (False, MS_DIRSYNC), "exec": (True, MS_NOEXEC), "mand": (False, MS_MANDLOCK),
    "noatime": (False, MS_NOATIME), "nodev": (False, MS_NODEV), "nodiratime": (False, MS_NODIRATIME),
    "noexec": (False, MS_NOEXEC), "nomand": (True, MS_MANDLOCK), "norelatime": (True, MS_RELATIME),
    "nostrictatime": (True, MS_STRICTATIME), "nosuid": (False, MS_NOSUID),
    "rbind": (False, MS_BIND | MS_REC), "relatime": (False, MS_RELATIME),
    "remount": (False, MS_REMOUNT), "ro": (False, MS_RDONLY), "rw": (True, MS_RDONLY),
    "strictatime": (False, MS_STRICTATIME), "suid": (True, MS_NOSUID),
    "sync": (False, MS_SYNCHRONOUS),
}
PROPAGATION = {
    "private": MS_PRIVATE, "rprivate": MS_PRIVATE | MS_REC, "shared": MS_SHARED,
    "rshared": MS_SHARED | MS_REC, "slave": MS_SLAVE, "rslave": MS_SLAVE | MS_REC,
    "unbindable": MS_UNBINDABLE, "runbindable": MS_UNBINDABLE | MS_REC,
}
# runc's default devices: made on every container's /dev tmpfs.
DEFAULT_DEVICES = (("/dev/null", 1, 3), ("/dev/zero", 1, 5), ("/dev/full", 1, 7),
                   ("/dev/random", 1, 8), ("/dev/urandom", 1, 9), ("/dev/tty", 5, 0))
DEV_LINKS = (("/dev/fd", "/proc/self/fd"), ("/dev/stdin", "/proc/self/fd/0"),
             ("/dev/stdout", "/proc/self/fd/1"), ("/dev/stderr", "/proc/self/fd/2"),
             ("/dev/ptmx", "pts/ptmx"))
DEV_TYPES = {"c": stat.S_IFCHR, "u": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}


def parse_options(options) -> tuple[int, int, str]:
    """(flags, propagation flags, data) of a mount's options."""
    flags, prop, data = 0, 0, []
    for o in options or ():
        if not isinstance(o, str):
            raise OciError(f"mount option {o!r} is not a string")
        if o in FLAGS:
            clear, f = FLAGS[o]
            flags = flags & ~f if clear else flags | f
        elif o in PROPAGATION:
            prop |= PROPAGATION[o]
        else:
            data.append(o)
    return flags, prop, ",".join(data)


def _clean(dst: str) -> str:
    if not isinstance(dst, str) or not dst.startswith("/"):
        raise OciError(f"mount destination {dst!r} is not an absolute path")
    return "/" + os.path.normpath(dst).lstrip("/")


def _dirs(rel: str, last: bool = True) -> list[MountOp]:
    parts = [p for p in rel.split("/") if p]
    if not last:
        parts = parts[:-1]
    return [MountOp(OP_MKDIR, "/" + "/".join(parts[:i + 1]), mode=0o755,
                    at=AT_DST_IN_ROOT | AT_KEEP) for i in range(len(parts))]


def _point(rel: str, is_dir: bool) -> list[MountOp]:
    if is_dir:
        return _dirs(rel)
    return _dirs(rel, last=False) + [MountOp(OP_FILE, rel, mode=0o644, at=AT_DST_IN_ROOT | AT_KEEP)]


def _mnt(rel, src=None, fstype=None, flags=0, data=None, src_in_root=False) -> MountOp:
    return MountOp(OP_MOUNT, rel, src=src, fstype=fstype, flags=flags, data=data or None,
                   at=AT_DST_IN_ROOT | (AT_SRC_IN_ROOT if src_in_root else 0))


def mount_ops(m: dict, bundle: str, cgroup_mounts) -> list[MountOp]:
    dst = _clean(m.get("destination"))
    mtype = m.get("type") or ""
    src = m.get("source") or ""
    flags, prop, data = parse_options(m.get("options"))
    ops: list[MountOp] = []
    if mtype == "bind" or flags & MS_BIND:
        if not os.path.isabs(src):
            src = os.path.join(bundle, src)
        try:
            is_dir = stat.S_ISDIR(os.stat(src).st_mode)
        except OSError as e:
            raise OciError(f"mount source {src}: {e.strerror}") from None
        ops += _point(dst, is_dir)
        ops.append(_mnt(dst, src, flags=MS_BIND | (flags & MS_REC)))
        rest = flags & ~(MS_BIND | MS_REC | MS_REMOUNT)
        if rest:
            ops.append(_mnt(dst, flags=MS_REMOUNT | MS_BIND | rest))
    elif mtype == "cgroup":
        ops += _dirs(dst)
        ops += cgroup_mounts(dst, flags)
    else:
        ops += _dirs(dst)
        ops.append(_mnt(dst, src or mtype, mtype, flags, data))
    if prop:
        ops.append(_mnt(dst, flags=prop))
    return ops


def _host_kind(rootfs: str, rel: str) -> str | None:
    """'dir', 'file' or None (absent). /proc and /sys are the kernel's: the
    host's view answers; elsewhere the bundle's rootfs (only a guess of the
    kind: the op itself is resolved confined in C)."""
    host = rel if rel.split("/")[1:2] in (["proc"], ["sys"]) else rootfs + rel
    try:
        st = os.stat(host)
    except OSError:
        return None
    return "dir" if stat.S_ISDIR(st.st_mode) else "file"


def device_ops(devices, has_dev_mount: bool) -> list[MountOp]:
    ops: list[MountOp] = []
    seen = set()
    for d in devices or ():
        path = _clean(d.get("path"))
        kind = DEV_TYPES.get(d.get("type"))
        if kind is None:
            raise OciError(f"device {path}: unknown type {d.get('type')!r}")
        mode = d.get("fileMode", 0o666) & 0o7777
        dev = 0 if kind == stat.S_IFIFO else os.makedev(int(d.get("major", 0)), int(d.get("minor", 0)))
        ops += _dirs(path, last=False)
        ops.append(MountOp(OP_MKNOD, path, flags=dev, mode=kind | mode, at=AT_DST_IN_ROOT))
        seen.add(path)
    if has_dev_mount:
        for path, major, minor in DEFAULT_DEVICES:
            if path not in seen:
                ops.append(MountOp(OP_MKNOD, path, flags=os.makedev(major, minor),
                                   mode=stat.S_IFCHR | 0o666, at=AT_DST_IN_ROOT))
        for path, target in DEV_LINKS:
            ops.append(MountOp(OP_SYMLINK, path, src=target, at=AT_DST_IN_ROOT))
    return ops


def plan(config: dict, bundle: str, rootfs: str, cgroup_mounts) -> list[MountOp]:
    linux = config.get("linux") or {}
    ops = [MountOp(OP_MOUNT, rootfs, src=rootfs, flags=MS_BIND | MS_REC), MountOp(OP_ROOT, rootfs)]
    rprop = linux.get("rootfsPropagation")
    if rprop:
        if rprop not in PROPAGATION:
            raise OciError(f"invalid rootfsPropagation {rprop!r}")
        ops.append(MountOp(OP_MOUNT, rootfs, flags=PROPAGATION[rprop]))
    mounts = config.get("mounts") or []
    has_dev = False
    for m in mounts:
        ops += mount_ops(m, bundle, cgroup_mounts)
        has_dev = has_dev or _clean(m.get("destination")) == "/dev"
    ops += device_ops(linux.get("devices"), has_dev)
    for p in linux.get("readonlyPaths") or ():
        rel = _clean(p)
        if _host_kind(rootfs, rel) is None:
            continue
        ops += [_mnt(rel, rel, flags=MS_BIND | MS_REC, src_in_root=True),
                _mnt(rel, flags=MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)]
    for p in linux.get("maskedPaths") or ():
        rel = _clean(p)
        kind = _host_kind(rootfs, rel)
        if kind == "dir":
            ops.append(_mnt(rel, "tmpfs", "tmpfs", MS_RDONLY, "size=0"))
        elif kind == "file":
            # The host's null node, read-only: chmod/chown on the mask fail (EROFS).
            ops += [_mnt(rel, "/dev/null", flags=MS_BIND),
                    _mnt(rel, flags=MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NOEXEC)]
    if (config.get("root") or {}).get("readonly"):
        ops.append(MountOp(OP_MOUNT, rootfs, flags=MS_REMOUNT | MS_BIND | MS_RDONLY))
    ops.append(MountOp(OP_PIVOT, rootfs))
    return ops
