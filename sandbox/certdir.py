"""The per-sandbox cert directory on the host: `<state_dir>/certs/<tag>.<id>/`
with `sandbox/` and `cloudflare/` inside, bound read-only at
/etc/sandbox/certs and /etc/cloudflare/certs (rootfs.CERT_MOUNTS).

The runtime writes the HTTPS CA here — before start, or after it: a bind
shares the directory, so a file renamed in here is visible inside at once
(SPEC §10 "HTTPS CA") — and never resolves a path inside the sandbox. The
sandbox cannot write here (read-only bind, no CAP_SYS_ADMIN to remount).

Recorded in the runtime's state (as `certs` of the sandbox's entry) before it
is made, removed at release; gc removes a dead runtime's leftovers by its tag.
"""
from __future__ import annotations

import os
import shutil

from .rootfs import CERT_MOUNTS

DIRNAME = "certs"


def parent(state_dir: str) -> str:
    return os.path.join(state_dir, DIRNAME)


def path_for(state_dir: str, tag: str, box_id: str) -> str:
    return os.path.join(parent(state_dir), f"{tag}.{box_id}")


def create(path: str) -> None:
    """A fresh, empty cert dir (a leftover of the same name is replaced)."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    remove(path)
    os.mkdir(path, 0o755)
    for sub, _ in CERT_MOUNTS:
        os.mkdir(os.path.join(path, sub), 0o755)
    # mkdir honours the umask; inside, a non-root user must read the CA.
    for p in [path] + [os.path.join(path, sub) for sub, _ in CERT_MOUNTS]:
        os.chmod(p, 0o755)


def remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def write(path: str, files: list[tuple[str, bytes]]) -> None:
    """Each (relative name, data) atomically: a reader inside sees the old
    file or the new one. Our own directory: O_EXCL on the temporary, no
    symlink can be there."""
    for rel, data in files:
        dst = os.path.join(path, rel)
        tmp = dst + ".tmp"
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            os.fchmod(fd, 0o644)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.rename(tmp, dst)


def sweep(state_dir: str, tag: str) -> list[str]:
    """Removes every cert dir of runtime `tag` under state_dir; their paths."""
    base = parent(state_dir)
    try:
        names = os.listdir(base)
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for name in names:
        if name.startswith(f"{tag}.") and "/" not in name:
            p = os.path.join(base, name)
            remove(p)
            out.append(p)
    return out
