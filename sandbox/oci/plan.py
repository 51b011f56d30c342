"""config.json -> what sbx_start takes: the mount plan (mounts.py), the
OciPlan (namespaces, identity, capabilities, rlimits, sysctl, seccomp) and
sbx-init's argv. Validated once here, with runc's wording where it has one.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .. import _native_api as native
from . import mounts
from .state import OciError

CAPS = ["CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID",
        "SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN",
        "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE",
        "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME",
        "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
        "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ",
        "PERFMON", "BPF", "CHECKPOINT_RESTORE"]
CAP_NUM = {f"CAP_{n}": i for i, n in enumerate(CAPS)}
NS = {"pid": 0x20000000, "network": 0x40000000, "mount": 0x00020000, "ipc": 0x08000000,
      "uts": 0x04000000, "user": 0x10000000, "cgroup": 0x02000000, "time": 0x00000080}
RLIMITS = {"RLIMIT_CPU": 0, "RLIMIT_FSIZE": 1, "RLIMIT_DATA": 2, "RLIMIT_STACK": 3,
           "RLIMIT_CORE": 4, "RLIMIT_RSS": 5, "RLIMIT_NPROC": 6, "RLIMIT_NOFILE": 7,
           "RLIMIT_MEMLOCK": 8, "RLIMIT_AS": 9, "RLIMIT_LOCKS": 10, "RLIMIT_SIGPENDING": 11,
           "RLIMIT_MSGQUEUE": 12, "RLIMIT_NICE": 13, "RLIMIT_RTPRIO": 14, "RLIMIT_RTTIME": 15}
# sysctls valid only in a namespace of their own, as runc checks.
IPC_SYSCTLS = ("kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.sem", "kernel.shmall",
               "kernel.shmmax", "kernel.shmmni", "kernel.shm_rmid_forced")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def load_config(bundle: str) -> dict:
    path = os.path.join(bundle, "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise OciError(f"JSON specification file config.json not found") from None
    except (OSError, ValueError) as e:
        raise OciError(f"cannot read {path}: {e}") from None
    if not isinstance(cfg, dict):
        raise OciError("config.json: not an object")
    v = cfg.get("ociVersion")
    if not isinstance(v, str) or not v.startswith("1."):
        raise OciError(f"config.json: unsupported ociVersion {v!r}")
    return cfg


def caps_mask(names, what: str) -> int:
    m = 0
    for n in names or ():
        if n not in CAP_NUM:
            raise OciError(f"unknown capability {n!r} in {what}")
        m |= 1 << CAP_NUM[n]
    return m


def cap_names(mask: int) -> list[str]:
    return [f"CAP_{n}" for i, n in enumerate(CAPS) if mask >> i & 1]


@dataclass
class Process:
    args: list[str]
    env: list[str]
    cwd: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    umask: int
    caps: tuple[int, int, int, int, int]
    rlimits: tuple[tuple[int, int, int], ...]
    no_new_privs: bool
    terminal: bool
    oom_score_adj: int | None

    @property
    def path(self) -> str:
        for e in self.env:
            if e.startswith("PATH="):
                return e[5:]
        return DEFAULT_PATH


def process(p: dict | None) -> Process:
    if not isinstance(p, dict):
        raise OciError("process: missing")
    args = p.get("args")
    if not args or not all(isinstance(a, str) for a in args):
        raise OciError("args must not be empty")
    cwd = p.get("cwd") or "/"
    if not cwd.startswith("/"):
        raise OciError(f"cwd {cwd!r} is not an absolute path")
    user = p.get("user") or {}
    caps = p.get("capabilities") or {}
    sets = tuple(caps_mask(caps.get(k), k) for k in
                 ("bounding", "effective", "permitted", "inheritable", "ambient"))
    rl = []
    for r in p.get("rlimits") or ():
        if r.get("type") not in RLIMITS:
            raise OciError(f"unknown rlimit type {r.get('type')!r}")
        rl.append((RLIMITS[r["type"]], int(r.get("soft", 0)), int(r.get("hard", 0))))
    umask = user.get("umask")
    return Process(args=list(args), env=[e for e in p.get("env") or () if isinstance(e, str)],
                   cwd=cwd, uid=int(user.get("uid", 0)), gid=int(user.get("gid", 0)),
                   groups=tuple(int(g) for g in user.get("additionalGids") or ()),
                   umask=-1 if umask is None else int(umask), caps=sets, rlimits=tuple(rl),
                   no_new_privs=bool(p.get("noNewPrivileges")), terminal=bool(p.get("terminal")),
                   oom_score_adj=p.get("oomScoreAdj"))


@dataclass
class Namespaces:
    clone: int
    paths: list[tuple[int, str]]   # (type, path) to join


def namespaces(linux: dict) -> Namespaces:
    clone, paths, seen = 0, [], set()
    for n in linux.get("namespaces") or ():
        t = n.get("type")
        if t not in NS:
            raise OciError(f"namespace type {t!r} is not supported")
        if t in seen:
            raise OciError(f"malformed spec file: duplicated ns {t!r}")
        seen.add(t)
        if t in ("user", "time"):
            raise OciError(f"{t} namespaces are not supported by sandbox-oci yet")
        if n.get("path"):
            paths.append((NS[t], n["path"]))
        else:
            clone |= NS[t]
    if not clone & NS["mount"]:
        raise OciError("a mount namespace of its own is required (pivot_root)")
    return Namespaces(clone, paths)


def validate(cfg: dict, ns: Namespaces) -> None:
    linux = cfg.get("linux") or {}
    own = lambda t: bool(ns.clone & NS[t]) or any(x == NS[t] for x, _ in ns.paths)  # noqa: E731
    if cfg.get("hostname") and not own("uts"):
        raise OciError("unable to set hostname without a private UTS namespace")
    if cfg.get("domainname") and not own("uts"):
        raise OciError("unable to set domainname without a private UTS namespace")
    for key in linux.get("sysctl") or {}:
        if key in IPC_SYSCTLS or key.startswith("fs.mqueue."):
            if not own("ipc"):
                raise OciError(f"sysctl {key!r} is not allowed in the host's ipc namespace")
        elif key.startswith("net."):
            if not own("network"):
                raise OciError(f"sysctl {key!r} is not allowed in the host's network namespace")
        elif key in ("kernel.domainname", "kernel.hostname"):
            if not own("uts"):
                raise OciError(f"sysctl {key!r} is not allowed in the host's uts namespace")
        else:
            raise OciError(f"sysctl {key!r} is not in a separate kernel namespace")
    if linux.get("uidMappings") or linux.get("gidMappings"):
        raise OciError("user namespaces (uidMappings/gidMappings) are not supported by sandbox-oci yet")


def rootfs_of(cfg: dict, bundle: str) -> str:
    root = (cfg.get("root") or {}).get("path")
    if not root:
        raise OciError("root.path is empty")
    path = os.path.realpath(os.path.join(bundle, root))
    if not os.path.isdir(path):
        raise OciError(f"rootfs ({path}) does not exist")
    return path


def oci_plan(cfg: dict, proc: Process, ns: Namespaces, joins: list[tuple[int, int]],
             keep_fd: int) -> native.OciPlan:
    linux = cfg.get("linux") or {}
    sc = linux.get("seccomp")
    bpf = None
    if sc:
        from .seccomp import compile_profile
        bpf = compile_profile(sc)
    sysctl = tuple(("/proc/sys/" + k.replace(".", "/"), str(v))
                   for k, v in (linux.get("sysctl") or {}).items())
    return native.OciPlan(clone_ns=ns.clone, joins=tuple(joins),
                          domainname=cfg.get("domainname") or None, rlimits=proc.rlimits,
                          sysctl=sysctl, uid=proc.uid, gid=proc.gid, groups=proc.groups,
                          umask=proc.umask, caps=proc.caps, no_new_privs=proc.no_new_privs,
                          seccomp=bpf, cwd=proc.cwd, keep_fd=keep_fd)


def cgroup_mount_ops(dirs: dict[str, str]):
    """For a `cgroup` mount: a tmpfs holding, per hierarchy, a bind of the
    container's own cgroup directory (host paths, trusted), as runc does."""
    def ops(dst: str, flags: int):
        out = [mounts._mnt(dst, "tmpfs", "tmpfs", mounts.MS_NOSUID | mounts.MS_NODEV | mounts.MS_NOEXEC,
                           "mode=755")]
        ro = flags & mounts.MS_RDONLY
        for name, d in dirs.items():
            sub = f"{dst}/{name}" if name else dst
            if name:
                out.append(native.MountOp(native.OP_MKDIR, sub, mode=0o755,
                                          at=native.AT_DST_IN_ROOT | native.AT_KEEP))
            out.append(mounts._mnt(sub, d, flags=mounts.MS_BIND))
            out.append(mounts._mnt(sub, flags=mounts.MS_REMOUNT | mounts.MS_BIND | mounts.MS_NOSUID
                                   | mounts.MS_NODEV | mounts.MS_NOEXEC | ro))
            if "," in name:
                for c in name.split(","):
                    out.append(native.MountOp(native.OP_SYMLINK, f"{dst}/{c}", src=name,
                                              at=native.AT_DST_IN_ROOT))
        if ro:
            out.append(mounts._mnt(dst, flags=mounts.MS_REMOUNT | mounts.MS_RDONLY | mounts.MS_NOSUID
                                   | mounts.MS_NODEV | mounts.MS_NOEXEC))
        return out
    return ops
