"""linux.seccomp -> a BPF program, compiled by libseccomp (through ctypes)
and handed to C as bytes (csrc/seccomp.c sbx_seccomp_install_prog).

Why libseccomp rather than our own compiler: Docker's default profile (what
containerd and podman send) has argument conditions on 64-bit values, masked
comparisons, per-arch syscall tables and x32/i386 aliasing; libseccomp is the
compiler runc and crun use, so a profile means here exactly what it means
there. It is loaded only when a config has a seccomp section.
"""
from __future__ import annotations

import ctypes
import os

from .state import OciError

ACTIONS = {"SCMP_ACT_KILL": 0x00000000, "SCMP_ACT_KILL_THREAD": 0x00000000,
           "SCMP_ACT_KILL_PROCESS": 0x80000000, "SCMP_ACT_TRAP": 0x00030000,
           "SCMP_ACT_ERRNO": 0x00050000, "SCMP_ACT_TRACE": 0x7ff00000,
           "SCMP_ACT_LOG": 0x7ffc0000, "SCMP_ACT_ALLOW": 0x7fff0000}
OPS = {"SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4,
       "SCMP_CMP_GE": 5, "SCMP_CMP_GT": 6, "SCMP_CMP_MASKED_EQ": 7}
ARCHES = {"SCMP_ARCH_X86": "x86", "SCMP_ARCH_X86_64": "x86_64", "SCMP_ARCH_X32": "x32"}
EPERM = 1


class _Arg(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def _lib():
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError:
        raise OciError("linux.seccomp needs libseccomp (libseccomp2), which is not installed") from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
    lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_Arg)]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


def _action(name: str | None, errno_ret, default_errno) -> int:
    if name not in ACTIONS:
        raise OciError(f"seccomp: unsupported action {name!r}")
    act = ACTIONS[name]
    if name == "SCMP_ACT_ERRNO":
        e = errno_ret if errno_ret is not None else (default_errno if default_errno is not None else EPERM)
        act |= int(e) & 0xFFFF
    elif name == "SCMP_ACT_TRACE":
        act |= int(errno_ret or default_errno or EPERM) & 0xFFFF
    return act


def compile_profile(sc: dict) -> bytes:
    """The profile as struct sock_filter[] bytes."""
    lib = _lib()
    default_errno = sc.get("defaultErrnoRet")
    default = _action(sc.get("defaultAction"), default_errno, None)
    ctx = lib.seccomp_init(default)
    if not ctx:
        raise OciError("seccomp: seccomp_init failed")
    try:
        for a in sc.get("architectures") or ():
            if a not in ARCHES:
                continue  # not this machine's family: nothing to filter there
            tok = lib.seccomp_arch_resolve_name(ARCHES[a].encode())
            r = lib.seccomp_arch_add(ctx, tok)
            if r < 0 and r != -17:  # EEXIST: the native arch is there already
                raise OciError(f"seccomp: cannot add arch {a}: {os.strerror(-r)}")
        for rule in sc.get("syscalls") or ():
            act = _action(rule.get("action"), rule.get("errnoRet"), default_errno)
            if act == default:
                continue
            args = rule.get("args") or []
            conds = [_Arg(a["index"], OPS[a["op"]], a.get("value", 0), a.get("valueTwo", 0))
                     for a in args]
            # libseccomp takes one comparison per argument in a rule; several on
            # the same argument become separate rules (OR), as runc does.
            idx = [a["index"] for a in args]
            groups = [conds] if len(set(idx)) == len(idx) else [[c] for c in conds]
            for name in rule.get("names") or ([rule["name"]] if rule.get("name") else []):
                nr = lib.seccomp_syscall_resolve_name(name.encode())
                if nr < 0:
                    continue  # unknown on this kernel/arch: ignored, as runc
                for g in groups:
                    arr = (_Arg * max(len(g), 1))(*g)
                    r = lib.seccomp_rule_add_array(ctx, act, nr, len(g), arr)
                    if r < 0:
                        raise OciError(f"seccomp: rule for {name}: {os.strerror(-r)}")
        fd = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
        try:
            r = lib.seccomp_export_bpf(ctx, fd)
            if r < 0:
                raise OciError(f"seccomp: export: {os.strerror(-r)}")
            os.lseek(fd, 0, os.SEEK_SET)
            out = b""
            while chunk := os.read(fd, 65536):
                out += chunk
        finally:
            os.close(fd)
        return out
    except KeyError as e:
        raise OciError(f"seccomp: unknown operator or missing field {e}") from None
    finally:
        lib.seccomp_release(ctx)
