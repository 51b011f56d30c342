"""Reading a file a sandbox (or an image) controls, from the root runtime.

SPEC §9: everything below a sandbox's root is hostile — a path component may
be a symlink to the host's /etc or "../../..", the file a FIFO (an open that
blocks the event loop), a device (/dev/zero: a read that never ends), or 200
MB. So a read here:

  * resolves every component confined to the sandbox's root (csrc/fs.c:
    openat2 RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS, and RESOLVE_NO_XDEV: the
    files we read live on the root filesystem itself, never behind /proc,
    /sys, /dev or another mount), with O_PATH, which opens nothing: no FIFO
    open, no device open, no side effect;
  * fstat()s that O_PATH fd: only a regular file no larger than the bound;
  * reopens that same inode through /proc/self/fd/N (the runtime's own
    procfs, so the path is ours) with O_RDONLY | O_NONBLOCK | O_NOCTTY and
    reads at most bound + 1 bytes — a file that grew past the bound is
    refused, not truncated.

Symlinks are followed, but only inside the root: `etc/passwd -> ../usr/lib/
passwd` works, `-> /etc/shadow` means the sandbox's own /etc/shadow.
"""
from __future__ import annotations

import errno
import os
import stat

from . import _native_api as native

RESOLVE_NO_XDEV = 0x01
MAX_BYTES = 1 << 20


class UnsafeFile(OSError):
    """The path exists but is not something the runtime will read (not a
    regular file, or larger than the bound)."""


def open_dir(path: str) -> int:
    """An O_PATH fd of a directory the runtime chose (a rootfs=DIR), to
    resolve hostile paths below it with read_in_root()."""
    return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def open_proc_root(pid: int, alive) -> int:
    """An O_PATH fd of the root directory of process `pid` (its mount
    namespace's root, through the host's /proc). `alive()` is asked after the
    open: True means the process we started still exists (not reaped), so the
    pid was not reused and the fd is its root. ProcessLookupError otherwise."""
    fd = os.open(f"/proc/{int(pid)}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    if not alive():
        os.close(fd)
        raise ProcessLookupError(errno.ESRCH, f"process {pid} is gone")
    return fd


def read_in_root(rootfd: int, path: str, limit: int = MAX_BYTES) -> bytes:
    """The content of `path` resolved confined to `rootfd`. FileNotFoundError
    and other OSErrors when it cannot be opened; UnsafeFile when it is not a
    regular file of at most `limit` bytes. Never blocks on a FIFO or device,
    never reads more than limit + 1 bytes."""
    pfd = native.open_in_root(rootfd, path, os.O_PATH, RESOLVE_NO_XDEV)
    try:
        st = os.fstat(pfd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFile(errno.EINVAL, "not a regular file", path)
        if st.st_size > limit:
            raise UnsafeFile(errno.EFBIG, f"larger than {limit} bytes", path)
        fd = os.open(f"/proc/self/fd/{pfd}",
                     os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    finally:
        os.close(pfd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):   # the same inode; belt and braces
            raise UnsafeFile(errno.EINVAL, "not a regular file", path)
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, limit + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    finally:
        os.close(fd)
    if total > limit:
        raise UnsafeFile(errno.EFBIG, f"larger than {limit} bytes", path)
    return b"".join(chunks)


def read_text_or_empty(rootfd: int, path: str, limit: int = MAX_BYTES, log=None) -> str:
    """read_in_root() decoded (UTF-8, bad bytes replaced); "" when the file is
    missing or refused. A refusal is logged: the sandbox tried something."""
    try:
        data = read_in_root(rootfd, path, limit)
    except FileNotFoundError:
        return ""
    except OSError as e:
        if log is not None:
            log.warning("safefs.refused", path=path, error=e.strerror or str(e))
        return ""
    return data.decode("utf-8", errors="replace")
