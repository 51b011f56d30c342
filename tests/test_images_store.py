"""The image store (SPEC §11 "Store"): one download per blob for concurrent
pulls (one runtime, and two sharing a store), a pull killed with SIGKILL
halfway, gc of its debris, remove/prune against sandboxes in use, and images
with more layers than one overlay option page holds."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

import imagekit as ik
import sandbox
from helpers import run


@pytest.fixture(scope="module")
def registry():
    reg = ik.Registry()
    yield reg
    reg.stop()


def big_layer(n_files: int, size: int, seed: int) -> list[dict]:
    import random
    rnd = random.Random(seed)
    return [{"name": f"data{seed}", "type": "dir"}] + [
        {"name": f"data{seed}/f{i}", "data": rnd.randbytes(size)} for i in range(n_files)]


@run
async def test_concurrent_pulls_download_each_blob_once(registry, tmp_path):
    img = ik.build([ik.busybox_layer(), big_layer(8, 256 << 10, 1), big_layer(8, 256 << 10, 2)])
    registry.push("team/conc", "1", img)
    ref = f"{registry.host}/team/conc:1"
    store = str(tmp_path / "store")
    rt1 = sandbox.Runtime(insecure_registries=[registry.host], image_store=store)
    rt2 = sandbox.Runtime(insecure_registries=[registry.host], image_store=store)
    results = await asyncio.gather(rt1.pull(ref), rt1.pull(ref), rt2.pull(ref), rt2.pull(ref))
    assert len({r.digest for r in results}) == 1
    for blob in img.blobs:
        assert registry.count(rf"/v2/team/conc/blobs/{ik.sha(blob)} ") == 1, ik.sha(blob)
    assert len(os.listdir(os.path.join(store, "layers"))) == 3
    assert os.listdir(os.path.join(store, "tmp")) == []


PULLER = r"""
import asyncio, sys, sandbox
async def main():
    rt = sandbox.Runtime(state_dir=sys.argv[1], insecure_registries=[sys.argv[2]])
    def progress(phase, digest, done, total, secs):
        if phase == sys.argv[4] and digest == sys.argv[5] and done > 0:
            print("halfway", flush=True)
    await rt.pull(sys.argv[3], progress=progress)
asyncio.run(main())
"""


@pytest.mark.timeout(120)
@run
async def test_sigkill_halfway_then_pull_again_and_gc(registry, tmp_path):
    img = ik.build([ik.busybox_layer(), big_layer(64, 256 << 10, 3)], compress="gzip")
    registry.push("team/kill", "1", img)
    ref = f"{registry.host}/team/kill:1"
    state = str(tmp_path / "state")
    store = os.path.join(state, "images")
    for phase in ("download", "unpack"):
        # halfway through the big layer (the small one may finish before the kill lands)
        p = subprocess.Popen([sys.executable, "-c", PULLER, state, registry.host, ref, phase,
                              ik.sha(img.blobs[2])],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            assert p.stdout.readline() == b"halfway\n"
        finally:
            p.kill()
            p.wait()
            p.stdout.close()
        debris = os.listdir(os.path.join(store, "tmp"))
        assert debris, phase
        rt = sandbox.Runtime(state_dir=state, insecure_registries=[registry.host])
        assert rt.images() == []            # nothing of the dead pull is trusted
        # a new pull works beside the debris
        pulled = await rt.pull(ref)
        assert pulled.layers == tuple(img.diff_ids)
        # `sandbox gc` removes the dead pull's temporaries, not the image
        r = subprocess.run([sys.executable, "-m", "sandbox", "--state-dir", state, "gc"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "image-debris" in r.stdout
        assert os.listdir(os.path.join(store, "tmp")) == []
        assert [i.ref for i in rt.images()] == [ref]
        if phase == "download":
            await rt.remove_image(ref)
    async with sandbox.Runtime(state_dir=state, insecure_registries=[registry.host]) as rt:
        box = rt.sandbox(image=ref)
        await box.start()
        o = await (await box.exec(["ls", "/data3"])).output()
        assert len(o.stdout.split()) == 64


@run
async def test_remove_and_prune_respect_running_sandboxes(registry, tmp_path):
    base = ik.busybox_layer()
    a = ik.build([base, [{"name": "a", "data": b"a"}]])
    b = ik.build([base, [{"name": "b", "data": b"b"}]])
    registry.push("team/pa", "1", a)
    registry.push("team/pb", "1", b)
    ra, rb = f"{registry.host}/team/pa:1", f"{registry.host}/team/pb:1"
    store = str(tmp_path / "store")
    async with sandbox.Runtime(insecure_registries=[registry.host], image_store=store) as rt:
        await rt.pull(ra)
        await rt.pull(rb)
        assert len(os.listdir(os.path.join(store, "layers"))) == 3
        box = rt.sandbox(image=ra)
        await box.start()
        with pytest.raises(sandbox.ImageError) as ei:
            await rt.remove_image(ra)
        assert ei.value.kind == "in-use"
        with pytest.raises(sandbox.ImageError):
            await rt.remove_image(f"{registry.host}/team/none:1")
        assert await rt.prune_images() == [rb]
        assert [i.ref for i in rt.images()] == [ra]
        assert len(os.listdir(os.path.join(store, "layers"))) == 2
        o = await (await box.exec(["cat", "/a"])).output()
        assert o.stdout == b"a"
        await box.destroy()
        assert await rt.remove_image(ra) == [ra]
        for d in ("layers", "l", "images", "refs", "blobs/sha256"):
            assert os.listdir(os.path.join(store, d)) == [], d


@pytest.mark.timeout(120)
@run
async def test_many_layers_beyond_one_option_page(tmp_path):
    n = 160
    layers = [ik.busybox_layer()] + [[{"name": f"f{i:03d}", "data": str(i).encode()}]
                                     for i in range(1, n)]
    layers.append([{"name": "f001", "data": b"top"}])
    img = ik.build(layers, compress="none")
    long_dir = tmp_path / ("x" * 60)
    ref = ik.write_layout(str(long_dir / "layout"), img)
    store = str(long_dir / "store")
    async with sandbox.Runtime(image_store=store) as rt:
        box = rt.sandbox(image=ref)
        await box.start()
        o = await (await box.exec(["sh", "-c", "ls / | grep -c '^f'; cat /f001 /f159"])).output()
        assert o.stdout.decode().split() == [str(n - 1), "top159"], o
        from sandbox.images.plan import lowerdir_ops
        ops, _ = lowerdir_ops("/s", rt._images.store.lowerdirs(box._image), 64)
        assert ops, "the layers did not need grouping: make the test bigger"
