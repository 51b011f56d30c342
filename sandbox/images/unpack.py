"""Unpacking one layer into its own directory (SPEC §11 "Unpacking is hostile input").

The tar stream comes from whoever built the image. Python's `tarfile` reads it
(streaming, `r|`: the blob is read once, never seeked), and its extraction does
the writing of each entry — but with a filter of ours, because none of the
stock filters fits: `data` refuses absolute symlinks (every Debian image has
them) and both `data` and `tar` clear setuid bits (SPEC: kept; no_new_privs
holds inside). What the filter enforces, for every entry, before anything is
written:

  * the name is relative and has no `..` (absolute names and `..` are refused,
    not rewritten: a layer that tries is hostile, and the error names the entry);
  * no component of its parent path is anything but a real directory made by
    this layer (a symlink there is the "symlink, then write through it" attack;
    the check is on the directory we extract into, which only we write);
  * whatever the entry replaces is removed first, so a write never follows a
    symlink or an earlier hardlink at the target itself;
  * a hardlink's target passes the same checks and must already be in the
    layer (never a host file through `..`, an absolute name or a symlink);
  * character and block devices are dropped (only whiteouts become 0/0 nodes);
  * owners are numeric (never looked up in the host's /etc/passwd).

Whiteouts, which tarfile knows nothing of, become overlayfs's own: `.wh.NAME`
a 0/0 character device NAME, `.wh..wh..opq` the trusted.overlay.opaque=y
xattr on its directory. No xattr of the tar is applied (a trusted.overlay.*
attribute from an image would steer overlayfs).

The uncompressed stream is counted and hashed as it is read: past
`max_bytes` the layer is refused, and its sha256 must equal the diff-id the
(verified) image config names.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import stat
import tarfile

from ..errors import ImageError

OPAQUE = ".wh..wh..opq"
WH_PREFIX = ".wh."
_MAX_META = 1 << 20           # a PAX / GNU long-name header larger than this is hostile
_CHUNK = 1 << 20


class LayerRefused(Exception):
    """Internal: a layer entry was refused; becomes ImageError with the ref."""


class _Counted(io.RawIOBase):
    """The uncompressed tar stream: hashed and bounded as tarfile reads it."""

    def __init__(self, src, limit: int):
        self._src = src
        self._limit = limit
        self.total = 0
        self.hash = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self._src.read(len(b))
        n = len(data)
        if n:
            self.total += n
            if self.total > self._limit:
                raise LayerRefused(f"layer is larger than max_layer_bytes ({self._limit} bytes)")
            self.hash.update(data)
            b[:n] = data
        return n

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass


class _BoundedInfo(tarfile.TarInfo):
    """tarfile reads a PAX or GNU long-name header into memory whole: bound it."""

    def _proc_gnulong(self, tf):
        if self.size > _MAX_META:
            raise LayerRefused(f"{self.name!r}: long-name header of {self.size} bytes")
        return super()._proc_gnulong(tf)

    def _proc_pax(self, tf):
        if self.size > _MAX_META:
            raise LayerRefused(f"{self.name!r}: PAX header of {self.size} bytes")
        return super()._proc_pax(tf)


def _decompressed(f):
    """gzip, zstd or a plain tar, told by the magic bytes (a docker-archive's
    layer.tar may be any; a media type may lie, the bytes do not)."""
    head = f.read(4)
    f.seek(0)
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=f, mode="rb")
    if head == b"\x28\xb5\x2f\xfd":
        import zstandard
        return zstandard.ZstdDecompressor().stream_reader(f, read_size=_CHUNK)
    return f


def _clean(name: str, what: str) -> str:
    """A member name as a relative path inside the layer ('' = the root)."""
    if name.startswith("/"):
        raise LayerRefused(f"{what} {name!r}: absolute path")
    parts = []
    for p in name.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            raise LayerRefused(f"{what} {name!r}: '..' in the path")
        parts.append(p)
    return "/".join(parts)


class _Layer:
    def __init__(self, dest: str):
        self.dest = dest
        self.dirs: set[str] = {""}      # relative paths checked to be real directories
        self.dropped: list[str] = []

    def abs(self, rel: str) -> str:
        return os.path.join(self.dest, rel) if rel else self.dest

    def ensure_dir(self, rel: str, entry: str) -> None:
        """rel (and its parents) exist as real directories of this layer;
        missing ones are made. A symlink or a file on the way is refused."""
        if rel in self.dirs:
            return
        parent = rel.rpartition("/")[0]
        self.ensure_dir(parent, entry)
        path = self.abs(rel)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            os.mkdir(path, 0o755)
        else:
            if stat.S_ISLNK(st.st_mode):
                raise LayerRefused(f"entry {entry!r}: its path goes through the symlink {rel!r}")
            if not stat.S_ISDIR(st.st_mode):
                raise LayerRefused(f"entry {entry!r}: its path goes through the non-directory {rel!r}")
        self.dirs.add(rel)

    def clear(self, rel: str, keep_dir: bool) -> None:
        """Remove what is at rel (a directory survives only when the new entry
        is one too: tar's "later entry wins")."""
        path = self.abs(rel)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return
            shutil.rmtree(path)
            prefix = rel + "/"
            self.dirs = {d for d in self.dirs if d != rel and not d.startswith(prefix)}
        else:
            os.unlink(path)

    def whiteout(self, rel: str) -> None:
        self.clear(rel, keep_dir=False)
        os.mknod(self.abs(rel), stat.S_IFCHR | 0o000, os.makedev(0, 0))

    def opaque(self, rel: str) -> None:
        os.setxattr(self.abs(rel), "trusted.overlay.opaque", b"y", follow_symlinks=False)


def unpack(blob_path: str, dest: str, max_bytes: int, progress=None) -> tuple[str, int]:
    """Unpack the layer blob at blob_path (runtime-owned, verified) into the
    empty directory dest. Returns (diff_id, uncompressed size). Raises
    LayerRefused for a hostile or oversized layer; the caller discards dest."""
    layer = _Layer(dest)
    with open(blob_path, "rb") as raw:
        src = _decompressed(raw)
        counted = _Counted(src, max_bytes)
        stream = io.BufferedReader(counted, _CHUNK)
        try:
            tf = tarfile.open(fileobj=stream, mode="r|", tarinfo=_BoundedInfo,
                              errorlevel=2)
        except tarfile.ReadError as e:
            raise LayerRefused(f"not a tar archive ({e})") from None
        try:
            for member in tf:
                _entry(tf, layer, member)
                tf.members.clear()      # streaming: keep no list of every entry
                if progress is not None:
                    progress(counted.total)
            counted.drain()             # the end-of-archive padding is hashed too
        except (tarfile.TarError, EOFError, ValueError, *_codec_errors()) as e:
            raise LayerRefused(f"corrupt layer ({type(e).__name__}: {e})") from None
        finally:
            tf.close()
    return "sha256:" + counted.hash.hexdigest(), counted.total


def _codec_errors() -> tuple:
    import zlib
    try:
        import zstandard
        return (zlib.error, gzip.BadGzipFile, zstandard.ZstdError)
    except ImportError:  # pragma: no cover
        return (zlib.error, gzip.BadGzipFile)


def _entry(tf: tarfile.TarFile, layer: _Layer, m: tarfile.TarInfo) -> None:
    rel = _clean(m.name, "entry")
    if not rel:
        return                                   # "./": the layer root is ours
    parent, _, base = rel.rpartition("/")
    if base.startswith(WH_PREFIX):
        layer.ensure_dir(parent, m.name)
        if base == OPAQUE:
            layer.opaque(parent)
        elif not base.startswith(WH_PREFIX + WH_PREFIX):   # .wh..wh.plnk etc.: aufs bookkeeping
            name = base[len(WH_PREFIX):]
            if name in ("", ".", ".."):
                raise LayerRefused(f"entry {m.name!r}: whiteout of nothing")
            layer.whiteout(f"{parent}/{name}" if parent else name)
        return
    if m.ischr() or m.isblk():
        layer.dropped.append(m.name)             # SPEC §11: devices are dropped
        return
    if not (m.isreg() or m.isdir() or m.issym() or m.islnk() or m.isfifo()):
        layer.dropped.append(m.name)
        return
    layer.ensure_dir(parent, m.name)
    layer.clear(rel, keep_dir=m.isdir())
    if m.islnk():
        target = _clean(m.linkname, f"hardlink {m.name!r} ->")
        tparent = target.rpartition("/")[0]
        if not target:
            raise LayerRefused(f"hardlink {m.name!r}: to the layer root")
        layer.ensure_dir(tparent, m.name)
        try:
            st = os.lstat(layer.abs(target))
        except FileNotFoundError:
            raise LayerRefused(f"hardlink {m.name!r}: target {m.linkname!r} is not in the layer") from None
        if stat.S_ISDIR(st.st_mode):
            raise LayerRefused(f"hardlink {m.name!r}: target {m.linkname!r} is a directory")
        os.link(layer.abs(target), layer.abs(rel), follow_symlinks=False)
        return
    m = m.replace(name=rel, deep=False)
    if m.isdir():
        layer.dirs.add(rel)
    # The checks above are the filter; tarfile writes (file data, sparse
    # files, FIFOs, symlinks, owner, mode with its setuid bits, times).
    tf.extract(m, layer.dest, set_attrs=True, numeric_owner=True, filter=_checked)


def _checked(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """The extraction filter: everything was checked by _entry; this only
    makes sure tarfile's own defaults never change (no high-bit stripping)."""
    return member
