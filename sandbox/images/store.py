"""The content-addressed image store (SPEC §11 "Store").

    <root>/blobs/sha256/<hex>      verified blobs (layers as pulled, configs, manifests)
    <root>/layers/<diffhex>/fs     one unpacked layer, by diff-id; meta.json beside it
    <root>/l/<short>               -> ../layers/<diffhex>/fs: short overlay lowerdir names
    <root>/images/<hex>.json       an image record (by manifest digest)
    <root>/refs/<hash>.json        a name -> image digest
    <root>/tmp/                    work in progress: blob-<hex>.*, layer-<hex>.*
    <root>/locks/                  flock files

Trust comes from renames: a blob is written under tmp/, its size and digest
checked, then renamed into blobs/; a layer is unpacked under tmp/, its
diff-id checked, then renamed into layers/; a record is written last, once
every layer it names is there. A pull killed at any point leaves only tmp/
entries (and at most a dangling l/ link), which no later pull reads and gc
removes. Work on one blob or layer is done once: in-process callers share one
task, other processes wait on the key's flock and then find it done. Every
pull holds the store lock shared; remove/prune take it exclusive, so nothing
is deleted under a pull. A sandbox holds use-<digest> shared while it runs:
what prune may drop is what no one holds.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import shutil
import threading
import time

from ..errors import ImageError
from . import locks, merged
from . import manifest as mf
from .image import MAX_CONFIG, Image, ImageConfig, parse_config
from .local import ArchiveSource, LayoutSource
from .reference import DOCKER_ARCHIVE, OCI_LAYOUT, Reference, parse
from .unpack import LayerRefused, unpack

DIRS = ("blobs/sha256", "layers", "l", "images", "refs", "tmp", "locks")
DEFAULT_MAX_LAYER = 8 << 30
LAYER_CONCURRENCY = 4


def _hex(digest: str) -> str:
    return digest.split(":", 1)[1]


def write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.{secrets.token_hex(4)}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, path)


class ImageStore:
    def __init__(self, root: str, *, insecure: frozenset[str] = frozenset(),
                 credentials: dict | None = None, max_layer_bytes: int = DEFAULT_MAX_LAYER,
                 timeout: float = 30.0):
        self.root = root
        self.insecure = insecure
        self.credentials = credentials or {}
        self.max_layer_bytes = max_layer_bytes
        self.timeout = timeout
        self._inflight: dict[str, asyncio.Future] = {}
        self._made = False
        self.last_requests: list[str] = []     # the last pull's requests (tests, bench)

    # -- paths -------------------------------------------------------------------
    def p(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def ensure(self) -> None:
        if self._made:
            return
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        os.chmod(self.root, 0o700)        # setuid files inside: no host user may reach them
        for d in DIRS:
            os.makedirs(self.p(d), mode=0o700, exist_ok=True)
        self._made = True

    def blob_path(self, digest: str) -> str:
        return self.p("blobs", "sha256", _hex(digest))

    def layer_dir(self, diff_id: str) -> str:
        return self.p("layers", _hex(diff_id))

    def _layer_ready(self, diff_id: str) -> bool:
        return os.path.isfile(os.path.join(self.layer_dir(diff_id), "meta.json"))

    def _ref_path(self, name: str) -> str:
        return self.p("refs", hashlib.sha256(name.encode()).hexdigest()[:40] + ".json")

    # -- reading -------------------------------------------------------------------
    def record(self, digest: str) -> dict | None:
        try:
            with open(self.p("images", _hex(digest) + ".json"), "rb") as f:
                return json.loads(f.read())
        except (FileNotFoundError, ValueError, IndexError):
            return None

    def records(self) -> dict[str, dict]:
        out = {}
        try:
            names = os.listdir(self.p("images"))
        except FileNotFoundError:
            return out
        for n in names:
            if n.endswith(".json") and len(n) == 69:
                rec = self.record("sha256:" + n[:-5])
                if rec is not None:
                    out[rec["digest"]] = rec
        return out

    def refs(self) -> dict[str, str]:
        """name -> image digest."""
        out = {}
        try:
            names = os.listdir(self.p("refs"))
        except FileNotFoundError:
            return out
        for n in names:
            if not n.endswith(".json"):
                continue
            try:
                with open(self.p("refs", n), "rb") as f:
                    doc = json.loads(f.read())
                out[doc["name"]] = doc["digest"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return out

    def image(self, rec: dict, name: str) -> Image:
        cfg = ImageConfig.from_json(name, rec.get("config_json"))
        return Image(ref=name, digest=rec["digest"], id=rec["config"],
                     layers=tuple(x["diff_id"] for x in rec["layers"]), size=rec.get("size", 0),
                     config=cfg, created=rec.get("created", 0.0))

    def get(self, ref: Reference) -> Image | None:
        """The stored image for ref, if every layer of it is present."""
        digest = self.refs().get(ref.name)
        if digest is None and ref.digest is not None:
            digest = ref.digest
        rec = self.record(digest) if digest else None
        if rec is None or not all(self._layer_ready(x["diff_id"]) for x in rec["layers"]):
            return None
        return self.image(rec, ref.name)

    def lowerdirs(self, image: Image) -> list[str]:
        """Short overlay names of the image's layers, top first, each once
        (a layer repeated lower down is shadowed by its own top copy)."""
        out, seen = [], set()
        for diff in reversed(image.layers):
            if diff in seen:
                continue
            seen.add(diff)
            with open(os.path.join(self.layer_dir(diff), "meta.json"), "rb") as f:
                out.append(self.p("l", json.loads(f.read())["link"]))
        return out

    def etc_users(self, image: Image) -> tuple[str, str]:
        rec = self.record(image.digest) or {}
        return rec.get("passwd", ""), rec.get("group", "")

    # -- in-process sharing ------------------------------------------------------------
    async def _once(self, key: str, make):
        fut = self._inflight.get(key)
        if fut is None:
            fut = asyncio.ensure_future(make())
            self._inflight[key] = fut

            def done(f, key=key):
                if self._inflight.get(key) is f:
                    del self._inflight[key]
                if not f.cancelled():
                    f.exception()        # retrieved: waiters got it
            fut.add_done_callback(done)
        return await asyncio.shield(fut)

    # -- pulling ------------------------------------------------------------------------
    def _source(self, ref: Reference):
        if ref.kind == OCI_LAYOUT:
            return LayoutSource(ref)
        if ref.kind == DOCKER_ARCHIVE:
            return ArchiveSource(ref)
        from .registry import RegistrySource
        return RegistrySource(ref, insecure=ref.host in self.insecure or ref.api_host in self.insecure,
                              credentials=self.credentials.get(ref.host), timeout=self.timeout)

    async def pull(self, ref, progress=None) -> Image:
        ref = parse(ref)
        self.ensure()
        return await self._once("pull:" + ref.name, lambda: self._pull(ref, progress))

    async def _pull(self, ref: Reference, progress) -> Image:
        store_fd = await locks.lock(self.p("locks", "store"), shared=True)
        src = self._source(ref)
        try:
            man, man_bytes = await src.manifest()
            rec = self.record(man.digest)
            if rec is None or not all(self._layer_ready(x["diff_id"]) for x in rec["layers"]):
                rec = await self._fetch_image(ref, src, man, man_bytes, progress)
            write_atomic(self._ref_path(ref.name),
                         json.dumps({"name": ref.name, "digest": rec["digest"]}).encode())
        finally:
            self.last_requests = list(src.requests)
            await src.aclose()
            os.close(store_fd)
        return self.image(rec, ref.name)

    async def _fetch_image(self, ref, src, man: mf.Manifest, man_bytes: bytes, progress) -> dict:
        cfg_path = await self._blob(ref, src, man.config, progress, limit=MAX_CONFIG)
        with open(cfg_path, "rb") as f:
            cfg_data = f.read(MAX_CONFIG + 1)
        config, diff_ids, plat = parse_config(ref.given, cfg_data)
        if plat.get("os") not in (None, "", "linux") or plat.get("architecture") not in (
                None, "", mf.HOST_ARCH):
            raise ImageError(ref.given, f"image is for {plat.get('os')}/{plat.get('architecture')}, "
                                        f"not linux/{mf.HOST_ARCH}", "refused")
        if len(diff_ids) != len(man.layers):
            raise ImageError(ref.given, f"config names {len(diff_ids)} layers, manifest "
                                        f"{len(man.layers)}", "refused")
        if man.media_type != "docker-archive":
            # The manifest itself, by the digest it was verified against.
            path = self.blob_path(man.digest)
            if not os.path.exists(path):
                write_atomic(path, man_bytes)
        sem = asyncio.Semaphore(LAYER_CONCURRENCY)

        async def one(desc, diff):
            async with sem:
                return await self._layer(ref, src, desc, diff, progress)
        sizes = await asyncio.gather(*(one(d, x) for d, x in zip(man.layers, diff_ids)))
        top_first = [os.path.join(self.layer_dir(x), "fs") for x in reversed(diff_ids)]
        passwd, group = await asyncio.to_thread(
            lambda: tuple((merged.read_file(top_first, f"/etc/{n}") or b"").decode("utf-8", "replace")
                          for n in ("passwd", "group")))
        rec = {"digest": man.digest, "media_type": man.media_type, "config": man.config.digest,
               "layers": [{"diff_id": x, "blob": d.digest, "size": s}
                          for d, x, s in zip(man.layers, diff_ids, sizes)],
               "size": sum(sizes), "config_json": config.to_json(), "passwd": passwd,
               "group": group, "created": time.time()}
        write_atomic(self.p("images", _hex(man.digest) + ".json"), json.dumps(rec).encode())
        return rec

    async def _blob(self, ref, src, desc: mf.Descriptor, progress, limit: int | None = None) -> str:
        path = self.blob_path(desc.digest)
        if limit is not None and desc.size > limit:
            raise ImageError(ref.given, f"blob {desc.digest} is {desc.size} bytes (limit {limit})",
                             "refused")
        if self._have_blob(ref, desc):
            return path
        return await self._once("blob:" + desc.digest,
                                lambda: self._download(ref, src, desc, progress))

    def _have_blob(self, ref, desc: mf.Descriptor) -> bool:
        """A stored blob was verified when it was stored; a descriptor that
        gives it another size is lying about it."""
        try:
            size = os.stat(self.blob_path(desc.digest)).st_size
        except FileNotFoundError:
            return False
        if size != desc.size:
            raise ImageError(ref.given, f"digest mismatch: blob {desc.digest} is {size} bytes, "
                                        f"the descriptor says {desc.size}", "digest")
        return True

    async def _download(self, ref, src, desc: mf.Descriptor, progress) -> str:
        path = self.blob_path(desc.digest)
        fd = await locks.lock(self.p("locks", f"blob-{desc.hex}"))
        try:
            if self._have_blob(ref, desc):    # another runtime did it while we waited
                return path
            tmp = self.p("tmp", f"blob-{desc.hex}.{secrets.token_hex(4)}")
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            h = hashlib.sha256()
            got = 0
            t0 = time.monotonic()

            def sink(chunk: bytes) -> None:
                nonlocal got
                got += len(chunk)
                if got > desc.size:
                    raise ImageError(ref.given, f"blob {desc.digest} is larger than its "
                                                f"descriptor's {desc.size} bytes", "digest")
                h.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view):]
                if progress is not None:
                    progress("download", desc.digest, got, desc.size, time.monotonic() - t0)
            try:
                try:
                    await src.fetch(desc, sink)
                finally:
                    os.close(out)
                actual = "sha256:" + h.hexdigest()
                if got != desc.size or actual != desc.digest:
                    raise ImageError(ref.given, f"digest mismatch for blob {desc.digest}: got "
                                                f"{actual} ({got} of {desc.size} bytes)", "digest")
                os.rename(tmp, path)
            except BaseException:
                _remove(tmp)
                raise
            return path
        finally:
            os.close(fd)

    async def _layer(self, ref, src, desc: mf.Descriptor, diff_id: str, progress) -> int:
        if not self._layer_ready(diff_id):
            await self._once("layer:" + diff_id,
                             lambda: self._unpack(ref, src, desc, diff_id, progress))
        with open(os.path.join(self.layer_dir(diff_id), "meta.json"), "rb") as f:
            return json.loads(f.read())["size"]

    def _link_name(self, diff_hex: str) -> str:
        target = f"../layers/{diff_hex}/fs"
        for n in range(8, 65, 4):
            name = diff_hex[:n]
            link = self.p("l", name)
            try:
                if os.readlink(link) == target:
                    return name
            except FileNotFoundError:
                os.symlink(target, link)
                return name
            except OSError:
                pass
        raise ImageError("?", f"no free short name for layer {diff_hex}", "refused")

    async def _unpack(self, ref, src, desc: mf.Descriptor, diff_id: str, progress) -> None:
        dhex = _hex(diff_id)
        fd = await locks.lock(self.p("locks", f"layer-{dhex}"))
        try:
            if self._layer_ready(diff_id):
                return
            blob = await self._blob(ref, src, desc, progress)
            tmp = self.p("tmp", f"layer-{dhex}.{secrets.token_hex(4)}")
            os.mkdir(tmp, 0o700)
            try:
                os.mkdir(os.path.join(tmp, "fs"), 0o755)
                name = self._link_name(dhex)

                stop = threading.Event()

                def report(n: int) -> None:
                    if stop.is_set():
                        raise LayerRefused("pull cancelled")
                    if progress is not None:
                        progress("unpack", desc.digest, n, 0, 0.0)
                job = asyncio.ensure_future(asyncio.to_thread(
                    unpack, blob, os.path.join(tmp, "fs"), self.max_layer_bytes, report))
                try:
                    got, size = await asyncio.shield(job)
                except asyncio.CancelledError:
                    # The thread must be done writing into tmp before it goes.
                    stop.set()
                    await asyncio.wait([job])
                    raise
                except LayerRefused as e:
                    raise ImageError(ref.given, f"layer {desc.digest} refused: {e}", "refused") from None
                if got != diff_id:
                    raise ImageError(ref.given, f"digest mismatch for layer {desc.digest}: "
                                                f"diff-id {got}, config says {diff_id}", "digest")
                write_atomic(os.path.join(tmp, "meta.json"),
                             json.dumps({"link": name, "size": size, "blob": desc.digest}).encode())
                os.rename(tmp, self.layer_dir(diff_id))
            except BaseException:
                await asyncio.to_thread(_remove, tmp)
                raise
        finally:
            os.close(fd)


def _remove(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
