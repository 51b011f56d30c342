"""Reading one file of an image's merged view from the host side, without
mounting it (the image's /etc/passwd and /etc/group, for `user=`).

The layer directories are runtime-owned and immutable once unpacked, but what
is in them is hostile (SPEC §9): `etc` may be a symlink to "/" or to
"../../../etc" meaning the host's. So this resolves a path the way overlayfs
and then the sandbox would see it, in Python, one component at a time:

  * a directory is the list of layers (top first) where it is a real
    directory, cut at a whiteout, an opaque directory or a non-directory;
  * a symlink is read (never followed by the kernel) and resolved again from
    the image's root — an absolute target means the image's root, `..` stops
    at it; at most 40 hops, as the kernel;
  * the file itself is opened with O_NOFOLLOW | O_NONBLOCK, must be a regular
    file, and is read up to a bound.
"""
from __future__ import annotations

import os
import stat

MAX_HOPS = 40


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _opaque(path: str) -> bool:
    try:
        return os.getxattr(path, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
    except OSError:
        return False


def _child(dirs: list[str], name: str):
    """Look `name` up in the merged directory made of `dirs` (host paths of
    real directories, top first). Returns ("dir", [paths]) or ("other",
    path, stat) or None when absent."""
    found: list[str] = []
    for d in dirs:
        p = os.path.join(d, name)
        try:
            st = os.lstat(p)
        except (FileNotFoundError, NotADirectoryError):
            continue
        if _is_whiteout(st):
            break
        if stat.S_ISDIR(st.st_mode):
            found.append(p)
            if _opaque(p):
                break
            continue
        if found:          # a non-directory below a directory is hidden
            break
        return ("other", p, st)
    return ("dir", found) if found else None


def read_file(layers: list[str], path: str, limit: int = 1 << 20) -> bytes | None:
    """The content of `path` in the merged view of `layers` (top first), or
    None when it is missing, not a regular file, or larger than `limit`."""
    todo = [c for c in path.split("/") if c]
    stack: list[list[str]] = [list(layers)]      # merged dirs from the root down
    hops = 0
    while todo:
        name = todo.pop(0)
        if name == ".":
            continue
        if name == "..":
            if len(stack) > 1:
                stack.pop()
            continue
        hit = _child(stack[-1], name)
        if hit is None:
            return None
        if hit[0] == "dir":
            stack.append(hit[1])
            continue
        _, p, st = hit
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > MAX_HOPS:
                return None
            try:
                target = os.readlink(p)
            except OSError:
                return None
            if target.startswith("/"):
                del stack[1:]
            todo[:0] = [c for c in target.split("/") if c]
            continue
        if todo or not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        return _read(p, limit)
    return None


def _read(p: str, limit: int) -> bytes | None:
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        out = b""
        while len(out) <= limit:
            chunk = os.read(fd, limit + 1 - len(out))
            if not chunk:
                break
            out += chunk
        return out if len(out) <= limit else None
    finally:
        os.close(fd)
