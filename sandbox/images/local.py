"""Images in files: an OCI image layout directory and a `docker save` archive.

The paths are the operator's; what is in them is image content, hostile like
a registry's answers: every file read here is opened with O_NONBLOCK (a FIFO
never blocks us), must be a regular file, and is read up to a bound; blob
names are built from validated digests, never from strings in the files.
Copies run in a thread (disk reads must not stall the event loop); the store
verifies each blob's digest and size as it arrives.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import posixpath
import stat
import tarfile

from ..errors import ImageError
from . import manifest as mf
from .reference import Reference

_CHUNK = 1 << 20
REF_NAME = "org.opencontainers.image.ref.name"


def _open_regular(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise IsADirectoryError(0, "not a regular file", path)
    return fd


def _read_small(path: str, limit: int) -> bytes:
    fd = _open_regular(path)
    try:
        data = b""
        while len(data) <= limit:
            c = os.read(fd, limit + 1 - len(data))
            if not c:
                break
            data += c
    finally:
        os.close(fd)
    if len(data) > limit:
        raise OSError(0, f"larger than {limit} bytes", path)
    return data


def _copy_range(fd: int, offset: int, size: int, sink) -> None:
    left = size
    while left > 0:
        c = os.pread(fd, min(_CHUNK, left), offset)
        if not c:
            break
        sink(c)
        offset += len(c)
        left -= len(c)


class LayoutSource:
    """oci-layout:DIR[:TAG] — as skopeo, buildah and umoci write it."""

    def __init__(self, ref: Reference):
        self.ref = ref
        self.dir = ref.path
        self.requests: list[str] = []

    async def aclose(self) -> None:
        pass

    def _fail(self, why: str, kind: str = "not-found") -> ImageError:
        return ImageError(self.ref.given, why, kind)

    def _blob_path(self, digest: str) -> str:
        return os.path.join(self.dir, "blobs", "sha256", digest.split(":", 1)[1])

    def _doc(self, path: str, what: str) -> bytes:
        try:
            return _read_small(path, mf.MAX_MANIFEST)
        except FileNotFoundError:
            raise self._fail(f"{what} not found in the layout ({path})") from None
        except OSError as e:
            raise self._fail(f"cannot read {what} {path}: {e.strerror or e}", "refused") from None

    async def manifest(self) -> tuple[mf.Manifest, bytes]:
        return await asyncio.to_thread(self._manifest)

    def _manifest(self) -> tuple[mf.Manifest, bytes]:
        if not os.path.isdir(self.dir):
            raise self._fail(f"no such OCI layout directory {self.dir}")
        index = self._doc(os.path.join(self.dir, "index.json"), "index.json")
        _, doc = mf.load(self.ref.given, index)
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise self._fail("index.json has no manifests", "refused")
        descs = [mf.descriptor(self.ref.given, m, "index entry") for m in entries[:4096]]
        tag = self.ref.tag
        if tag is not None:
            descs = [d for d in descs if dict(d.annotations).get(REF_NAME) == tag]
            if not descs:
                raise self._fail(f"no image tagged {tag!r} in the layout")
        elif len(descs) != 1:
            raise self._fail(f"the layout holds {len(descs)} images: name one with :TAG")
        want = descs[0]
        for _ in range(3):
            data = self._verified(want)
            mt, doc = mf.load(self.ref.given, data, want.media_type)
            if mt in mf.MANIFESTS:
                return mf.manifest(self.ref.given, want.digest, mt, doc), data
            want = mf.pick_platform(self.ref.given, doc)
        raise self._fail("index nested too deep", "refused")

    def _verified(self, d: mf.Descriptor) -> bytes:
        data = self._doc(self._blob_path(d.digest), f"manifest {d.digest}")
        got = "sha256:" + hashlib.sha256(data).hexdigest()
        if got != d.digest or len(data) != d.size:
            raise self._fail(f"digest mismatch for {d.digest}: content is {got}, {len(data)} bytes",
                             "digest")
        return data

    async def fetch(self, desc: mf.Descriptor, sink) -> None:
        await asyncio.to_thread(self._copy, desc, sink)

    def _copy(self, desc: mf.Descriptor, sink) -> None:
        path = self._blob_path(desc.digest)
        try:
            fd = _open_regular(path)
        except FileNotFoundError:
            raise self._fail(f"blob {desc.digest} is missing from the layout") from None
        except OSError as e:
            raise self._fail(f"blob {desc.digest}: {e.strerror or e}", "refused") from None
        try:
            _copy_range(fd, 0, desc.size + 1, sink)     # +1: a longer file is caught by the store
        finally:
            os.close(fd)


class ArchiveSource:
    """docker-archive:FILE — the tar `docker save` writes (manifest.json, a
    config named by its digest, one uncompressed tar per layer). Layers carry
    no digest there: each is checked against its diff-id from the config,
    whose own digest is its file name."""

    def __init__(self, ref: Reference):
        self.ref = ref
        self.path = ref.path
        self.requests: list[str] = []
        self._members: dict[str, tarfile.TarInfo] = {}
        self._blobs: dict[str, tarfile.TarInfo] = {}     # digest -> member

    async def aclose(self) -> None:
        pass

    def _fail(self, why: str, kind: str = "not-found") -> ImageError:
        return ImageError(self.ref.given, why, kind)

    async def manifest(self) -> tuple[mf.Manifest, bytes]:
        return await asyncio.to_thread(self._manifest)

    def _member(self, name: str) -> tarfile.TarInfo:
        name = posixpath.normpath(name).lstrip("/")
        for _ in range(16):
            m = self._members.get(name)
            if m is None:
                raise self._fail(f"{name!r} is missing from the archive", "refused")
            if m.isreg() and not m.issparse():
                return m
            if m.issym():
                name = posixpath.normpath(posixpath.join(posixpath.dirname(name), m.linkname)).lstrip("/")
            elif m.islnk():
                name = posixpath.normpath(m.linkname).lstrip("/")
            else:
                break
        raise self._fail(f"{name!r} in the archive is not a regular file", "refused")

    def _read_member(self, m: tarfile.TarInfo, limit: int) -> bytes:
        if m.size > limit:
            raise self._fail(f"{m.name!r} is larger than {limit} bytes", "refused")
        fd = _open_regular(self.path)
        try:
            return os.pread(fd, m.size, m.offset_data)
        finally:
            os.close(fd)

    def _manifest(self) -> tuple[mf.Manifest, bytes]:
        try:
            fd = _open_regular(self.path)
        except FileNotFoundError:
            raise self._fail(f"no such archive {self.path}") from None
        except OSError as e:
            raise self._fail(f"cannot read {self.path}: {e.strerror or e}", "refused") from None
        try:
            with os.fdopen(os.dup(fd), "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
                for m in tf:
                    self._members[posixpath.normpath(m.name).lstrip("/")] = m
                    tf.members.clear()
        except tarfile.TarError as e:
            raise self._fail(f"not a docker-archive ({e})", "refused") from None
        finally:
            os.close(fd)
        data = self._read_member(self._member("manifest.json"), mf.MAX_MANIFEST)
        try:
            doc = json.loads(data)
            entry = doc[0]
            cfg_name, layer_names = entry["Config"], entry["Layers"]
            if not isinstance(cfg_name, str) or not all(isinstance(x, str) for x in layer_names):
                raise TypeError
        except (ValueError, TypeError, KeyError, IndexError, UnicodeDecodeError):
            raise self._fail("manifest.json is not a docker-archive manifest", "refused") from None
        # The config's digest is its name ("<hex>.json" or "blobs/sha256/<hex>").
        hexname = posixpath.basename(cfg_name).removesuffix(".json")
        cfg_digest = mf.check_digest(self.ref.given, f"sha256:{hexname}", "config")
        cm = self._member(cfg_name)
        cfg_data = self._read_member(cm, 8 << 20)
        got = "sha256:" + hashlib.sha256(cfg_data).hexdigest()
        if got != cfg_digest:
            raise self._fail(f"digest mismatch for config {cfg_digest}: content is {got}", "digest")
        from .image import parse_config
        _, diff_ids, _ = parse_config(self.ref.given, cfg_data)
        if len(diff_ids) != len(layer_names):
            raise self._fail("manifest.json and the config disagree on the layers", "refused")
        self._blobs[cfg_digest] = cm
        layers = []
        for name, diff in zip(layer_names, diff_ids):
            m = self._member(name)
            self._blobs[diff] = m
            layers.append(mf.Descriptor("application/vnd.docker.image.rootfs.diff.tar", diff, m.size))
        config = mf.Descriptor("application/vnd.docker.container.image.v1+json", cfg_digest, cm.size)
        return mf.Manifest(cfg_digest, "docker-archive", config, tuple(layers)), data

    async def fetch(self, desc: mf.Descriptor, sink) -> None:
        m = self._blobs.get(desc.digest)
        if m is None:
            raise self._fail(f"blob {desc.digest} is not in the archive", "refused")
        await asyncio.to_thread(self._copy, m, sink)

    def _copy(self, m: tarfile.TarInfo, sink) -> None:
        fd = _open_regular(self.path)
        try:
            _copy_range(fd, m.offset_data, m.size, sink)
        finally:
            os.close(fd)
