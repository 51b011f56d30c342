#!/usr/bin/env python3
"""Images bench (SPEC §11), one run, against a local registry on 127.0.0.1:

  1. cold pull + unpack of a generated ~200 MB, 5-layer image, next to
     `skopeo copy` + `umoci unpack` of the same image (ratio, goal <= 1.0);
  2. warm start from the cached image vs the default rootfs (added start
     time, goal <= 1 ms; medians);
  3. 100 sandboxes from one image share the layer dirs: the store's disk use
     does not grow with N.

Run as root under the test lock (it makes sandboxes):
    flock /tmp/sbx-test.lock python3 scripts/bench_images.py [--mb 200] [--n 100]
Needs: docker-registry, skopeo, umoci (apt; scripts/install.sh installs them).
"""
from __future__ import annotations

import argparse
import asyncio
import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

import httpx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import sandbox  # noqa: E402


def sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


class Registry:
    def __init__(self, root: str):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{s.getsockname()[1]}"
        s.close()
        cfg = os.path.join(root, "config.yml")
        with open(cfg, "w") as f:
            f.write(f"version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: true\n"
                    f"storage:\n  filesystem:\n    rootdirectory: {root}/data\n"
                    f"http:\n  addr: {self.host}\n  secret: bench\n")
        self.proc = subprocess.Popen(["docker-registry", "serve", cfg], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        ready = threading.Event()

        def pump():
            for line in self.proc.stdout:
                if b"listening on" in line:
                    ready.set()
        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(30):
            raise SystemExit("registry did not start")

    def push(self, repo: str, tag: str, blobs: list[bytes], manifest: bytes, media: str):
        url = f"http://{self.host}/v2/{repo}"
        with httpx.Client(timeout=120) as c:
            for b in blobs:
                r = c.post(f"{url}/blobs/uploads/")
                loc = r.headers["location"]
                loc = (f"http://{self.host}{loc}" if loc.startswith("/") else loc)
                loc += ("&" if "?" in loc else "?") + "digest=" + sha(b)
                assert c.put(loc, content=b).status_code == 201
            r = c.put(f"{url}/manifests/{tag}", content=manifest, headers={"Content-Type": media})
            assert r.status_code == 201, r.text

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def make_image(total_mb: int, layers: int = 5):
    """Layers of files of mixed sizes (some compressible text, mostly random)."""
    import random
    rnd = random.Random(42)
    blobs, diffs, descs = [], [], []
    bb = open(shutil.which("busybox"), "rb").read()
    per = total_mb * 1_000_000 // layers
    for li in range(layers):
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
            def add(name, data, mode=0o644):
                ti = tarfile.TarInfo(name)
                ti.size, ti.mode, ti.mtime = len(data), mode, 1700000000
                tf.addfile(ti, io.BytesIO(data))
            if li == 0:
                add("bin/busybox", bb, 0o755)
                for a in ("sh", "cat", "ls", "true"):
                    ti = tarfile.TarInfo(f"bin/{a}")
                    ti.type, ti.linkname = tarfile.SYMTYPE, "busybox"
                    tf.addfile(ti)
            left, i = per, 0
            while left > 0:
                size = min(left, rnd.choice((4 << 10, 64 << 10, 1 << 20, 4 << 20)))
                data = rnd.randbytes(size) if i % 4 else (b"line of text %d\n" % i) * (size // 16)
                add(f"l{li}/d{i % 16}/f{i}", data)
                left -= size
                i += 1
        tar = raw.getvalue()
        blob = gzip.compress(tar, compresslevel=1, mtime=0)
        blobs.append(blob)
        diffs.append(sha(tar))
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                      "digest": sha(blob), "size": len(blob)})
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                      "rootfs": {"type": "layers", "diff_ids": diffs}}).encode()
    media = "application/vnd.oci.image.manifest.v1+json"
    man = json.dumps({"schemaVersion": 2, "mediaType": media,
                      "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                 "digest": sha(cfg), "size": len(cfg)},
                      "layers": descs}).encode()
    return [cfg] + blobs, man, media, sum(len(b) for b in blobs)


def du(path: str) -> int:
    out = subprocess.run(["du", "-s", "-B1", path], capture_output=True, text=True).stdout
    return int(out.split()[0])


def drop_caches() -> None:
    subprocess.run(["sync"])
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


async def bench(args, work: str, reg: Registry, ref: str) -> dict:
    res = {}
    # 1. cold pull: ours, then skopeo copy + umoci unpack, alternating, best of R
    ours, peers = [], []
    for r in range(args.rounds):
        store = os.path.join(work, f"store{r}")
        drop_caches()
        rt = sandbox.Runtime(image_store=store, insecure_registries=[reg.host])
        t0 = time.perf_counter()
        await rt.pull(ref)
        ours.append(time.perf_counter() - t0)
        oci, bundle = os.path.join(work, f"oci{r}"), os.path.join(work, f"bundle{r}")
        drop_caches()
        t0 = time.perf_counter()
        subprocess.run(["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false", "-q",
                        f"docker://{ref}", f"oci:{oci}:bench"], check=True)
        subprocess.run(["umoci", "unpack", "--image", f"{oci}:bench", bundle], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        peers.append(time.perf_counter() - t0)
        shutil.rmtree(oci)
        shutil.rmtree(bundle)
        if r:
            shutil.rmtree(store)
    res["cold_pull_s"] = round(min(ours), 3)
    res["skopeo_umoci_s"] = round(min(peers), 3)
    res["cold_ratio"] = round(min(ours) / min(peers), 3)

    # 2. warm start: image vs default rootfs (start only; destroy outside the timing)
    store = os.path.join(work, "store0")
    async with sandbox.Runtime(image_store=store, insecure_registries=[reg.host]) as rt:
        times = {"default": [], "image": []}
        for i in range(args.starts):
            for kind in ("default", "image"):
                box = rt.sandbox(image=ref if kind == "image" else None)
                t0 = time.perf_counter()
                await box.start()
                times[kind].append(time.perf_counter() - t0)
                await box.destroy()
        d, m = statistics.median(times["default"]), statistics.median(times["image"])
        res["start_default_ms"] = round(d * 1000, 2)
        res["start_image_ms"] = round(m * 1000, 2)
        res["start_added_ms"] = round((m - d) * 1000, 2)

        # 3. N sandboxes share the layer dirs
        before = du(store)
        boxes = [rt.sandbox(image=ref) for _ in range(args.n)]
        for b in boxes:
            await b.start()
        running = sum(b.running for b in boxes)
        # each writes a little: into its own upper (tmpfs), never the store
        await asyncio.gather(*[(await b.exec(["sh", "-c", "echo x > /written"])).output()
                               for b in boxes])
        during = du(store)
        await asyncio.gather(*(b.destroy() for b in boxes))
        res["n_sandboxes"] = running
        res["store_bytes_before"] = before
        res["store_bytes_with_n"] = during
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--starts", type=int, default=30)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="sbx-bench-images-", dir="/var/tmp")
    reg = Registry(work)
    try:
        blobs, man, media, size = make_image(args.mb)
        reg.push("bench/app", "1", blobs, man, media)
        ref = f"{reg.host}/bench/app:1"
        res = asyncio.run(bench(args, work, reg, ref))
        res["image_compressed_mb"] = round(size / 1e6, 1)
        print(json.dumps(res, indent=2))
        print(f"cold pull+unpack {res['cold_pull_s']}s vs skopeo copy + umoci unpack "
              f"{res['skopeo_umoci_s']}s: ratio {res['cold_ratio']} (goal <= 1.0)")
        print(f"warm start: image {res['start_image_ms']} ms vs default rootfs "
              f"{res['start_default_ms']} ms: added {res['start_added_ms']} ms (goal <= 1 ms)")
        print(f"{res['n_sandboxes']} sandboxes from one image: store {res['store_bytes_before']} "
              f"bytes before, {res['store_bytes_with_n']} with them running")
    finally:
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
