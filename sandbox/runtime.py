"""Runtime: one per process; owns what sandboxes share (SPEC §2)."""
from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import os
import secrets
from dataclasses import dataclass, field
from typing import Any

from . import cgroups as _cgroups
from . import certdir as _certdir
from . import rootfs as _rootfs
from . import safefs as _safefs
from . import _native_api as native
from ._native_api import EXEC_PATH, INIT_PATH
from .config import check_log_limit, check_name
from .errors import SandboxError
from .log import get_logger
from .network import RuntimeNetwork
from .sandbox import Sandbox
from .state import RuntimeState
from . import gc as _gc

log = get_logger("sandbox.runtime")
_DEFAULT_FILES = _rootfs.EtcFiles("x", "x").files(default_users=True)
_DEFAULT_USERS = (_DEFAULT_FILES["passwd"], _DEFAULT_FILES["group"])


class ProcsFds:
    """The cgroup.procs fds sandboxes' processes join through, opened when a
    start or exec asks for them and kept for the PROCS_FDS_KEPT sandboxes used
    last (LRU). Held for every sandbox (four on v1), 10 000 sandboxes needed
    40 000 fds: past RLIMIT_NOFILE, which root without CAP_SYS_RESOURCE cannot
    raise. An entry is evicted only when another sandbox's fds are asked for,
    and every reader passes them to the C core in the same synchronous
    expression (sandbox.py: native.start / native.spawn_exec), so no fd is
    closed between being read and being handed to the child."""

    def __init__(self, keep: int):
        self.keep = keep
        self._open: dict[int, tuple] = {}    # id(res) -> (res, fds), oldest first (res held: id stays unique)

    def get(self, res: "Resources") -> tuple[int, ...]:
        key = id(res)
        entry = self._open.pop(key, None)
        if entry is not None:
            fds = entry[1]
        else:
            opened: list[int] = []
            try:
                for d in res.procs_paths:
                    opened.append(os.open(os.path.join(d, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC))
            except BaseException:
                for fd in opened:
                    os.close(fd)
                raise
            fds = tuple(opened)
            while len(self._open) >= self.keep:
                self._close(self._open.pop(next(iter(self._open)))[1])
        self._open[key] = (res, fds)
        return fds

    def drop(self, res: "Resources") -> None:
        entry = self._open.pop(id(res), None)
        if entry is not None:
            self._close(entry[1])

    def clear(self) -> None:
        while self._open:
            self._close(self._open.popitem()[1][1])

    @staticmethod
    def _close(fds) -> None:
        for fd in fds:
            os.close(fd)


PROCS_FDS_KEPT = 64


@dataclass
class Resources:
    """Kernel objects one sandbox holds while it runs, released in reverse."""
    netns_fd: int = -1
    cgroup_fd: int = -1
    procs_paths: tuple[str, ...] = ()
    procs_late: int = 0      # how many of procs_fds (the last ones) hold the memory controller
    nameserver: str = "127.0.0.1"
    cgroup: Any = None
    net: Any = None
    closers: list = field(default_factory=list)
    procs_cache: Any = None

    @property
    def procs_fds(self) -> tuple[int, ...]:
        """O_WRONLY fds of cgroup.procs of procs_paths, valid until the next
        read for another sandbox (ProcsFds): pass them on at once."""
        if not self.procs_paths:
            return ()
        return self.procs_cache.get(self)


_MFD_EXEC = 0x0010          # linux >= 6.3: say so, or vm.memfd_noexec may refuse the exec
_F_SEAL_EXEC = 0x0020       # linux >= 6.3: the mode's exec bits are frozen too


def sealed_executable(path: str) -> int:
    """A CLOEXEC memfd holding a copy of the executable at path, sealed
    against any write, resize or further sealing (F_SEAL_SEAL|SHRINK|GROW|
    WRITE, and EXEC where the kernel has it). Executed with execveat(fd, "",
    AT_EMPTY_PATH): what runs is exactly what was loaded here, and no process
    of a sandbox can change it through /proc/PID/exe, whatever its rights."""
    with open(path, "rb") as f:
        data = f.read()
    name = os.path.basename(path)
    flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
    try:
        fd = os.memfd_create(name, flags | _MFD_EXEC)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        fd = os.memfd_create(name, flags)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
        try:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals | _F_SEAL_EXEC)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Runtime:
    def __init__(self, state_dir: str = "/run/sandbox", resolver: str | None = None, *,
                 insecure_registries=(), registry_auth=None, max_layer_bytes: int = 8 << 30,
                 image_store=None, _pool_blocks: int | None = None):
        if not isinstance(state_dir, (str, os.PathLike)):
            raise TypeError("state_dir must be a path")
        self.state_dir = os.path.abspath(os.fspath(state_dir))
        # Images (SPEC §11): options checked now; the store is made on first use.
        from . import images as _images
        insecure = _images.check_options(insecure_registries, registry_auth, max_layer_bytes,
                                         image_store)
        self._images = _images.ImageService(
            image_store if image_store is not None else os.path.join(self.state_dir, "images"),
            insecure, registry_auth, max_layer_bytes)
        if resolver is not None:
            from .proxy.dns import parse_resolver
            if not isinstance(resolver, str):
                raise TypeError("resolver must be a str: 'ip' or 'ip:port'")
            parse_resolver(resolver)   # ValueError now, not at the first start
        self.resolver = resolver
        self.tag = "r" + secrets.token_hex(3)   # nft identifiers start with a letter
        self._sandboxes: dict[str, Sandbox] = {}
        self._init_fd = -1
        self._exec_fd = -1
        self._devnull = -1
        self._stdout_fd = 1
        self._stderr_fd = 2
        self._entered = False
        self._counter = 0
        # Private (tests): cap this runtime's address pool at that many blocks.
        self._pool_blocks = _pool_blocks

    # -- context -------------------------------------------------------
    async def __aenter__(self) -> "Runtime":
        await self.open()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def open(self) -> None:
        if self._entered:
            return
        if os.geteuid() != 0:
            raise SandboxError("the sandbox runtime must run as root")
        RuntimeNetwork.raise_fd_limit()   # soft RLIMIT_NOFILE -> hard: sandboxes' connections must not exhaust us
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        # Empty mount points the sandbox child mounts over in its own private
        # mount namespace: they never hold a host mount.
        self._state = None
        self._net = None
        self._root_dir = os.path.join(self.state_dir, ".root")
        self._scratch_dir = os.path.join(self.state_dir, ".scratch")
        for d in (self._root_dir, self._scratch_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        # Nothing a sandbox does may reach this process's memory: /proc/PID/
        # {mem,environ,fd} of a non-dumpable process need CAP_SYS_PTRACE
        # (runc does the same since CVE-2019-5736). Kept for the process's
        # life: what it holds stays in memory after close().
        native.set_dumpable(False)
        # PID 1 and the exec helper run from sealed in-memory copies, made once
        # per Runtime: /proc/1/exe inside is never a writable host file.
        for attr, path in (("_init_fd", INIT_PATH), ("_exec_fd", EXEC_PATH)):
            try:
                setattr(self, attr, sealed_executable(path))
            except OSError as e:
                self._close_exes()
                raise SandboxError(f"cannot load {path} ({e.strerror}); "
                                   "rebuild: pip install -e .") from e
        self._devnull = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        self._procs = ProcsFds(PROCS_FDS_KEPT)
        self._cgroup_backend = _cgroups.default_backend()
        self._parts: dict[str, set] = {}
        try:
            # Our own leftovers first: a runtime that died here before us.
            await asyncio.to_thread(_gc.collect, [self.state_dir])
            self._state = RuntimeState(self.state_dir, self.tag)
            self._state.open(cgroup_prefix=f"{self.tag}.")
            self._net = RuntimeNetwork(tag=self.tag, state_dir=self.state_dir,
                                       resolver=self.resolver, state=self._state,
                                       pool_blocks=self._pool_blocks)
            await self._net.open()
        except BaseException:
            await self._close_host()
            raise
        self._entered = True

    async def close(self) -> None:
        first: BaseException | None = None
        boxes = list(self._sandboxes.values())
        results = await asyncio.gather(*(b.destroy() for b in boxes), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException) and first is None:
                first = r
        try:
            await self._close_host()
        except BaseException as e:
            first = first or e
        self._entered = False
        if first is not None:
            raise first

    async def _close_host(self) -> None:
        first = None
        if self._net is not None:
            net, self._net = self._net, None
            try:
                await net.close()
            except BaseException as e:
                first = e
        if self._state is not None and first is None:
            # Only when everything it lists is gone: otherwise gc finishes it.
            self._state.close()
        self._state = None
        if getattr(self, "_procs", None) is not None:
            self._procs.clear()
        if self._devnull >= 0:
            os.close(self._devnull)
        self._devnull = -1
        self._close_exes()
        if first is not None:
            raise first

    def _close_exes(self) -> None:
        for fd in (self._init_fd, self._exec_fd):
            if fd >= 0:
                os.close(fd)
        self._init_fd = self._exec_fd = -1

    # -- sandboxes -------------------------------------------------------
    def sandbox(self, name: str | None = None, *, rootfs=None, image=None, memory=None, pids=None,
                cpus=None, log_limit=None) -> Sandbox:
        if name is None:
            while True:
                self._counter += 1
                name = f"sb-{self.tag}-{self._counter}"
                if name not in self._sandboxes:
                    break
        check_name(name)
        if name in self._sandboxes:
            raise ValueError(f"sandbox name {name!r} is already in use")
        root = _rootfs.check_rootfs(rootfs) if rootfs is not None else None
        if image is not None and rootfs is not None:
            raise ValueError("rootfs and image exclude each other")
        from .images import parse as _parse_image
        ref = _parse_image(image) if image is not None else None   # ImageError now
        limits = self._limits(memory, pids, cpus)
        logs = check_log_limit(log_limit)
        if not self._entered:
            raise SandboxError("the Runtime is not open: use `async with Runtime() as rt`")
        box = Sandbox(self, name, rootfs=root, limits=limits, log_limit=logs)
        box._image_ref = ref
        self._sandboxes[name] = box
        return box

    def _limits(self, memory, pids, cpus) -> Any:
        return _cgroups.Limits.from_args(memory=memory, pids=pids, cpus=cpus)

    def _forget(self, box: Sandbox) -> None:
        if self._sandboxes.get(box.name) is box:
            del self._sandboxes[box.name]

    @property
    def sandboxes(self) -> list[Sandbox]:
        return list(self._sandboxes.values())

    # -- images (SPEC §11; sandbox/images/) -----------------------------------
    async def pull(self, ref, progress=None):
        """Pull ref into the store (again: a tag is looked up anew) -> Image.
        `progress(phase, digest, done, total, seconds)` is called as bytes arrive."""
        return await self._images.pull(ref, progress)

    def images(self) -> list:
        """Every stored image, one entry per name."""
        return self._images.images()

    async def remove_image(self, ref) -> list[str]:
        return await self._images.remove(ref)

    async def prune_images(self) -> list[str]:
        return await self._images.prune()

    async def _image_for(self, box: Sandbox):
        """The image of an image sandbox, pulled on first use; ImageError
        before the sandbox has any state."""
        return await self._images.get_or_pull(box._image_ref)

    # -- resources (called by Sandbox) -------------------------------------
    async def _acquire(self, box: Sandbox, enable_internet: bool) -> Resources:
        res = Resources()
        try:
            if box._image is not None:      # held while it runs: prune keeps its layers
                res.closers.append((await self._images.lease(box._image, box._image_ref.given)).close)
            net = await self._net.attach(box, enable_internet)
            self._parts[net.sid] = {"net", "cgroup"}
            res.closers.append(lambda: self._part_done(net.sid, "cgroup"))
            res.net = net
            res.netns_fd = net.ns.fd
            res.nameserver = net.gateway
            res.closers.append(lambda: self._net.detach(box, net, lambda: self._part_done(net.sid, "net")))
            self._acquire_cgroup(box, res)
        except BaseException:
            await self._release(box, res)
            raise
        return res

    def _part_done(self, sid: str, part: str) -> None:
        parts = self._parts.get(sid)
        if parts is None:
            return
        parts.discard(part)
        if not parts:
            del self._parts[sid]
            if self._state is not None:
                self._state.remove_sandbox(sid)

    def _acquire_cgroup(self, box: Sandbox, res: Resources) -> None:
        cg = _cgroups.create_cgroup(name=f"{self.tag}.{box.id}", limits=box._limits,
                                    backend=self._cgroup_backend)
        res.cgroup = cg
        res.closers.append(cg.close)
        # Processes join by writing "0" to cgroup.procs themselves (exec's
        # sbx-exec helper and its child; PID 1 on v1); on v2 PID 1 is born
        # inside it instead (CLONE_INTO_CGROUP). The memory hierarchy comes
        # last: an exec's helper stays out of it (the sandbox's memory
        # pressure must not OOM-kill it or fail its report), its child joins it.
        mem = {cg.dirs.get("memory"), cg.dirs.get("")} - {None}
        paths = [d for d in cg.paths if d not in mem] + [d for d in cg.paths if d in mem]
        res.procs_paths = tuple(paths)
        res.procs_cache = self._procs
        res.closers.append(lambda: self._procs.drop(res))
        res.procs_late = sum(d in mem for d in paths)
        if cg.dirfd is not None:
            res.cgroup_fd = cg.dirfd

    async def _release(self, box: Sandbox, res: Resources) -> None:
        first = None
        for close in reversed(res.closers):
            try:
                r = close()
                if asyncio.iscoroutine(r):
                    await r
            except Exception as e:  # keep going; report the first
                log.warning("sandbox.release_failed", sandbox=box.name, error=str(e))
                first = first or e
        res.closers.clear()
        if first is not None:
            raise first

    def _plan(self, box: Sandbox, res: Resources):
        # Per sandbox, and not the sandbox's id itself (which it may not know).
        machine_id = hashlib.sha256(b"machine-id:" + box.id.encode()).hexdigest()[:32]
        etc = _rootfs.EtcFiles(hostname=box.name[:64], nameserver=res.nameserver,
                               machine_id=machine_id)
        certs = self._cert_dir(box, res)
        if box._image is not None:
            from .images.plan import image_plan
            return image_plan(self._root_dir, self._scratch_dir,
                              self._images.store.lowerdirs(box._image), etc, certs,
                              workdir=box._image.config.working_dir)
        if box._rootfs is None:
            return _rootfs.default_plan(self._root_dir, etc, certs)
        return _rootfs.dir_plan(self._root_dir, self._scratch_dir, box._rootfs, etc, certs)

    def _cert_dir(self, box: Sandbox, res: Resources) -> str:
        """The sandbox's cert dir on the host (sandbox/certdir.py): recorded
        for gc, made, released with the sandbox's other resources."""
        path = _certdir.path_for(self.state_dir, self.tag, box.id)
        if self._state is not None and res.net is not None:
            self._state.update_sandbox(res.net.sid, certs=path)

        def release():
            if getattr(box, "_cert_dir", None) == path:
                box._cert_dir = None
            _certdir.remove(path)
        res.closers.append(release)
        _certdir.create(path)
        box._cert_dir = path
        box._write_ca()   # the CA is inside before the entrypoint starts
        return path

    @property
    def _names(self):
        return self._net.names if self._net is not None else None

    def _etc_users(self, rootfs: str | None, image=None) -> tuple[str, str]:
        """passwd and group for the entrypoint's user=. A rootfs=DIR is the
        operator's path but its content is hostile: read confined below it,
        bounded, never blocking (sandbox/safefs.py). An image's were read at
        pull time from its layers (sandbox/images/merged.py)."""
        if image is not None:
            return self._images.store.etc_users(image)
        if rootfs is None:
            return _DEFAULT_USERS
        try:
            fd = _safefs.open_dir(rootfs)
        except OSError:
            return "", ""
        try:
            return (_safefs.read_text_or_empty(fd, "etc/passwd", log=log),
                    _safefs.read_text_or_empty(fd, "etc/group", log=log))
        finally:
            os.close(fd)
