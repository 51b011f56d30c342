"""Resolve `user=` against the sandbox's own /etc/passwd and /etc/group."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


def _entries(text: str):
    for line in text.splitlines():
        if line and not line.startswith("#"):
            yield line.split(":")


def resolve(user: str | int | None, passwd: str, group: str) -> Identity:
    if user is None:
        user = 0
    entry = None
    for f in _entries(passwd):
        if len(f) < 7:
            continue
        if (isinstance(user, str) and f[0] == user) or (isinstance(user, int) and f[2] == str(user)):
            entry = f
            break
    if entry is None:
        if isinstance(user, str):
            if user.isdigit():
                return resolve(int(user), passwd, group)
            raise ValueError(f"unknown user {user!r} (not in the sandbox's /etc/passwd)")
        # A bare UID with no entry: its own number as GID, no groups (SPEC §10).
        return Identity(user, user, (), "/")
    name, uid, gid, home = entry[0], int(entry[2]), int(entry[3]), entry[5] or "/"
    groups = []
    for f in _entries(group):
        if len(f) >= 4 and name in f[3].split(",") and f[2].isdigit():
            groups.append(int(f[2]))
    return Identity(uid, gid, tuple(groups), home)
