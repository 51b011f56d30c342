"""SPEC §9: the runtime never resolves a sandbox-controlled path on the host
side (issue 8, findings 3, 4, 5, 9, 13). Each test is the attack, and checks
the host objects it aims at byte- and mode-identical afterwards (inode, mode,
owner, size, mtime, sha256)."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import resource
import shutil
import stat
import subprocess
import time

import pytest

import sandbox
from sandbox import gc as sgc, rootfs as R
from sandbox.errors import ExecError, SandboxError

from helpers import run, running


# -- helpers ------------------------------------------------------------------------
def fingerprint(path) -> tuple:
    st = os.lstat(path)
    digest = None
    if stat.S_ISREG(st.st_mode):
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    elif stat.S_ISLNK(st.st_mode):
        digest = os.readlink(path)
    return (st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
            st.st_rdev, digest)


def dev_fp(path) -> tuple:
    """A device node's identity and permissions (its times move with use)."""
    st = os.lstat(path)
    return (st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_rdev)


def tree(path, skip=()) -> dict:
    """Every entry below path (symlinks not followed) with its fingerprint;
    `skip`: top-level names left out."""
    out = {".": fingerprint(path)}
    for dirpath, dirs, files in os.walk(path):
        if dirpath == str(path):
            dirs[:] = [d for d in dirs if d not in skip]
            files = [f for f in files if f not in skip]
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, path)] = fingerprint(p)
    return out


def victim(path, text=b"host secret\n", mode=0o600):
    path.write_bytes(text)
    os.chmod(path, mode)
    return str(path)


def make_image(root):
    """A tiny rootfs: dash, cat, id and the libraries they load."""
    for d in ["usr/bin", "etc", "tmp"]:
        (root / d).mkdir(parents=True)
    for top in ["bin", "lib", "lib64"]:
        os.symlink(f"usr/{top}", root / top)
    files = set()
    for b in ["/usr/bin/dash", "/usr/bin/cat", "/usr/bin/id", "/usr/bin/ls"]:
        files.add(b)
        for line in subprocess.run(["ldd", b], capture_output=True, text=True).stdout.splitlines():
            files.update(p for p in line.split() if p.startswith("/"))
    for f in files:
        rel = f.lstrip("/")
        if rel.startswith(("lib/", "lib64/", "bin/")):
            rel = "usr/" + rel
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            shutil.copy2(os.path.realpath(f), dst)
    os.symlink("dash", root / "usr/bin/sh")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n"
                                         "app:x:1000:1000::/home/app:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\napp:x:1000:\n")


class Heartbeat:
    """Ticks in the event loop; max_gap is the longest the loop was stalled."""

    async def __aenter__(self):
        self.max_gap = 0.0
        self._task = asyncio.ensure_future(self._beat())
        await asyncio.sleep(0)
        return self

    async def _beat(self):
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.02)
            now = time.monotonic()
            self.max_gap = max(self.max_gap, now - last)
            last = now

    async def __aexit__(self, *exc):
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


async def sh(box, script, **kw):
    return await (await box.exec(["sh", "-c", script], **kw)).output()


# -- finding 3: the CA through a planted symlink --------------------------------------
CERTS = {"/etc/sandbox/certs": "sandbox-ca.crt",
         "/etc/cloudflare/certs": "cloudflare-containers-ca.crt"}


@run
async def test_ca_written_after_start_never_follows_a_planted_symlink(tmp_path):
    host = victim(tmp_path / "victim")
    host_dir = tmp_path / "victim-dir"
    host_dir.mkdir()
    before, before_dir = fingerprint(host), tree(host_dir)
    # Every name the runtime used, in both cert dirs, and the dirs themselves.
    attack = []
    for d, name in CERTS.items():
        attack += [f"rm -rf {d}/* ; for n in {name} {name}.tmp; do ln -sf {host} {d}/$n; done",
                   f"rm -rf {d}; ln -s {host_dir} {d}"]
    async with running() as (rt, box):
        out = await sh(box, "; ".join(attack) + "; echo done")
        assert out.stdout.endswith(b"done\n")
        # Registered after start: the runtime writes the CA now.
        await box.intercept_outbound_https("secure.test", lambda req, ctx: None)
        assert fingerprint(host) == before
        assert tree(host_dir) == before_dir
        pem = box.ca.ca_pem
        for d, name in CERTS.items():
            out = await sh(box, f"cat {d}/{name}; ls -A {d}", user="nobody")
            assert out.exit_code == 0, out
            assert out.stdout == pem + name.encode() + b"\n"
        # The cert dirs are read-only inside: nothing can be planted.
        out = await sh(box, "touch /etc/sandbox/certs/x || ln -s / /etc/sandbox/certs/y || echo ro")
        assert out.stdout == b"ro\n"
    assert fingerprint(host) == before and tree(host_dir) == before_dir


@run
async def test_cert_dir_lives_with_the_sandbox_and_gc_removes_leftovers(tmp_path):
    from sandbox import certdir
    state_dir = str(tmp_path / "state")
    async with sandbox.Runtime(state_dir=state_dir) as rt:
        box = rt.sandbox()
        await box.intercept_outbound_https("a.test", lambda req, ctx: None)   # CA before start
        await box.start()
        mine = certdir.path_for(state_dir, rt.tag, box.id)
        assert sorted(os.listdir(certdir.parent(state_dir))) == [os.path.basename(mine)]
        recorded = [v.get("certs") for v in rt._state.record["sandboxes"].values()]
        assert mine in recorded
        out = await sh(box, "cat /etc/sandbox/certs/sandbox-ca.crt")
        assert out.stdout == box.ca.ca_pem
        await box.destroy()
        assert os.listdir(certdir.parent(state_dir)) == []
    # A dead runtime's leftover (its record from an earlier boot) goes with gc.
    tag = "rdead01"
    left = certdir.path_for(state_dir, tag, "0123456789abcdef")
    certdir.create(left)
    other = certdir.path_for(state_dir, "rlive02", "x")
    certdir.create(other)
    os.makedirs(os.path.join(state_dir, "runtimes"), exist_ok=True)
    with open(os.path.join(state_dir, "runtimes", f"{tag}.json"), "w") as f:
        json.dump({"version": 1, "pid": 1, "start_time": 0.0, "boot_id": "an-earlier-boot",
                   "tag": tag, "host": {}, "sandboxes": {"s": {"certs": left}}}, f)
    report = sgc.collect([state_dir])
    assert not os.path.exists(left), report
    assert os.path.isdir(other)          # not that runtime's


# -- finding 4 (and siblings): rootfs=DIR with hostile symlinks and types ---------------
# The runtime's state dir is tmp/land/st, so its root is tmp/land/st/.root and a
# relative escape ("../.." from the root, "../../.." from /etc) lands in
# tmp/land: the old code wrote there (and into "/" or the host's /etc with
# deeper or absolute links, which is why these attacks aim only at tmp).
def _plant(variant, tmp_path, img) -> list[str]:
    """Plants the attack in the image; returns the host paths it aims at."""
    hostdir = tmp_path / "hostdir"
    hostdir.mkdir()
    victim(hostdir / "hosts")
    if variant == "etc->abs host dir":
        for n in ("hostname", "resolv.conf"):
            victim(hostdir / n)
        shutil.rmtree(img / "etc")
        os.symlink(str(hostdir), img / "etc")
    elif variant == "etc->../..":
        shutil.rmtree(img / "etc")
        os.symlink("../..", img / "etc")
    elif variant == "etc loop":
        shutil.rmtree(img / "etc")
        os.symlink("etc", img / "etc")
    elif variant == "etc files->host":
        os.symlink(victim(tmp_path / "v-resolv"), img / "etc" / "resolv.conf")
        os.symlink(victim(tmp_path / "v-hosts"), img / "etc" / "hosts")
        os.symlink(str(hostdir), img / "etc" / "hostname")
    elif variant == "cert dirs->host":
        os.symlink(str(hostdir), img / "etc" / "sandbox")
        os.symlink("../../..", img / "etc" / "cloudflare")
    elif variant == "proc file, dev->/dev, sys->host":
        (img / "proc").write_text("a file where a directory belongs\n")
        os.symlink("/dev", img / "dev")
        os.symlink(str(hostdir), img / "sys")
    return [str(hostdir), str(tmp_path / "v-resolv"), str(tmp_path / "v-hosts")]


VARIANTS = ["etc->abs host dir", "etc->../..", "etc loop", "etc files->host", "cert dirs->host",
            "proc file, dev->/dev, sys->host"]


def _host_view(paths, land) -> dict:
    out = {p: tree(p) if os.path.isdir(p) else fingerprint(p) for p in paths if os.path.lexists(p)}
    # Not its directory's own times: the runtime's state dir lives in it.
    out["land"] = {k: v for k, v in tree(land, skip={"st"}).items() if k != "."}
    out["/dev"] = {n: dev_fp(f"/dev/{n}") for n in ("null", "zero", "full", "tty")}
    return out


@pytest.mark.parametrize("variant", VARIANTS)
@run
async def test_rootfs_dir_symlinks_never_touch_the_host(tmp_path, variant):
    img = tmp_path / "img"
    make_image(img)
    land = tmp_path / "land"
    land.mkdir()
    victim(land / "sentinel")
    targets = _plant(variant, tmp_path, img)
    before = _host_view(targets, land)
    async with sandbox.Runtime(state_dir=str(land / "st")) as rt:
        box = rt.sandbox(rootfs=str(img))
        await box.start()
        out = await sh(box, "cat /etc/hostname; ls /dev/null /proc/self/status")
        assert out.stdout == f"{box.name}\n/dev/null\n/proc/self/status\n".encode(), out
        await box.intercept_outbound_https("x.test", lambda req, ctx: None)
        out = await sh(box, "cat /etc/sandbox/certs/sandbox-ca.crt /etc/cloudflare/certs/*")
        assert out.stdout == box.ca.ca_pem * 2, out
        assert _host_view(targets, land) == before
    assert _host_view(targets, land) == before


@run
async def test_rootfs_dir_a_directory_where_a_file_belongs_fails_cleanly(tmp_path):
    img = tmp_path / "img"
    make_image(img)
    (img / "etc" / "hosts").mkdir()
    (img / "etc" / "hosts" / "x").write_text("x")
    async with sandbox.Runtime() as rt:
        box = rt.sandbox(rootfs=str(img))
        with pytest.raises(ExecError) as ei:
            await box.start()
        assert ei.value.step == "mount" and "/etc/hosts" in str(ei.value)
        await box.destroy()


@run
async def test_rootfs_dir_etc_symlink_inside_the_image_is_followed(tmp_path):
    img = tmp_path / "img"
    make_image(img)
    os.rename(img / "etc", img / "usr" / "etc")
    os.symlink("usr/etc", img / "etc")
    async with sandbox.Runtime() as rt:
        box = rt.sandbox(rootfs=str(img))
        await box.start()
        out = await sh(box, "id -u; echo $HOME; cat /usr/etc/hostname", user="app")
        assert out.stdout == f"1000\n/home/app\n{box.name}\n".encode(), out
    assert not (img / "usr" / "etc" / "hostname").exists()


# -- finding 5: hostile /etc/passwd in rootfs=DIR -----------------------------------------
FAKE = b"root:x:0:4343:evil:/evilhome:/bin/sh\nevil:x:4242:4343::/evilhome:/bin/sh\n"


def _hostile_passwd(kind, img, tmp_path):
    p = img / "etc" / "passwd"
    p.unlink()
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "dev-zero":
        os.symlink("/dev/zero", p)
    elif kind == "host-file":
        os.symlink(victim(tmp_path / "hostpasswd", FAKE), p)
    elif kind == "huge":
        with open(p, "wb") as f:
            f.write(FAKE)
            f.truncate(200 << 20)
    (img / "etc" / "group").unlink()
    os.symlink("/proc/self/environ", img / "etc" / "group")


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "host-file", "huge"])
@run
async def test_hostile_passwd_neither_stalls_nor_leaks(tmp_path, kind):
    img = tmp_path / "img"
    make_image(img)
    _hostile_passwd(kind, img, tmp_path)
    async with sandbox.Runtime() as rt:
        peak = peak_rss_kib()
        async with Heartbeat() as hb:
            # The entrypoint's user is resolved from the image, on the host side.
            box = rt.sandbox(rootfs=str(img))
            with pytest.raises(ValueError):
                await box.start(entrypoint=["sleep", "1"], user="evil")
            await box.start()
            t0 = time.monotonic()
            out = await sh(box, "id -u; id -g; echo $HOME")
            assert out.stdout == b"0\n0\n/\n", out          # no passwd entry: uid 0, HOME=/
            with pytest.raises(ValueError):
                await box.exec(["id"], user="evil")
            out = await sh(box, "id -u; id -g; echo $HOME", user=4242)
            assert out.stdout == b"4242\n4242\n/\n", out
            assert time.monotonic() - t0 < 5
        await box.destroy()
    assert hb.max_gap < 0.5, hb.max_gap
    assert peak_rss_kib() - peak < 8 << 10      # KiB: a few MiB at most


# -- finding 9: device nodes and /proc masks --------------------------------------------
NODES = ("null", "zero", "full", "random", "urandom", "tty")
MASKS = ("keys", "timer_list", "kcore", "sched_debug", "latency_stats")


@run
async def test_chmod_chown_inside_never_reach_a_host_inode():
    host = {n: dev_fp(f"/dev/{n}") for n in NODES if os.path.exists(f"/dev/{n}")}
    masks = [m for m in MASKS if os.path.exists(f"/proc/{m}")]
    assert "keys" in masks
    try:
        async with running() as (rt, box):
            cmds = [f"chmod 0600 /dev/{n}; chown 7:7 /dev/{n}" for n in host]
            cmds += [f"chmod 0777 /proc/{m}; chown 7:7 /proc/{m}" for m in masks]
            out = await sh(box, "; ".join(cmds) + "; stat -c '%a %u' /dev/full; echo x > /dev/null; "
                                "echo rc=$?; cat /proc/keys | wc -c")
            # The sandbox's own nodes changed (they are its own); the masks refused.
            assert out.stdout == b"600 7\nrc=0\n0\n", out
            assert b"Read-only file system" in out.stderr
            for n, fp in host.items():
                assert dev_fp(f"/dev/{n}") == fp, n
            out = await sh(box, "stat -c '%t:%T %F' /dev/null /dev/zero /dev/full /dev/urandom")
            assert out.stdout.split(b"\n")[:4] == [b"1:3 character special file",
                                                    b"1:5 character special file",
                                                    b"1:7 character special file",
                                                    b"1:9 character special file"], out
        for n, fp in host.items():
            assert dev_fp(f"/dev/{n}") == fp, n
    finally:   # the old code changed the host's nodes: put them back
        for n, fp in host.items():
            os.chown(f"/dev/{n}", fp[2], fp[3])
            os.chmod(f"/dev/{n}", stat.S_IMODE(fp[1]))


def test_plan_every_path_below_the_root_is_confined_and_host_binds_are_read_only():
    from sandbox._native_api import AT_DST_IN_ROOT, AT_SRC_IN_ROOT, OP_MKNOD, OP_MOUNT, OP_ROOT
    etc = R.EtcFiles("h", "10.0.0.1")
    for plan, trusted in ((R.default_plan("/r", etc, "/c"), {"/r"}),
                          (R.dir_plan("/r", "/s", "/img", etc, "/c"),
                           {"/r", "/s", "/s/upper", "/s/work", "/s/etc"} |
                           {f"/s/etc/{n}" for n in etc.files(False)})):
        assert any(op.kind == OP_ROOT for op in plan)
        for i, op in enumerate(plan):
            if op.dst not in trusted:
                assert op.at & AT_DST_IN_ROOT, op
            if op.kind == OP_MOUNT and op.flags & R.MS_BIND and not op.flags & R.MS_REMOUNT:
                assert not op.flags & R.MS_REC, op
                # No host device node is ever bound in.
                assert op.at & AT_SRC_IN_ROOT or not op.src.startswith("/dev"), op
                if not op.at & AT_SRC_IN_ROOT or op.dst.startswith("/proc/"):
                    nxt = plan[i + 1]
                    assert nxt.dst == op.dst and nxt.flags & R.MS_REMOUNT and nxt.flags & R.MS_RDONLY, op
        assert {op.dst for op in plan if op.kind == OP_MKNOD} == {f"/dev/{n}" for n in NODES}
    with pytest.raises(SandboxError):
        R.dir_plan("/r", "/s:x", "/img", etc)
    with pytest.raises(ValueError):
        R.check_rootfs("/tmp/a\\b")


# -- finding 13: the default /etc ------------------------------------------------------
def _expected_etc() -> set[str]:
    names = set(os.listdir("/etc"))
    out = {"passwd", "group", "hosts", "hostname", "resolv.conf", "nsswitch.conf", "machine-id",
           "sandbox", "cloudflare"}
    out |= {n for n in ("services", "protocols", "ld.so.cache", "alternatives", "localtime",
                        "mime.types") if n in names}
    out |= {n for n in names if n.startswith(("ca-certificates", "ld.so.conf"))}
    if os.path.isdir("/etc/ssl/certs"):
        out.add("ssl")
    return out


@run
async def test_default_etc_is_exactly_the_allowlist():
    async with running() as (rt, box):
        out = await sh(box, "ls -A /etc; echo --; ls -A /etc/ssl; echo --; cat /etc/group; echo --; "
                            "cat /etc/nsswitch.conf /etc/machine-id; echo --; "
                            "touch /etc/x 2>/dev/null || echo ro")
        etc, ssl, group, nss, ro = out.stdout.decode().split("--\n")
        assert set(etc.split()) == _expected_etc(), out
        assert ssl.split() == ["certs"]
        assert "nobody:x:65534:" in group.splitlines()
        assert "hosts: files dns" in nss
        machine_id = nss.split()[-1]
        assert len(machine_id) == 32 and int(machine_id, 16) >= 0
        assert ro == "ro\n"
        script = ("import os, socket, ssl; print(socket.getaddrinfo('localhost', 'http')[0][4][1]); "
                  "print(socket.getservbyname('https')); "
                  "ctx = ssl.create_default_context(); "
                  "print(ctx.verify_mode == ssl.CERT_REQUIRED and "
                  "os.path.getsize('/etc/ssl/certs/ca-certificates.crt') > 0)")
        out = await (await box.exec(["python3", "-c", script])).output()
        assert out.stdout == b"80\n443\nTrue\n", out
        box2 = rt.sandbox()
        await box2.start()
        out2 = await sh(box2, "cat /etc/machine-id")
        assert out2.stdout.strip().decode() != machine_id
        out = await sh(box, "ls /etc/ssl/private /etc/shadow /etc/ssh 2>&1 | wc -l; "
                            "cat /etc/ssl/private/* 2>/dev/null | wc -c")
        assert out.stdout.split()[1] == b"0"
