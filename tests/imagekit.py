"""Test kit for images: a real registry (Debian's docker-registry, the CNCF
distribution server) on 127.0.0.1, and images built here from the host's
static busybox and small files, pushed through the registry's HTTP API.

The registry runs detached from pytest (its parent is a shell that exits at
once), so the leak guard's child-process snapshot does not see it; its
stdout (the access log) comes to us through a pipe, read by a thread: that
is how readiness is known ("listening on") and how requests are counted.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import threading
import time

import httpx

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
APPLETS = ("sh", "ls", "cat", "echo", "id", "pwd", "sleep", "touch", "rm", "mkdir", "test",
           "env", "true", "false", "head", "wc", "stat", "readlink", "find", "mknod", "ln")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Registry:
    def __init__(self, htpasswd: str | None = None):
        self.dir = tempfile.mkdtemp(prefix="sbx-registry-")
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.lines: list[str] = []
        self._cond = threading.Condition()
        auth = ""
        if htpasswd:
            auth = f"auth:\n  htpasswd:\n    realm: test\n    path: {htpasswd}\n"
        cfg = os.path.join(self.dir, "config.yml")
        with open(cfg, "w") as f:
            f.write(f"version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n"
                    f"    rootdirectory: {self.dir}/data\n  delete:\n    enabled: true\n"
                    f"http:\n  addr: {self.host}\n  secret: test\n{auth}")
        r, w = os.pipe()
        # The registry writes its logs into w; the shell prints its pid on
        # stderr and exits, so the registry is nobody's child of ours.
        sh = subprocess.Popen(["sh", "-c", 'docker-registry serve "$1" 2>&1 & echo $! >&2', "sh", cfg],
                              stdout=w, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        os.close(w)
        self.pid = int(sh.stderr.read().strip())
        sh.wait()
        sh.stderr.close()
        self._r = r
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()
        self.wait_for(lambda: any("listening on" in x for x in self.lines), 20)

    def _pump(self) -> None:
        buf = b""
        while True:
            data = os.read(self._r, 65536)
            if not data:
                break
            buf += data
            *lines, buf = buf.split(b"\n")
            with self._cond:
                self.lines.extend(x.decode(errors="replace") for x in lines)
                self._cond.notify_all()
        os.close(self._r)

    def wait_for(self, pred, timeout: float) -> None:
        with self._cond:
            if not self._cond.wait_for(pred, timeout):
                raise RuntimeError("registry: " + "\n".join(self.lines[-20:]))

    def count(self, pattern: str) -> int:
        """Access-log lines (GET) matching a regex."""
        rx = re.compile(pattern)
        with self._cond:
            return sum(1 for x in self.lines if '] "GET ' in x and rx.search(x))

    def stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._thread.join(10)
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- pushing through the registry's HTTP API --------------------------------
    def push_blob(self, repo: str, data: bytes, auth=None) -> str:
        d = sha(data)
        with httpx.Client(auth=auth) as c:
            r = c.post(f"{self.url}/v2/{repo}/blobs/uploads/")
            assert r.status_code == 202, r.text
            loc = r.headers["location"]
            if loc.startswith("/"):
                loc = self.url + loc
            loc += ("&" if "?" in loc else "?") + "digest=" + d
            r = c.put(loc, content=data, headers={"Content-Type": "application/octet-stream"})
            assert r.status_code == 201, r.text
        return d

    def push_manifest(self, repo: str, ref: str, data: bytes, media: str, auth=None) -> str:
        with httpx.Client(auth=auth) as c:
            r = c.put(f"{self.url}/v2/{repo}/manifests/{ref}", content=data,
                      headers={"Content-Type": media})
            assert r.status_code == 201, r.text
        return sha(data)

    def push(self, repo: str, tag: str, image: "Built", auth=None) -> str:
        for blob in image.blobs:
            self.push_blob(repo, blob, auth)
        return self.push_manifest(repo, tag, image.manifest, image.media, auth)


# -- building images ---------------------------------------------------------------------

def tar_layer(entries, compress: str = "gzip") -> tuple[bytes, bytes]:
    """(blob, uncompressed tar). entries: list of dicts with name, type
    ('file','dir','symlink','hardlink','char','fifo'), data, mode, target,
    uid, gid, dev (major, minor)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            ti = tarfile.TarInfo(e["name"])
            ti.mode = e.get("mode", 0o755 if e.get("type") in ("dir",) else 0o644)
            ti.uid, ti.gid = e.get("uid", 0), e.get("gid", 0)
            ti.mtime = 1700000000
            kind = e.get("type", "file")
            data = e.get("data", b"")
            if kind == "file":
                ti.type = tarfile.REGTYPE
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
                continue
            ti.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
                       "hardlink": tarfile.LNKTYPE, "char": tarfile.CHRTYPE,
                       "block": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}[kind]
            ti.linkname = e.get("target", "")
            if "dev" in e:
                ti.devmajor, ti.devminor = e["dev"]
            tf.addfile(ti)
    tar = raw.getvalue()
    if compress == "gzip":
        return gzip.compress(tar, compresslevel=1, mtime=0), tar
    if compress == "zstd":
        import zstandard
        return zstandard.ZstdCompressor().compress(tar), tar
    return tar, tar


LAYER_MEDIA = {"gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
               "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
               "none": "application/vnd.oci.image.layer.v1.tar"}


def busybox_layer() -> list[dict]:
    with open(BUSYBOX, "rb") as f:
        bb = f.read()
    out = [{"name": "bin", "type": "dir"}, {"name": "bin/busybox", "data": bb, "mode": 0o755},
           {"name": "etc", "type": "dir"},
           {"name": "etc/passwd", "data": b"root:x:0:0:root:/root:/bin/sh\n"
                                          b"app:x:1000:1000:app:/home/app:/bin/sh\n"
                                          b"nobody:x:65534:65534:nobody:/:/bin/false\n"},
           {"name": "etc/group", "data": b"root:x:0:\napp:x:1000:\nstaff:x:50:app\n"},
           {"name": "tmp", "type": "dir", "mode": 0o1777},
           {"name": "home", "type": "dir"}, {"name": "home/app", "type": "dir", "uid": 1000}]
    out += [{"name": f"bin/{a}", "type": "symlink", "target": "busybox"} for a in APPLETS]
    return out


class Built:
    def __init__(self, blobs, manifest: bytes, media: str, config: bytes, layers, diff_ids):
        self.blobs, self.manifest, self.media = blobs, manifest, media
        self.config, self.layers, self.diff_ids = config, layers, diff_ids

    @property
    def digest(self) -> str:
        return sha(self.manifest)


def build(layers: list[list[dict]], config: dict | None = None, compress: str = "gzip",
          docker: bool = False, raw_layers: list[tuple[bytes, bytes]] | None = None) -> Built:
    made = raw_layers if raw_layers is not None else [tar_layer(e, compress) for e in layers]
    diff_ids = [sha(tar) for _, tar in made]
    cfg = {"architecture": "amd64", "os": "linux", "config": config or {},
           "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    cfg_bytes = json.dumps(cfg).encode()
    if docker:
        media = DOCKER_MANIFEST
        cmedia, lmedia = ("application/vnd.docker.container.image.v1+json",
                          "application/vnd.docker.image.rootfs.diff.tar.gzip")
    else:
        media = OCI_MANIFEST
        cmedia, lmedia = "application/vnd.oci.image.config.v1+json", LAYER_MEDIA[compress]
    man = {"schemaVersion": 2, "mediaType": media,
           "config": {"mediaType": cmedia, "digest": sha(cfg_bytes), "size": len(cfg_bytes)},
           "layers": [{"mediaType": lmedia, "digest": sha(b), "size": len(b)} for b, _ in made]}
    return Built([cfg_bytes] + [b for b, _ in made], json.dumps(man).encode(), media,
                 cfg_bytes, made, diff_ids)


def skopeo(*args: str) -> None:
    r = subprocess.run(["skopeo", "--insecure-policy", *args], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr


def wait_fd(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def deadline(seconds: float):
    end = time.monotonic() + seconds
    return lambda: time.monotonic() < end


def write_layout(path: str, image: Built, tag: str = "v1") -> str:
    """An OCI image layout written by hand (as skopeo would): oci-layout:PATH:TAG."""
    blobs = os.path.join(path, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)
    for b in image.blobs + [image.manifest]:
        with open(os.path.join(blobs, sha(b).split(":")[1]), "wb") as f:
            f.write(b)
    with open(os.path.join(path, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion": "1.0.0"}')
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": image.media, "digest": image.digest, "size": len(image.manifest),
        "annotations": {"org.opencontainers.image.ref.name": tag}}]}
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump(index, f)
    return f"oci-layout:{path}:{tag}"
