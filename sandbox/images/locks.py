"""flock(2) files of the image store: what serializes two runtimes (two
processes, or two Runtime objects of one process: a lock belongs to an open
file description) sharing one store. A blocking wait runs in a thread, never
in the event loop; a waiter that is cancelled closes its fd, which drops the
lock the moment the thread gets it."""
from __future__ import annotations

import asyncio
import fcntl
import os


def _open(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)


def try_lock(path: str, shared: bool = False) -> int | None:
    """The fd holding the lock, or None when someone else holds it."""
    fd = _open(path)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


async def lock(path: str, shared: bool = False) -> int:
    fd = try_lock(path, shared)
    if fd is not None:
        return fd
    fd = _open(path)
    try:
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


def lock_blocking(path: str, shared: bool = False) -> int:
    fd = _open(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd
