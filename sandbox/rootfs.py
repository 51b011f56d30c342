"""The root filesystem as a plan: a flat list of mount ops built and checked
here, executed in order by csrc/mount.c inside the sandbox's fresh mount
namespace (whose propagation is already private). Nothing here touches the
kernel, so a plan can be inspected in tests.

Two sources (SPEC §8): the embedded default — a tmpfs root holding read-only
binds of the host's /usr (+ /bin, /lib*, /sbin as on the host) and a generated
/etc — or a directory used as the read-only lower layer of an overlay whose
upper layer lives on a tmpfs of the sandbox's own mount namespace, so it is
discarded with the namespace.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ._native_api import OP_FILE, OP_MKDIR, OP_MOUNT, OP_PIVOT, OP_SYMLINK, MountOp

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC = 32, 4096, 16384

HOST_TOP = ("usr", "bin", "lib", "lib32", "lib64", "libx32", "sbin")
# Host /etc entries programs need to run at all (dynamic loader cache, Debian
# alternatives symlinks, CA bundle, time zone); all read-only.
HOST_ETC = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "ssl",
            "ca-certificates", "localtime")
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
PROC_MASKED_FILES = ("kcore", "keys", "timer_list", "sched_debug", "latency_stats")
PROC_MASKED_DIRS = ("acpi", "scsi")
PROC_READONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")
CERT_DIRS = ("etc/sandbox/certs", "etc/cloudflare/certs")
WRITABLE = (("tmp", 0o1777), ("root", 0o700), ("workspace", 0o755))


@dataclass(frozen=True)
class EtcFiles:
    hostname: str
    nameserver: str

    def files(self, default_users: bool) -> dict[str, str]:
        out = {
            "hostname": f"{self.hostname}\n",
            "hosts": f"127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t{self.hostname}\n",
            "resolv.conf": f"nameserver {self.nameserver}\n",
        }
        if default_users:
            out["passwd"] = ("root:x:0:0:root:/root:/bin/sh\n"
                             "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
            out["group"] = "root:x:0:\nnogroup:x:65534:\n"
            out["nsswitch.conf"] = "passwd: files\ngroup: files\nhosts: files dns\n"
        return out


def _bind_ro(src: str, dst: str, is_dir: bool) -> list[MountOp]:
    target = MountOp(OP_MKDIR, dst, mode=0o755) if is_dir else MountOp(OP_FILE, dst, data=b"", mode=0o644)
    return [
        target,
        MountOp(OP_MOUNT, dst, src=src, flags=MS_BIND | MS_REC),
        # A bind mount ignores MS_RDONLY on creation: read-only takes a remount.
        MountOp(OP_MOUNT, dst, flags=MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV),
    ]


def _kernel_views(root: str) -> list[MountOp]:
    """/proc (fresh, for the new PID namespace, with the dangerous parts masked
    or read-only), /sys (read-only), and a minimal /dev."""
    p = f"{root}/proc"
    ops = [MountOp(OP_MKDIR, p, mode=0o555),
           MountOp(OP_MOUNT, p, src="proc", fstype="proc", flags=MS_NOSUID | MS_NODEV | MS_NOEXEC)]
    for name in PROC_READONLY:
        if not os.path.exists(f"/proc/{name}"):
            continue
        d = f"{p}/{name}"
        ops += [MountOp(OP_MOUNT, d, src=d, flags=MS_BIND | MS_REC),
                MountOp(OP_MOUNT, d, flags=MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)]
    for name in PROC_MASKED_FILES:
        if os.path.exists(f"/proc/{name}"):
            ops.append(MountOp(OP_MOUNT, f"{p}/{name}", src="/dev/null", flags=MS_BIND))
    for name in PROC_MASKED_DIRS:
        if os.path.isdir(f"/proc/{name}"):
            ops.append(MountOp(OP_MOUNT, f"{p}/{name}", src="tmpfs", fstype="tmpfs",
                               flags=MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, data="size=0"))
    s = f"{root}/sys"
    ops += [MountOp(OP_MKDIR, s, mode=0o555),
            MountOp(OP_MOUNT, s, src="sysfs", fstype="sysfs",
                    flags=MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)]
    d = f"{root}/dev"
    ops += [MountOp(OP_MKDIR, d, mode=0o755),
            MountOp(OP_MOUNT, d, src="tmpfs", fstype="tmpfs", flags=MS_NOSUID | MS_NOEXEC,
                    data="mode=0755,size=512k")]
    for node in DEV_NODES:
        ops += [MountOp(OP_FILE, f"{d}/{node}", data=b"", mode=0o666),
                MountOp(OP_MOUNT, f"{d}/{node}", src=f"/dev/{node}", flags=MS_BIND)]
    ops += [MountOp(OP_MKDIR, f"{d}/pts", mode=0o755),
            MountOp(OP_MOUNT, f"{d}/pts", src="devpts", fstype="devpts", flags=MS_NOSUID | MS_NOEXEC,
                    data="newinstance,ptmxmode=0666,mode=0620"),
            MountOp(OP_SYMLINK, f"{d}/ptmx", src="pts/ptmx"),
            MountOp(OP_MKDIR, f"{d}/shm", mode=0o1777),
            MountOp(OP_MOUNT, f"{d}/shm", src="shm", fstype="tmpfs", flags=MS_NOSUID | MS_NODEV,
                    data="mode=1777,size=64m"),
            MountOp(OP_SYMLINK, f"{d}/fd", src="/proc/self/fd"),
            MountOp(OP_SYMLINK, f"{d}/stdin", src="/proc/self/fd/0"),
            MountOp(OP_SYMLINK, f"{d}/stdout", src="/proc/self/fd/1"),
            MountOp(OP_SYMLINK, f"{d}/stderr", src="/proc/self/fd/2")]
    return ops


def default_plan(root: str, etc: EtcFiles, extra: list[tuple[str, bytes]] = ()) -> list[MountOp]:
    ops = [MountOp(OP_MOUNT, root, src="sandbox-root", fstype="tmpfs", flags=MS_NOSUID | MS_NODEV,
                   data="mode=0755,size=4m")]
    for top in HOST_TOP:
        host = f"/{top}"
        if os.path.islink(host):
            ops.append(MountOp(OP_SYMLINK, f"{root}/{top}", src=os.readlink(host)))
        elif os.path.isdir(host):
            ops += _bind_ro(host, f"{root}/{top}", True)
    ops.append(MountOp(OP_MKDIR, f"{root}/etc", mode=0o755))
    for name, text in etc.files(default_users=True).items():
        ops.append(MountOp(OP_FILE, f"{root}/etc/{name}", data=text.encode(), mode=0o644))
    for name in HOST_ETC:
        host = f"/etc/{name}"
        if os.path.islink(host):
            ops.append(MountOp(OP_SYMLINK, f"{root}/etc/{name}", src=os.readlink(host)))
        elif os.path.exists(host):
            ops += _bind_ro(host, f"{root}/etc/{name}", os.path.isdir(host))
    ops += _cert_dirs(root)
    ops += [MountOp(OP_FILE, f"{root}/{rel}", data=data, mode=0o644) for rel, data in extra]
    ops += _kernel_views(root)
    for name, mode in WRITABLE:
        ops += [MountOp(OP_MKDIR, f"{root}/{name}", mode=mode),
                MountOp(OP_MOUNT, f"{root}/{name}", src="tmpfs", fstype="tmpfs",
                        flags=MS_NOSUID | MS_NODEV, data=f"mode={mode:o}")]
    # The root tmpfs itself (and so the generated /etc) becomes read-only once
    # every mount point on it exists.
    ops.append(MountOp(OP_MOUNT, root, flags=MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV))
    ops.append(MountOp(OP_PIVOT, root))
    return ops


def _cert_dirs(root: str) -> list[MountOp]:
    """Small writable tmpfs dirs where the runtime drops the HTTPS CA
    certificate, also after start (through /proc/PID/root)."""
    ops = []
    for rel in CERT_DIRS:
        parts = rel.split("/")
        for i in range(1, len(parts) + 1):
            ops.append(MountOp(OP_MKDIR, f"{root}/{'/'.join(parts[:i])}", mode=0o755))
        ops.append(MountOp(OP_MOUNT, f"{root}/{rel}", src="tmpfs", fstype="tmpfs",
                           flags=MS_NOSUID | MS_NODEV | MS_NOEXEC, data="mode=0755,size=64k"))
    return ops


def dir_plan(root: str, scratch: str, lower: str, etc: EtcFiles,
             extra: list[tuple[str, bytes]] = ()) -> list[MountOp]:
    ops = [MountOp(OP_MOUNT, scratch, src="sandbox-upper", fstype="tmpfs", flags=MS_NOSUID | MS_NODEV,
                   data="mode=0755"),
           MountOp(OP_MKDIR, f"{scratch}/upper", mode=0o755),
           MountOp(OP_MKDIR, f"{scratch}/work", mode=0o755),
           MountOp(OP_MOUNT, root, src="overlay", fstype="overlay", flags=MS_NOSUID,
                   data=f"lowerdir={lower},upperdir={scratch}/upper,workdir={scratch}/work"),
           MountOp(OP_MKDIR, f"{root}/etc", mode=0o755)]
    for name, text in etc.files(default_users=False).items():
        ops.append(MountOp(OP_FILE, f"{root}/etc/{name}", data=text.encode(), mode=0o644))
    ops += _cert_dirs(root)
    ops += [MountOp(OP_FILE, f"{root}/{rel}", data=data, mode=0o644) for rel, data in extra]
    ops += _kernel_views(root)
    ops.append(MountOp(OP_PIVOT, root))
    return ops


def check_rootfs(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"rootfs must be a path, got {type(path).__name__}")
    p = os.path.abspath(os.fspath(path))
    if not os.path.isdir(p):
        raise ValueError(f"rootfs {p!r} is not a directory")
    if any(c in p for c in ",:\0"):
        raise ValueError(f"rootfs {p!r} contains a character overlayfs cannot take (',', ':')")
    return p
