"""The root filesystem as a plan: a flat list of mount ops built and checked
here, executed in order by csrc/mount.c inside the sandbox's fresh mount
namespace (whose propagation is already private). Nothing here touches the
kernel, so a plan can be inspected in tests.

Two sources (SPEC §8): the embedded default — a tmpfs root holding read-only
binds of the host's /usr (+ /bin, /lib*, /sbin as on the host) and a generated
/etc — or a directory used as the read-only lower layer of an overlay whose
upper layer lives on a tmpfs of the sandbox's own mount namespace, so it is
discarded with the namespace.

Trust (SPEC §9): what is below the new root is hostile (an image's `etc` may
be a symlink to the host's /etc). So every path below the root is written
root-relative ("/etc/hosts") with `at=AT_DST_IN_ROOT`, and mount.c resolves it
confined to the root opened by the OP_ROOT op (openat2 RESOLVE_IN_ROOT). Only
paths the runtime chose are absolute host paths: the root and scratch mount
points and the sources of binds (host /usr, the runtime's cert dir).

Nothing inside may change a host inode: /dev nodes are made with mknod on the
sandbox's own tmpfs, /proc masks bind that /dev/null read-only, and every bind
of a host object is remounted read-only. Files the runtime provides (/etc
entries, the HTTPS CA) are on mounts the sandbox cannot write.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ._native_api import (AT_DST_IN_ROOT, AT_REPLACE, AT_SRC_IN_ROOT, OP_FILE, OP_MKDIR, OP_MKNOD,
                          OP_MOUNT, OP_PIVOT, OP_ROOT, OP_SYMLINK, MountOp)
from .errors import SandboxError

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC = 32, 4096, 16384
RO_BIND = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV

HOST_TOP = ("usr", "bin", "lib", "lib32", "lib64", "libx32", "sbin")
# SPEC §10 "Default /etc": the only host /etc entries a default sandbox sees,
# read-only (a trailing * is a prefix). Enough for the dynamic loader, Debian's
# alternatives, TLS verification, getaddrinfo(host, "http") and the time zone;
# never ssl/private, shadow, ssh, ...
HOST_ETC = ("ssl/certs", "ca-certificates*", "services", "protocols", "ld.so.cache",
            "ld.so.conf*", "alternatives", "localtime", "mime.types")
# Character devices (Documentation/admin-guide/devices.txt), made on the
# sandbox's own /dev tmpfs.
DEV_NODES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
             ("urandom", 1, 9), ("tty", 5, 0))
PROC_MASKED_FILES = ("kcore", "keys", "timer_list", "sched_debug", "latency_stats")
PROC_MASKED_DIRS = ("acpi", "scsi")
PROC_READONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")
# (subdirectory of the sandbox's cert dir on the host, where it shows inside).
CERT_MOUNTS = (("sandbox", "/etc/sandbox/certs"), ("cloudflare", "/etc/cloudflare/certs"))
WRITABLE = (("tmp", 0o1777), ("root", 0o700), ("workspace", 0o755))
# overlayfs splits its options on ',' and ':' and unescapes '\'.
_OVERLAY_BAD = ",:\\\0"


@dataclass(frozen=True)
class EtcFiles:
    hostname: str
    nameserver: str
    machine_id: str = "0" * 32

    def files(self, default_users: bool) -> dict[str, str]:
        out = {
            "hostname": f"{self.hostname}\n",
            "hosts": f"127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t{self.hostname}\n",
            "resolv.conf": f"nameserver {self.nameserver}\n",
        }
        if default_users:
            out["passwd"] = ("root:x:0:0:root:/root:/bin/sh\n"
                             "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
            out["group"] = "root:x:0:\nnobody:x:65534:\n"
            out["nsswitch.conf"] = ("passwd: files\ngroup: files\nshadow: files\n"
                                    "hosts: files dns\nnetworks: files\nprotocols: files\n"
                                    "services: files\nethers: files\nrpc: files\n")
            out["machine-id"] = f"{self.machine_id}\n"
        return out


# -- op builders: `rel` is a root-relative path ("/etc/hosts") ------------------
def _mkdir(rel: str, mode: int = 0o755, replace: bool = True) -> MountOp:
    """replace: only a real directory will do (mount points); otherwise a
    symlink resolving to a directory inside the root is kept."""
    return MountOp(OP_MKDIR, rel, mode=mode, at=AT_DST_IN_ROOT | (AT_REPLACE if replace else 0))


def _file(rel: str, data: bytes = b"", mode: int = 0o644) -> MountOp:
    return MountOp(OP_FILE, rel, data=data, mode=mode, at=AT_DST_IN_ROOT)


def _symlink(rel: str, target: str) -> MountOp:
    return MountOp(OP_SYMLINK, rel, src=target, at=AT_DST_IN_ROOT)


def _mount(rel: str, src: str, fstype: str | None = None, flags: int = 0, data: str | None = None,
           src_in_root: bool = False) -> MountOp:
    at = AT_DST_IN_ROOT | (AT_SRC_IN_ROOT if src_in_root else 0)
    return MountOp(OP_MOUNT, rel, src=src, fstype=fstype, flags=flags, data=data, at=at)


def _remount(rel: str, flags: int) -> MountOp:
    return MountOp(OP_MOUNT, rel, flags=flags, at=AT_DST_IN_ROOT)


def _parents(rel: str) -> list[MountOp]:
    """mkdir of every ancestor of rel below /etc (which exists already)."""
    parts = rel.strip("/").split("/")[:-1]
    return [_mkdir("/" + "/".join(parts[:i])) for i in range(2, len(parts) + 1)]


def _bind_ro(src: str, rel: str, is_dir: bool, flags: int = RO_BIND) -> list[MountOp]:
    """A read-only bind of a trusted host object. Not recursive: a single
    remount would leave the submounts of a recursive bind writable."""
    target = _mkdir(rel) if is_dir else _file(rel)
    # A bind mount ignores MS_RDONLY on creation: read-only takes a remount.
    return [target, _mount(rel, src, flags=MS_BIND), _remount(rel, flags)]


def _host_etc() -> list[str]:
    """The HOST_ETC allowlist expanded against the host's /etc (trusted)."""
    try:
        names = os.listdir("/etc")
    except OSError:
        names = []
    out = []
    for pat in HOST_ETC:
        if pat.endswith("*"):
            out += sorted(n for n in names if n.startswith(pat[:-1]))
        else:
            out.append(pat)
    return out


def _etc_from_host() -> list[MountOp]:
    ops = []
    for name in _host_etc():
        host, rel = f"/etc/{name}", f"/etc/{name}"
        if os.path.islink(host):
            ops += _parents(rel) + [_symlink(rel, os.readlink(host))]
        elif os.path.isdir(host) or os.path.isfile(host):
            ops += _parents(rel) + _bind_ro(host, rel, os.path.isdir(host))
    return ops


def _cert_dirs(certs: str | None) -> list[MountOp]:
    """Read-only binds of the runtime's per-sandbox cert dir on the host: the
    runtime writes the CA there (also after start) and never touches a path
    inside the sandbox; the sandbox cannot write it."""
    if certs is None:
        return []
    ops = []
    for sub, rel in CERT_MOUNTS:
        ops += _parents(rel) + _bind_ro(os.path.join(certs, sub), rel, True,
                                        RO_BIND | MS_NOEXEC)
    return ops


def _kernel_views() -> list[MountOp]:
    """A minimal /dev (first: the /proc masks bind its null), /proc (fresh,
    for the new PID namespace, the dangerous parts masked or read-only) and
    /sys (read-only)."""
    ops = [_mkdir("/dev"),
           _mount("/dev", "tmpfs", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=512k")]
    for name, major, minor in DEV_NODES:
        ops.append(MountOp(OP_MKNOD, f"/dev/{name}", flags=os.makedev(major, minor), mode=0o666,
                           at=AT_DST_IN_ROOT))
    ops += [_mkdir("/dev/pts"),
            _mount("/dev/pts", "devpts", "devpts", MS_NOSUID | MS_NOEXEC,
                   "newinstance,ptmxmode=0666,mode=0620"),
            _symlink("/dev/ptmx", "pts/ptmx"),
            _mkdir("/dev/shm", 0o1777),
            _mount("/dev/shm", "shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=64m"),
            _symlink("/dev/fd", "/proc/self/fd"),
            _symlink("/dev/stdin", "/proc/self/fd/0"),
            _symlink("/dev/stdout", "/proc/self/fd/1"),
            _symlink("/dev/stderr", "/proc/self/fd/2")]
    ops += [_mkdir("/proc", 0o555),
            _mount("/proc", "proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)]
    for name in PROC_READONLY:
        if os.path.exists(f"/proc/{name}"):
            d = f"/proc/{name}"
            ops += [_mount(d, d, flags=MS_BIND, src_in_root=True),
                    _remount(d, RO_BIND | MS_NOEXEC)]
    for name in PROC_MASKED_FILES:
        if os.path.exists(f"/proc/{name}"):
            # The sandbox's own null node, read-only: reads give EOF, and
            # chmod/chown on the mask fail (EROFS) instead of reaching a host inode.
            f = f"/proc/{name}"
            ops += [_mount(f, "/dev/null", flags=MS_BIND, src_in_root=True),
                    _remount(f, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NOEXEC)]
    for name in PROC_MASKED_DIRS:
        if os.path.isdir(f"/proc/{name}"):
            ops.append(_mount(f"/proc/{name}", "tmpfs", "tmpfs",
                              MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=0"))
    ops += [_mkdir("/sys", 0o555),
            _mount("/sys", "sysfs", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)]
    return ops


def default_plan(root: str, etc: EtcFiles, certs: str | None = None) -> list[MountOp]:
    ops = [MountOp(OP_MOUNT, root, src="sandbox-root", fstype="tmpfs", flags=MS_NOSUID | MS_NODEV,
                   data="mode=0755,size=4m"),
           MountOp(OP_ROOT, root)]
    for top in HOST_TOP:
        host = f"/{top}"
        if os.path.islink(host):
            ops.append(_symlink(f"/{top}", os.readlink(host)))
        elif os.path.isdir(host):
            ops += _bind_ro(host, f"/{top}", True)
    ops.append(_mkdir("/etc"))
    for name, text in etc.files(default_users=True).items():
        ops.append(_file(f"/etc/{name}", text.encode()))
    ops += _etc_from_host()
    ops += _cert_dirs(certs)
    ops += _kernel_views()
    for name, mode in WRITABLE:
        ops += [_mkdir(f"/{name}", mode),
                _mount(f"/{name}", "tmpfs", "tmpfs", MS_NOSUID | MS_NODEV, f"mode={mode:o}")]
    # The root tmpfs itself (and so the generated /etc) becomes read-only once
    # every mount point on it exists.
    ops.append(MountOp(OP_MOUNT, root, flags=MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV))
    ops.append(MountOp(OP_PIVOT, root))
    return ops


def dir_plan(root: str, scratch: str, lower: str, etc: EtcFiles,
             certs: str | None = None) -> list[MountOp]:
    for what, p in (("rootfs", lower), ("state dir", scratch)):
        if any(c in p for c in _OVERLAY_BAD):
            raise SandboxError(f"{what} path {p!r} contains a character overlayfs cannot take "
                               "(',', ':', '\\')")
    # The scratch tmpfs is fresh and ours (trusted paths): the overlay's upper
    # and work dirs, and the generated /etc files, bound read-only into the root.
    ops = [MountOp(OP_MOUNT, scratch, src="sandbox-upper", fstype="tmpfs", flags=MS_NOSUID | MS_NODEV,
                   data="mode=0755"),
           MountOp(OP_MKDIR, f"{scratch}/upper", mode=0o755),
           MountOp(OP_MKDIR, f"{scratch}/work", mode=0o755),
           MountOp(OP_MKDIR, f"{scratch}/etc", mode=0o755)]
    files = etc.files(default_users=False)
    for name, text in files.items():
        ops.append(MountOp(OP_FILE, f"{scratch}/etc/{name}", data=text.encode(), mode=0o644))
    ops += [MountOp(OP_MOUNT, root, src="overlay", fstype="overlay", flags=MS_NOSUID,
                    data=f"lowerdir={lower},upperdir={scratch}/upper,workdir={scratch}/work"),
            MountOp(OP_ROOT, root),
            # The image's own /etc stays writable; a symlink to a directory
            # inside the image is followed, anything else is replaced.
            _mkdir("/etc", replace=False)]
    for name in files:
        ops += _bind_ro(f"{scratch}/etc/{name}", f"/etc/{name}", False)
    ops += _cert_dirs(certs)
    ops += _kernel_views()
    ops.append(MountOp(OP_PIVOT, root))
    return ops


def check_rootfs(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"rootfs must be a path, got {type(path).__name__}")
    p = os.path.abspath(os.fspath(path))
    if any(c in p for c in _OVERLAY_BAD):
        raise ValueError(f"rootfs {p!r} contains a character overlayfs cannot take (',', ':', '\\')")
    if not os.path.isdir(p):
        raise ValueError(f"rootfs {p!r} is not a directory")
    return p
