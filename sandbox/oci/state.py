"""Container state under --root: one directory per container, crash-safe.

<root>/<id>/state.json  written atomically (tmp + rename); the pid is paired
                        with its start time (/proc/PID/stat field 22), so a
                        reused pid never passes for the container's init.
<root>/<id>/exec.fifo   exists while the container is `created`: its init
                        blocks opening it for writing until `start` reads it.
<root>/<id>/lock        flock'd by every command that changes the container.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re

DEFAULT_ROOT = "/run/sandbox-oci"
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+:@-]{0,1023}")


class OciError(Exception):
    """Printed as runc does: `Error: <message>` on stderr, exit 1."""


def check_id(cid: str) -> str:
    if not _ID_RE.fullmatch(cid) or cid in (".", ".."):
        raise OciError(f"invalid container id format: {cid}")
    return cid


def proc_start_time(pid: int) -> tuple[int, str] | None:
    """(start time in clock ticks, state letter) of pid, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rindex(b")") + 2:].split()
    return int(rest[19]), rest[0].decode()


class Container:
    def __init__(self, root: str, cid: str, data: dict):
        self.root, self.id, self.data = root, cid, data
        self.dir = os.path.join(root, cid)

    @property
    def pid(self) -> int:
        return int(self.data.get("pid") or 0)

    @property
    def fifo(self) -> str:
        return os.path.join(self.dir, "exec.fifo")

    def alive(self) -> bool:
        """The init (same pid, same start time) exists and is not a zombie."""
        if not self.pid:
            return False
        st = proc_start_time(self.pid)
        return st is not None and st[0] == self.data.get("start_time") and st[1] not in "ZXx"

    def status(self) -> str:
        if not self.alive():
            return "stopped"
        if os.path.exists(self.fifo):
            return "created"
        for d in self.data.get("cgroups", {}).get("freezer", []):
            try:
                with open(os.path.join(d, "freezer.state")) as f:
                    if f.read().strip() in ("FROZEN", "FREEZING"):
                        return "paused"
            except OSError:
                pass
        return "running"

    def spec_state(self) -> dict:
        """The runtime spec's state JSON."""
        status = self.status()
        out = {"ociVersion": self.data.get("ociVersion", "1.0.2"), "id": self.id,
               "status": status, "pid": self.pid if status != "stopped" else 0,
               "bundle": self.data.get("bundle", "")}
        if self.data.get("annotations"):
            out["annotations"] = self.data["annotations"]
        return out

    def save(self) -> None:
        tmp = os.path.join(self.dir, ".state.json.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, json.dumps(self.data).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, os.path.join(self.dir, "state.json"))

    def lock(self) -> int:
        """An exclusive flock on the container (released when the fd closes)."""
        fd = os.open(os.path.join(self.dir, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd


def load(root: str, cid: str) -> Container:
    check_id(cid)
    try:
        with open(os.path.join(root, cid, "state.json")) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise OciError(f"container does not exist") from None
    except (OSError, ValueError) as e:
        raise OciError(f"container {cid}: unreadable state ({e})") from None
    return Container(root, cid, data)


def new_dir(root: str, cid: str) -> Container:
    """The state dir of a new container; OciError if the id is taken."""
    check_id(cid)
    os.makedirs(root, mode=0o711, exist_ok=True)
    d = os.path.join(root, cid)
    try:
        os.mkdir(d, 0o711)
    except FileExistsError:
        raise OciError(f"container with id exists: {cid}") from None
    return Container(root, cid, {})


def list_ids(root: str) -> list[str]:
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if os.path.isfile(os.path.join(root, n, "state.json")))


def remove_dir(c: Container) -> None:
    for name in ("exec.fifo", "state.json", ".state.json.tmp", "lock"):
        try:
            os.unlink(os.path.join(c.dir, name))
        except FileNotFoundError:
            pass
    try:
        os.rmdir(c.dir)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
