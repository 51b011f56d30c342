"""ctypes bindings to the few libc calls Python 3.11 lacks, and errno plumbing.

Python 3.11 has no ``os.setns``/``os.unshare`` (3.12 added them) and never had
``mount``/``umount2``.  Each wrapper checks the return value and raises
``OSError`` carrying the real errno, so callers can match on it (``EINVAL`` for
"not a mount point", ``ENOENT``...) instead of parsing strings.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from typing import Iterator

from pyroute2.netlink.exceptions import NetlinkError

# Namespace flags (linux/sched.h).
CLONE_NEWNET = 0x40000000

# Mount flags (linux/mount.h).
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SHARED = 1 << 20

# umount2 flags.
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

# use_errno=True makes ctypes save errno right after each call, so another
# thread's failing call cannot overwrite it before we read it.
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

_libc.unshare.argtypes = [ctypes.c_int]
_libc.unshare.restype = ctypes.c_int
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_libc.mount.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int


def _check(ret: int, what: str, path: str | None = None) -> None:
    if ret == -1:
        err = ctypes.get_errno()
        if path is None:
            raise OSError(err, f"{what}: {os.strerror(err)}")
        raise OSError(err, f"{what}: {os.strerror(err)}", path)


def _b(path: str | os.PathLike | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def unshare(flags: int) -> None:
    """unshare(2) for the calling *thread* (CLONE_NEWNET affects only it)."""
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    """setns(2) for the calling thread."""
    _check(_libc.setns(fd, nstype), "setns")


def mount(
    source: str | os.PathLike | None,
    target: str | os.PathLike,
    fstype: str | None = None,
    flags: int = 0,
) -> None:
    """mount(2) without filesystem data."""
    _check(
        _libc.mount(_b(source), _b(target), _b(fstype), flags, None),
        "mount",
        os.fspath(target),
    )


def umount2(target: str | os.PathLike, flags: int = 0) -> None:
    """umount2(2)."""
    _check(_libc.umount2(_b(target), flags), "umount2", os.fspath(target))


@contextlib.contextmanager
def netlink_errors(what: str) -> Iterator[None]:
    """Turn pyroute2's ``NetlinkError`` (a plain Exception) into ``OSError``.

    Callers then handle kernel failures one way, by errno, whether they came
    from a syscall or from netlink (EEXIST for a taken interface name...).
    """
    try:
        yield
    except NetlinkError as exc:
        code = exc.code or 0
        raise OSError(code, f"{what}: {os.strerror(code) if code else exc}") from exc
