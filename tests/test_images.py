"""Images (SPEC §11): pull from a real registry, an OCI layout and a docker
archive; start and exec; layers, whiteouts, opaque dirs; throw-away writes;
config defaults; the errors."""
from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import threading
import time

import pytest

import imagekit as ik
import sandbox
from helpers import run


@pytest.fixture(scope="module")
def registry():
    reg = ik.Registry()
    yield reg
    reg.stop()


@pytest.fixture
def store(tmp_path):
    return str(tmp_path / "store")


def runtime(registry, store, **kw):
    return sandbox.Runtime(insecure_registries=[registry.host], image_store=store, **kw)


async def out(box, cmd, **kw) -> str:
    o = await (await box.exec(cmd, **kw)).output()
    assert o.exit_code == 0, (cmd, o)
    return o.stdout.decode()


BASE = None


def base_image(**config) -> ik.Built:
    return ik.build([ik.busybox_layer(), [{"name": "hello.txt", "data": b"hello from the image\n"}]],
                    config)


@run
async def test_registry_pull_start_exec(registry, store):
    img = base_image(Env=["FROM_IMAGE=yes", "PATH=/bin"])
    registry.push("team/app", "1.4", img)
    ref = f"{registry.host}/team/app:1.4"
    async with runtime(registry, store) as rt:
        pulled = await rt.pull(ref)
        assert isinstance(pulled, sandbox.Image)
        assert pulled.digest == img.digest and pulled.layers == tuple(img.diff_ids)
        assert [i.ref for i in rt.images()] == [ref]
        box = rt.sandbox("img", image=ref)
        await box.start()
        assert await out(box, ["cat", "/hello.txt"]) == "hello from the image\n"
        env = await out(box, ["env"])
        assert "FROM_IMAGE=yes" in env.split("\n")
        # The runtime's /etc files over the image's, read-only.
        assert "img" in await out(box, ["cat", "/etc/hostname"])
        o = await (await box.exec(["sh", "-c", "echo x > /etc/hosts"])).output()
        assert o.exit_code != 0
        # by digest too
        box2 = rt.sandbox(image=f"{registry.host}/team/app@{img.digest}")
        await box2.start()
        assert await out(box2, ["cat", "/hello.txt"]) == "hello from the image\n"


@run
async def test_oci_layout_and_docker_archive(registry, store, tmp_path):
    img = base_image(Cmd=["sh", "-c", "cat /hello.txt; exit 7"])
    registry.push("team/files", "v1", img)
    src = f"docker://{registry.host}/team/files:v1"
    layout, archive = tmp_path / "layout", tmp_path / "app.tar"
    ik.skopeo("copy", "--src-tls-verify=false", src, f"oci:{layout}:v1")
    ik.skopeo("copy", "--src-tls-verify=false", src, f"docker-archive:{archive}:team/files:v1")
    async with runtime(registry, store) as rt:
        for ref in (f"oci-layout:{layout}:v1", f"docker-archive:{archive}"):
            im = await rt.pull(ref)
            assert im.layers == tuple(img.diff_ids), ref
            box = rt.sandbox(image=ref)
            r, w = os.pipe()
            try:
                await box.start(stdio=(rt._devnull, w, 2))   # the image's Cmd
            finally:
                os.close(w)
            with pytest.raises(sandbox.ContainerExitError) as ei:
                await box.monitor()
            assert ei.value.exit_code == 7
            with os.fdopen(r, "rb") as f:
                assert f.read() == b"hello from the image\n"
        # Same layers: unpacked once, shared.
        assert len(os.listdir(os.path.join(store, "layers"))) == 2


@run
async def test_layers_stack_whiteouts_and_opaque_dirs(registry, store):
    l1 = ik.busybox_layer() + [
        {"name": "data", "type": "dir"}, {"name": "data/keep", "data": b"k1"},
        {"name": "data/gone", "data": b"g"}, {"name": "data/over", "data": b"old"},
        {"name": "opq", "type": "dir"}, {"name": "opq/old1", "data": b"1"},
        {"name": "opq/old2", "data": b"2"}, {"name": "rmdir", "type": "dir"},
        {"name": "rmdir/x", "data": b"x"}]
    l2 = [{"name": "data/.wh.gone", "data": b""}, {"name": "data/over", "data": b"new"},
          {"name": "opq/.wh..wh..opq", "data": b""}, {"name": "opq/fresh", "data": b"f"},
          {"name": ".wh.rmdir", "data": b""}]
    l3 = [{"name": "data/added", "data": b"a"}, {"name": "rmdir", "type": "dir"},
          {"name": "rmdir/y", "data": b"y"}]
    img = ik.build([l1, l2, l3], compress="zstd")
    registry.push("team/layers", "z", img)
    async with runtime(registry, store) as rt:
        box = rt.sandbox(image=f"{registry.host}/team/layers:z")
        await box.start()
        assert (await out(box, ["ls", "/data"])).split() == ["added", "keep", "over"]
        assert await out(box, ["cat", "/data/over"]) == "new"
        assert (await out(box, ["ls", "/opq"])).split() == ["fresh"]
        assert (await out(box, ["ls", "/rmdir"])).split() == ["y"]


@run
async def test_writes_are_discarded_and_private(registry, store):
    img = base_image()
    registry.push("team/rw", "1", img)
    ref = f"{registry.host}/team/rw:1"
    async with runtime(registry, store) as rt:
        a, b = rt.sandbox(image=ref), rt.sandbox(image=ref)
        await a.start()
        await b.start()
        await out(a, ["sh", "-c", "echo A > /hello.txt; echo new > /new.txt; rm /bin/ls"])
        assert await out(a, ["cat", "/hello.txt"]) == "A\n"
        assert await out(b, ["cat", "/hello.txt"]) == "hello from the image\n"
        o = await (await b.exec(["cat", "/new.txt"])).output()
        assert o.exit_code != 0
        assert "hello.txt" in await out(b, ["ls", "/"])
        await a.destroy()
        c = rt.sandbox(image=ref)
        await c.start()
        assert await out(c, ["cat", "/hello.txt"]) == "hello from the image\n"
        assert "new.txt" not in await out(c, ["ls", "/"])
    # The layer dirs on the host are untouched.
    layers = os.path.join(store, "layers")
    for h in os.listdir(layers):
        p = os.path.join(layers, h, "fs", "hello.txt")
        if os.path.exists(p):
            assert open(p).read() == "hello from the image\n"
            assert os.path.exists(os.path.join(layers, h, "fs"))


@run
async def test_config_defaults(registry, store):
    img = ik.build([ik.busybox_layer() + [{"name": "srv", "type": "dir"}]], {
        "Entrypoint": ["sh", "-c"], "Cmd": ["id -u; id -g; pwd; echo $GREETING $OVERRIDE"],
        "Env": ["GREETING=hi", "OVERRIDE=image", "PATH=/bin"], "WorkingDir": "/srv/work",
        "User": "app"})
    registry.push("team/cfg", "1", img)
    ref = f"{registry.host}/team/cfg:1"
    async with runtime(registry, store) as rt:
        box = rt.sandbox(image=ref)
        r, w = os.pipe()
        try:
            await box.start(env={"OVERRIDE": "start"}, stdio=(rt._devnull, w, 2))
        finally:
            os.close(w)
        await box.monitor()
        with os.fdopen(r, "rb") as f:
            assert f.read().decode().split("\n")[:4] == ["1000", "1000", "/srv/work", "hi start"]
        # exec: the same defaults (user, cwd, env), overridable
        box2 = rt.sandbox(image=ref)
        await box2.start(entrypoint=["sleep", "1000"])
        assert await out(box2, ["id", "-u"]) == "1000\n"
        assert await out(box2, ["pwd"]) == "/srv/work\n"
        assert await out(box2, ["id", "-u"], user="root") == "0\n"
        assert await out(box2, ["pwd"], cwd="/") == "/\n"
        # uid:gid form
        img2 = ik.build([ik.busybox_layer()], {"User": "1000:50"})
        registry.push("team/cfg", "2", img2)
        box3 = rt.sandbox(image=f"{registry.host}/team/cfg:2")
        await box3.start()           # no Entrypoint/Cmd: it idles
        assert box3.running
        assert await out(box3, ["id", "-u"]) == "1000\n"
        assert await out(box3, ["id", "-g"]) == "50\n"


@run
async def test_container_class_image(registry, store):
    registry.push("team/ctr", "1", base_image())

    class App(sandbox.Container):
        image = f"{registry.host}/team/ctr:1"

    async with runtime(registry, store) as rt:
        c = App(rt, "ctr")
        await c.start()
        o = await (await c.sandbox.exec(["cat", "/hello.txt"])).output()
        assert o.stdout == b"hello from the image\n"
        await c.destroy()


@run
async def test_errors(registry, store, tmp_path):
    img = base_image()
    registry.push("team/err", "ok", img)
    async with runtime(registry, store) as rt:
        with pytest.raises(ValueError):
            rt.sandbox(image=f"{registry.host}/team/err:ok", rootfs=str(tmp_path))
        for bad in ("UPPER/Case", "host:99999/x", "a/b:bad tag", "x@sha256:1234", ""):
            with pytest.raises(sandbox.ImageError) as ei:
                rt.sandbox(image=bad)
            assert ei.value.kind == "bad-reference"
        assert rt.sandboxes == []
        # unknown tag: ImageError at start, nothing made
        box = rt.sandbox("unknown", image=f"{registry.host}/team/err:nope")
        with pytest.raises(sandbox.ImageError) as ei:
            await box.start()
        assert ei.value.kind == "not-found" and "team/err:nope" in str(ei.value)
        assert box.state == "created" and box.pid == 0
        await box.destroy()
        # digest mismatch: a blob whose bytes do not hash to its name
        bad = ik.build([ik.busybox_layer()])
        for b in bad.blobs:
            registry.push_blob("team/err", b)
        man = bad.manifest.replace(ik.sha(bad.blobs[1]).encode(), ik.sha(bad.blobs[0]).encode())
        registry.push_manifest("team/err", "mismatch", man, bad.media)
        with pytest.raises(sandbox.ImageError) as ei:
            await rt.pull(f"{registry.host}/team/err:mismatch")
        assert ei.value.kind == "digest"
        assert os.listdir(os.path.join(store, "tmp")) == []
        # a layout whose blob was changed after it was written
        layout = tmp_path / "layout"
        ik.skopeo("copy", "--src-tls-verify=false", f"docker://{registry.host}/team/err:ok",
                  f"oci:{layout}:v1")
        victim = layout / "blobs" / "sha256" / ik.sha(img.blobs[2]).split(":")[1]
        data = bytearray(victim.read_bytes())
        data[-1] ^= 1
        victim.write_bytes(bytes(data))
        with pytest.raises(sandbox.ImageError) as ei:
            await rt.pull(f"oci-layout:{layout}:v1")
        assert ei.value.kind == "digest" and "mismatch" in str(ei.value)
        # pinned digest that the registry does not hold
        with pytest.raises(sandbox.ImageError):
            await rt.pull(f"{registry.host}/team/err@sha256:" + "0" * 64)
    # plain HTTP registry not listed as insecure: HTTPS fails, bounded
    async with sandbox.Runtime(image_store=store) as rt:
        with pytest.raises(sandbox.ImageError) as ei:
            await rt.pull(f"{registry.host}/team/err:ok")
        assert ei.value.kind == "unreachable" and "insecure" in str(ei.value)


@run
async def test_registry_down_or_silent_is_bounded(store):
    port = ik.free_port()          # nothing listens there
    rt = sandbox.Runtime(insecure_registries=[f"127.0.0.1:{port}"], image_store=store)
    t0 = time.monotonic()
    with pytest.raises(sandbox.ImageError) as ei:
        await rt.pull(f"127.0.0.1:{port}/x/y:1")
    assert ei.value.kind == "unreachable" and time.monotonic() - t0 < 5
    # A registry that accepts and never answers: the timeout ends it.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    host = f"127.0.0.1:{srv.getsockname()[1]}"
    rt = sandbox.Runtime(insecure_registries=[host], image_store=store)
    rt._images.store.timeout = 1.0
    t0 = time.monotonic()
    try:
        with pytest.raises(sandbox.ImageError) as ei:
            await rt.pull(f"{host}/x/y:1")
    finally:
        srv.close()
    assert ei.value.kind == "unreachable" and time.monotonic() - t0 < 5
