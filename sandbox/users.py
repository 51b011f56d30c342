"""Resolve `user=` against the sandbox's own /etc/passwd and /etc/group.

The text comes from the sandbox (or its image), so it is hostile: read with
sandbox.safefs (confined, bounded), and parsed here without trusting a field —
a malformed line is skipped, never an exception from int(). When the files
are missing or were refused, a name is unknown (ValueError) and a UID stands
for itself with HOME=/ (SPEC §10)."""
from __future__ import annotations

from dataclasses import dataclass

_MAX_ID = (1 << 32) - 2          # (uid_t)-1 means "unchanged" to the kernel
_MAX_GROUPS = 65536              # NGROUPS_MAX


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


def _id(field: str) -> int | None:
    if not field.isascii() or not field.isdigit() or len(field) > 10:
        return None
    v = int(field)
    return v if v <= _MAX_ID else None


def _entries(text: str):
    for line in text.splitlines():
        if line and not line.startswith("#") and "\0" not in line:
            yield line.split(":")


def resolve(user: str | int | None, passwd: str, group: str) -> Identity:
    if user is None:
        user = 0
    entry = None
    for f in _entries(passwd):
        if len(f) < 7 or _id(f[2]) is None or _id(f[3]) is None:
            continue
        if (isinstance(user, str) and f[0] == user) or (isinstance(user, int) and _id(f[2]) == user):
            entry = f
            break
    if entry is None:
        if isinstance(user, str):
            if user.isascii() and user.isdigit():
                return resolve(int(user), passwd, group)
            raise ValueError(f"unknown user {user!r} (not in the sandbox's /etc/passwd)")
        # A bare UID with no entry: its own number as GID, no groups (SPEC §10).
        return Identity(user, user, (), "/")
    name, uid, gid, home = entry[0], _id(entry[2]), _id(entry[3]), entry[5] or "/"
    groups: list[int] = []
    for f in _entries(group):
        if len(f) >= 4 and name in f[3].split(","):
            g = _id(f[2])
            if g is not None and g not in groups and len(groups) < _MAX_GROUPS:
                groups.append(g)
    return Identity(uid, gid, tuple(groups), home)
