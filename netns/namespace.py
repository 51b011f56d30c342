"""Network namespaces created in the host user namespace and pinned by a bind mount.

A namespace is made by a short-lived thread that ``unshare(CLONE_NEWNET)``s
(that moves only the thread), opens ``/proc/thread-self/ns/net`` and
bind-mounts it on ``<state_dir>/netns/<name>``.  The bind mount is there so a
garbage collector in another process can find (and unmount) the namespace of
a runtime that died; the fd is what we hand to the C core, which ``setns``es
the sandbox child into it.

Mount propagation of ``<state_dir>/netns``
------------------------------------------
We do what iproute2 does for ``/run/netns`` (it uses MS_SHARED, not private):
make the directory a mount point (a bind mount of itself) and mark it
``MS_SHARED``.  On a host whose ``/`` is private (like this one) that is a new
peer group of its own; on a systemd host, where the parent is already shared,
the bind joins the parent's peer group.  Either way every copy of our mounts
in another mount namespace is a peer or a slave of ours.

Why shared and not private?  Every mount namespace created while a sandbox
exists (each sandbox's own CLONE_NEWNS, but also any systemd service with
PrivateTmp=, ``unshare -m``...) starts with a *copy* of our nsfs bind mounts.
With a private mount those copies never learn about our ``umount`` and pin the
network namespace (and its memory) until that other mount namespace dies — a
leak we could neither see nor clean.  With a shared mount our ``umount``
(of each nsfs file, and finally of the directory) propagates to the copies,
so nothing of ours outlives its ``close()`` in any namespace.  Sandboxes gain
nothing from seeing them: their child makes its mounts private first and then
detaches the old root, so no copy survives inside a sandbox.

The directory mount is refcounted by the kernel: after unmounting a namespace
we try a *non-lazy* ``umount`` of the directory, which fails with EBUSY while
any other namespace is still mounted in it.  The last one out removes it, so
no mount is left once every namespace is gone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from typing import Any, Callable, Iterator, TypeVar

from . import _sys
from ._threads import run_in_thread

T = TypeVar("T")



@contextlib.contextmanager
def _dir_lock(directory: str) -> Iterator[None]:
    """Exclusive flock on the state dir (the parent of ``<state_dir>/netns``).

    Serialises "make the directory a mount" + "mount a namespace in it"
    against "unmount the directory if empty", across threads *and* processes
    sharing the state dir: without it, two runtimes could both see "not a
    mount point" and stack two bind mounts (iproute2 hit exactly this), or a
    closing namespace could unmount the directory under one being created.
    flock locks belong to the open file description, so separate opens in
    two threads of one process exclude each other too; a dead holder's lock
    is released by the kernel.
    """
    fd = os.open(os.path.dirname(directory), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)

_NAME_MAX = 200


def _check_name(name: str) -> None:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, not {type(name).__name__}")
    if (
        not name
        or len(name) > _NAME_MAX
        or name in (".", "..")
        or "/" in name
        or "\0" in name
    ):
        raise ValueError(f"name: invalid netns name {name!r}")


def netns_dir(state_dir: str | os.PathLike) -> str:
    """Directory holding the namespace bind mounts of a state dir."""
    return os.path.join(os.fspath(state_dir), "netns")


def _ensure_dir_mount(path: str) -> None:
    """Make ``path`` a shared mount point (see the module docstring).

    Like iproute2: try to mark it shared; EINVAL means it is not a mount point
    yet, so bind it onto itself first.  One or two syscalls when already done.
    """
    try:
        _sys.mount(None, path, None, _sys.MS_SHARED)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        _sys.mount(path, path, None, _sys.MS_BIND)
        _sys.mount(None, path, None, _sys.MS_SHARED)


def _release_dir_mount(path: str) -> None:
    """Unmount the directory mount if no namespace is mounted in it any more.

    Non-lazy on purpose: the kernel answers EBUSY while another bind mount (of
    this or another runtime sharing the state dir) sits inside, which is
    exactly the refcount we need.  EINVAL: not a mount point (already gone).
    """
    try:
        _sys.umount2(path, _sys.UMOUNT_NOFOLLOW)
    except OSError as exc:
        if exc.errno not in (errno.EBUSY, errno.EINVAL, errno.ENOENT):
            raise


def _unmount_file(path: str) -> None:
    # MNT_DETACH: a process that still has the nsfs file open must not make
    # teardown fail; the namespace dies when its last reference goes.
    try:
        _sys.umount2(path, _sys.MNT_DETACH | _sys.UMOUNT_NOFOLLOW)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOENT):
            raise


class NetNS:
    """One network namespace: owns its fd, its bind mount and the mount-point file.

    Create with ``NetNS.create(state_dir, name)``.  ``close()`` is idempotent,
    unmounts, unlinks and closes the fd (reverse of creation), keeps going past
    errors and raises the first one.
    """

    __slots__ = ("_fd", "_path", "_name", "__weakref__")

    def __init__(self, fd: int, path: str, name: str) -> None:
        self._fd = fd
        self._path = path
        self._name = name

    @classmethod
    def create(cls, state_dir: str | os.PathLike, name: str) -> "NetNS":
        _check_name(name)
        directory = netns_dir(state_dir)
        os.makedirs(directory, mode=0o755, exist_ok=True)
        path = os.path.join(directory, name)
        fd = run_in_thread(_create_in_thread, directory, path, name="netns-create")
        return cls(fd, path, name)

    @property
    def fd(self) -> int:
        """O_CLOEXEC fd of the namespace (for setns); -1 after close()."""
        return self._fd

    @property
    def path(self) -> str:
        """Path of the bind mount that pins the namespace."""
        return self._path

    @property
    def name(self) -> str:
        return self._name

    @property
    def closed(self) -> bool:
        return self._fd < 0 and not self._path

    def run_in(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in a fresh thread that joined this namespace.

        Returns its result or re-raises its exception.  Sockets created by
        ``fn`` belong to this namespace for life and can be used from any
        thread afterwards.
        """
        if self._fd >= 0:
            return run_in_thread(_enter_and_call, self._fd, fn, args, name="netns-run")
        if not self._path:
            raise ValueError(f"netns {self._name!r} is closed")
        fd = _open_pin(self._path)       # the fd was released: the pin still holds it
        try:
            return run_in_thread(_enter_and_call, fd, fn, args, name="netns-run")
        finally:
            os.close(fd)

    def release_fd(self) -> None:
        """Close the fd but keep the namespace (its bind mount pins it): a
        runtime holding 10 000 sandboxes must not hold 10 000 namespace fds
        (RLIMIT_NOFILE). ``run_in`` reopens the pin for its call; ``fd`` is
        -1 from now on, ``closed`` stays False until ``close()``."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def close(self) -> None:
        path, self._path = self._path, ""
        fd, self._fd = self._fd, -1
        first = _remove_pin(path) if path else None
        if fd >= 0:
            try:
                os.close(fd)
            except BaseException as exc:
                first = first or exc
        if first is not None:
            raise first

    @staticmethod
    def remove_mount(path: str | os.PathLike) -> None:
        """Remove a leftover namespace bind mount by path (for gc).

        Tolerates a path that is not mounted or does not exist.
        """
        first = _remove_pin(os.fspath(path))
        if first is not None:
            raise first

    def __enter__(self) -> "NetNS":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else f"fd={self._fd}"
        return f"<NetNS {self._name!r} {state}>"


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _remove_pin(path: str) -> BaseException | None:
    """Unmount, unlink, release the dir mount; return the first error."""
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        return None  # nothing was ever mounted there
    first: BaseException | None = None
    try:
        with _dir_lock(directory):
            for step, arg in (
                (_unmount_file, path),
                (_unlink, path),
                (_release_dir_mount, directory),
            ):
                try:
                    step(arg)
                except BaseException as exc:  # keep going, report the first
                    first = first or exc
    except BaseException as exc:  # the lock itself failed
        first = first or exc
    return first


def _create_in_thread(directory: str, path: str) -> int:
    # Runs in its own thread: unshare moves only this thread, which then exits.
    with _dir_lock(directory):
        _ensure_dir_mount(directory)
        # O_EXCL: never stack a mount on a leftover from a dead runtime (gc
        # must remove it first) nor on another live namespace of that name.
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444))
        fd = -1
        try:
            _sys.unshare(_sys.CLONE_NEWNET)
            fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            _sys.mount("/proc/thread-self/ns/net", path, None, _sys.MS_BIND)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            _unlink(path)
            _release_dir_mount(directory)
            raise
    return fd


def _open_pin(path: str) -> int:
    """An fd of the namespace pinned at path, checked to be one (a path in our
    own root-only state dir, but never setns into whatever else sits there)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        if os.readlink(f"/proc/self/fd/{fd}").split(":")[0] != "net":
            raise OSError(errno.EINVAL, "not a network namespace pin", path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _enter_and_call(fd: int, fn: Callable[..., T], args: tuple) -> T:
    _sys.setns(fd, _sys.CLONE_NEWNET)
    return fn(*args)
