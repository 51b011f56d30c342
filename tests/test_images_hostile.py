"""Layers are hostile input (SPEC §9, §11): nothing a layer holds may land
outside its layer directory or reach a host file, devices are dropped, the
size is bounded, and a refused layer is an ImageError naming the entry."""
from __future__ import annotations

import os
import stat

import pytest

import imagekit as ik
import sandbox
from helpers import run


def layout(tmp_path, entries_list, name="img", **kw):
    img = ik.build(entries_list, **kw)
    return ik.write_layout(str(tmp_path / name), img), img


def host_dir(tmp_path) -> str:
    d = tmp_path / "host"
    d.mkdir(exist_ok=True)
    (d / "secret").write_text("host file\n")
    return str(d)


async def refused(rt, ref, entry: str):
    with pytest.raises(sandbox.ImageError) as ei:
        await rt.pull(ref)
    assert ei.value.kind == "refused", ei.value
    assert entry in str(ei.value), ei.value
    return ei.value


def store_clean(store: str) -> None:
    """A refused pull leaves nothing a later pull would trust, nor debris."""
    assert os.listdir(os.path.join(store, "layers")) == []
    assert os.listdir(os.path.join(store, "tmp")) == []
    assert os.listdir(os.path.join(store, "images")) == []


@run
async def test_traversal_and_absolute_paths(tmp_path):
    host = host_dir(tmp_path)
    store = str(tmp_path / "store")
    rt = sandbox.Runtime(image_store=store)
    depth = "../" * 40
    for i, name in enumerate([f"{depth}{host[1:]}/pwned", f"a/../../{host[1:]}/pwned2",
                              f"{host}/pwned3"]):
        ref, _ = layout(tmp_path, [[{"name": "a", "type": "dir"}, {"name": name, "data": b"x"}]],
                        name=f"t{i}")
        await refused(rt, ref, name)
    assert sorted(os.listdir(host)) == ["secret"]
    store_clean(store)


@run
async def test_symlink_then_write(tmp_path):
    host = host_dir(tmp_path)
    store = str(tmp_path / "store")
    rt = sandbox.Runtime(image_store=store)
    # through a symlinked directory: refused
    ref, _ = layout(tmp_path, [[{"name": "evil", "type": "symlink", "target": host},
                                {"name": "evil/owned", "data": b"x"}]], name="a")
    await refused(rt, ref, "evil/owned")
    # a relative symlink climbing out, then a write through it
    ref, _ = layout(tmp_path, [[{"name": "up", "type": "symlink", "target": "../" * 30 + host[1:]},
                                {"name": "up/owned", "data": b"x"}]], name="b")
    await refused(rt, ref, "up/owned")
    # the same name as a symlink, then as a file: the file replaces the link
    ref, _ = layout(tmp_path, [[{"name": "x", "type": "symlink", "target": f"{host}/secret"},
                                {"name": "x", "data": b"image content"}]], name="c")
    img = await rt.pull(ref)
    assert open(os.path.join(host, "secret")).read() == "host file\n"
    fs = os.path.join(store, "layers", img.layers[0].split(":")[1], "fs")
    assert not os.path.islink(os.path.join(fs, "x"))
    assert open(os.path.join(fs, "x"), "rb").read() == b"image content"
    assert sorted(os.listdir(host)) == ["secret"]


@run
async def test_hardlinks_to_host_files(tmp_path):
    host = host_dir(tmp_path)
    store = str(tmp_path / "store")
    secret = os.path.join(host, "secret")
    nlink = os.stat(secret).st_nlink
    rt = sandbox.Runtime(image_store=store)
    cases = [
        [{"name": "h", "type": "hardlink", "target": secret}],                      # absolute
        [{"name": "h", "type": "hardlink", "target": "../" * 30 + secret[1:]}],     # ..
        [{"name": "d", "type": "symlink", "target": host},                          # via a symlink
         {"name": "h", "type": "hardlink", "target": "d/secret"}],
        [{"name": "h", "type": "hardlink", "target": "missing"}],                   # not in the layer
    ]
    for i, entries in enumerate(cases):
        ref, _ = layout(tmp_path, [entries], name=f"h{i}")
        await refused(rt, ref, "'h'")
    assert os.stat(secret).st_nlink == nlink
    assert open(secret).read() == "host file\n"
    # a hardlink inside the layer is fine, and a later write to its name does not
    # reach the first file
    ref, _ = layout(tmp_path, [[{"name": "f", "data": b"one"},
                                {"name": "g", "type": "hardlink", "target": "f"},
                                {"name": "g", "data": b"two"}]], name="ok")
    img = await rt.pull(ref)
    fs = os.path.join(store, "layers", img.layers[0].split(":")[1], "fs")
    assert open(os.path.join(fs, "f"), "rb").read() == b"one"
    assert open(os.path.join(fs, "g"), "rb").read() == b"two"


@run
async def test_devices_dropped_setuid_kept_xattrs_ignored(tmp_path):
    store = str(tmp_path / "store")
    rt = sandbox.Runtime(image_store=store)
    entries = [{"name": "mem", "type": "char", "dev": (1, 1), "mode": 0o666},
               {"name": "sda", "type": "block", "dev": (8, 0), "mode": 0o666},
               {"name": "wh", "type": "char", "dev": (0, 0)},
               {"name": "fifo", "type": "fifo"},
               {"name": "suid", "data": b"#!/bin/sh\n", "mode": 0o4755},
               {"name": "dir", "type": "dir"}]
    blob, tar = ik.tar_layer(entries)
    # A PAX xattr that would make "dir" opaque, and one for a redirect: never applied.
    import io
    import tarfile
    raw = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(tar)) as src, \
            tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as dst:
        for m in src:
            if m.name == "dir":
                m.pax_headers = {"SCHILY.xattr.trusted.overlay.opaque": "y",
                                 "SCHILY.xattr.trusted.overlay.redirect": "/etc"}
            dst.addfile(m, src.extractfile(m) if m.isreg() else None)
    tar = raw.getvalue()
    img = ik.build([], raw_layers=[(tar, tar)])
    ref = ik.write_layout(str(tmp_path / "dev"), img)
    pulled = await rt.pull(ref)
    fs = os.path.join(store, "layers", pulled.layers[0].split(":")[1], "fs")
    names = sorted(os.listdir(fs))
    assert names == ["dir", "fifo", "suid"]
    assert os.stat(os.path.join(fs, "suid")).st_mode & 0o7777 == 0o4755
    assert stat.S_ISFIFO(os.lstat(os.path.join(fs, "fifo")).st_mode)
    assert os.listxattr(os.path.join(fs, "dir")) == []


@run
async def test_size_bound_and_bad_whiteouts(tmp_path):
    store = str(tmp_path / "store")
    rt = sandbox.Runtime(image_store=store, max_layer_bytes=64 << 10)
    ref, _ = layout(tmp_path, [[{"name": "big", "data": b"\0" * (256 << 10)}]], name="big")
    e = await refused(rt, ref, "max_layer_bytes")
    assert "big" not in os.listdir(tmp_path / "store" / "tmp")
    for i, name in enumerate(["../.wh.x", "a/.wh..", ".wh.."]):
        ref, _ = layout(tmp_path, [[{"name": "a", "type": "dir"}, {"name": name, "data": b""}]],
                        name=f"w{i}")
        with pytest.raises(sandbox.ImageError):
            await rt.pull(ref)
    store_clean(store)


@run
async def test_hostile_etc_symlink_for_users(tmp_path):
    """An image whose /etc is a symlink to the host's /etc: user= is looked up in
    the image (where nothing is found), never in the host's files."""
    store = str(tmp_path / "store")
    rt = sandbox.Runtime(image_store=store)
    ref, img = layout(tmp_path, [[{"name": "etc", "type": "symlink", "target": "/etc"}],
                                 [{"name": "x", "data": b""}]], name="etc",
                      config={"User": "root"})
    pulled = await rt.pull(ref)
    assert rt._images.store.etc_users(pulled) == ("", "")
    ref, img = layout(tmp_path, [[{"name": "etc", "type": "symlink", "target": "../../../../etc"}]],
                      name="etc2")
    pulled = await rt.pull(ref)
    assert rt._images.store.etc_users(pulled) == ("", "")
    # a symlink that stays inside is followed, across layers
    ref, img = layout(tmp_path, [[{"name": "real", "type": "dir"},
                                  {"name": "real/passwd", "data": b"u:x:7:7::/:/bin/sh\n"}],
                                 [{"name": "etc", "type": "symlink", "target": "/real"}]],
                      name="etc3")
    pulled = await rt.pull(ref)
    assert rt._images.store.etc_users(pulled)[0] == "u:x:7:7::/:/bin/sh\n"
