"""Keeping the store: sandbox leases, remove, prune, and gc of dead pulls.

A running sandbox holds `locks/use-<hex>` shared (its lease). remove and
prune hold the store lock exclusively — no pull runs then, in any process —
and drop an image only when they can take its use lock exclusively (no
sandbox anywhere uses it). Then every layer, blob, short link and key lock no
remaining record names goes. Deletions are renames into tmp/ first (atomic
for readers), then rmtree.

`collect_debris` is gc's part (also run by every Runtime at open): a tmp/
entry whose key lock nobody holds is a dead pull's (its owner holds that lock
for as long as the entry lives); a short link to no layer, likewise.
"""
from __future__ import annotations

import asyncio
import os
import re
import secrets

from ..errors import ImageError
from . import locks
from .reference import parse
from .store import ImageStore, _hex, _remove

_TMP = re.compile(r"(blob|layer)-([0-9a-f]{64})\.[0-9a-f]+$")


class Lease:
    def __init__(self, fd: int):
        self._fd = fd

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


async def lease(store: ImageStore, digest: str, ref: str) -> Lease:
    fd = await locks.lock(store.p("locks", "store"), shared=True)
    try:
        if store.record(digest) is None:
            raise ImageError(ref, "image was removed while the sandbox started", "not-found")
        use = locks.try_lock(store.p("locks", f"use-{_hex(digest)}"), shared=True)
        if use is None:     # pragma: no cover - prune holds it only under the store lock
            raise ImageError(ref, "image is being removed", "in-use")
        return Lease(use)
    finally:
        os.close(fd)


def _in_use(store: ImageStore, digest: str) -> bool:
    fd = locks.try_lock(store.p("locks", f"use-{_hex(digest)}"))
    if fd is None:
        return True
    os.close(fd)
    return False


async def remove(store: ImageStore, ref) -> list[str]:
    """Untag `ref` (a reference, or an image digest); the image goes when no
    other name points at it. Refused (ImageError in-use) while a sandbox uses it."""
    store.ensure()
    fd = await locks.lock(store.p("locks", "store"))
    try:
        return await asyncio.to_thread(_remove_locked, store, ref)
    finally:
        os.close(fd)


def _remove_locked(store: ImageStore, ref) -> list[str]:
    refs = store.refs()
    if isinstance(ref, str) and ref.startswith("sha256:") and len(ref) == 71:
        digest, names = ref, [n for n, d in refs.items() if d == ref]
        if store.record(digest) is None and not names:
            raise ImageError(ref, "no such image", "not-found")
    else:
        name = parse(ref).name
        digest = refs.get(name)
        if digest is None:
            raise ImageError(str(ref), "no such image", "not-found")
        names = [name]
    others = [n for n, d in refs.items() if d == digest and n not in names]
    if not others and _in_use(store, digest):
        raise ImageError(str(ref), "image is in use by a sandbox", "in-use")
    for n in names:
        _remove(store._ref_path(n))
    if not others:
        _remove(store.p("images", _hex(digest) + ".json"))
    _sweep(store)
    return names


async def prune(store: ImageStore) -> list[str]:
    """Drop every image no sandbox uses (and its names); returns the names
    (or digests, for unnamed records) removed."""
    store.ensure()
    fd = await locks.lock(store.p("locks", "store"))
    try:
        return await asyncio.to_thread(_prune_locked, store)
    finally:
        os.close(fd)


def _prune_locked(store: ImageStore) -> list[str]:
    refs = store.refs()
    gone = []
    for digest in list(store.records()):
        if _in_use(store, digest):
            continue
        names = [n for n, d in refs.items() if d == digest]
        for n in names:
            _remove(store._ref_path(n))
        _remove(store.p("images", _hex(digest) + ".json"))
        gone += names or [digest]
    for n, d in refs.items():           # names of images whose record is gone
        if store.record(d) is None and n not in gone:
            _remove(store._ref_path(n))
    _sweep(store)
    collect_debris(store.root)
    return gone


def _sweep(store: ImageStore) -> None:
    """Delete what no record names. Caller holds the store lock exclusively."""
    keep_layers, keep_blobs = set(), set()
    for rec in store.records().values():
        keep_blobs.update({_hex(rec["digest"]), _hex(rec["config"])})
        for x in rec["layers"]:
            keep_layers.add(_hex(x["diff_id"]))
            keep_blobs.add(_hex(x["blob"]))
    for h in os.listdir(store.p("layers")):
        if h not in keep_layers:
            _discard(store, store.p("layers", h), f"layer-{h}")
            _remove(store.p("locks", f"layer-{h}"))
    for link in os.listdir(store.p("l")):
        target = os.readlink(store.p("l", link)) if os.path.islink(store.p("l", link)) else ""
        if target.split("/")[2:3] and target.split("/")[2] not in keep_layers:
            _remove(store.p("l", link))
    for h in os.listdir(store.p("blobs", "sha256")):
        if h not in keep_blobs:
            _remove(store.p("blobs", "sha256", h))
            _remove(store.p("locks", f"blob-{h}"))
    for n in os.listdir(store.p("locks")):
        if n.startswith("use-") and n[4:] not in keep_blobs:
            _remove(store.p("locks", n))


def _discard(store: ImageStore, path: str, key: str) -> None:
    tmp = store.p("tmp", f"{key}.{secrets.token_hex(4)}")
    try:
        os.rename(path, tmp)
    except FileNotFoundError:
        return
    _remove(tmp)


def collect_debris(root: str) -> list[str]:
    """Remove what dead pulls left in the store at root. Safe while pulls
    run: an entry is removed only under its key's lock."""
    removed: list[str] = []
    tmpdir = os.path.join(root, "tmp")
    if not os.path.isdir(os.path.join(root, "locks")):
        return removed
    try:
        names = os.listdir(tmpdir)
    except FileNotFoundError:
        return removed
    for n in names:
        path = os.path.join(tmpdir, n)
        m = _TMP.match(n)
        if m is None:
            continue
        fd = locks.try_lock(os.path.join(root, "locks", f"{m.group(1)}-{m.group(2)}"))
        if fd is None:
            continue            # a live pull's
        try:
            _remove(path)
            removed.append(path)
        finally:
            os.close(fd)
    ldir = os.path.join(root, "l")
    for n in os.listdir(ldir) if os.path.isdir(ldir) else ():
        link = os.path.join(ldir, n)
        try:
            target = os.readlink(link)
        except OSError:
            continue
        parts = target.split("/")
        if len(parts) != 4 or parts[:2] != ["..", "layers"] or not re.fullmatch(r"[0-9a-f]{64}", parts[2]):
            continue
        if os.path.isdir(os.path.join(root, "layers", parts[2])):
            continue
        fd = locks.try_lock(os.path.join(root, "locks", f"layer-{parts[2]}"))
        if fd is None:
            continue
        try:
            if not os.path.isdir(os.path.join(root, "layers", parts[2])):
                _remove(link)
                removed.append(link)
        finally:
            os.close(fd)
    # write_atomic's temporaries (records, names, manifests): only when no
    # pull runs anywhere (they are written under the store lock, shared).
    fd = locks.try_lock(os.path.join(root, "locks", "store"))
    if fd is None:
        return removed
    try:
        for sub in ("images", "refs", "blobs/sha256"):
            d = os.path.join(root, sub)
            for n in os.listdir(d) if os.path.isdir(d) else ():
                if n.endswith(".tmp"):
                    _remove(os.path.join(d, n))
                    removed.append(os.path.join(d, n))
    finally:
        os.close(fd)
    return removed
