"""start / monitor / signal / destroy, PID 1 behaviour, concurrency."""
import asyncio
import os

import psutil
import pytest

import sandbox
from helpers import run, running


@run
async def test_monitor_with_several_awaiters_before_and_after_start():
    async with sandbox.Runtime() as rt:
        box = rt.sandbox()
        early = asyncio.ensure_future(box.monitor())      # before start
        r, w = os.pipe()
        try:
            await box.start(entrypoint=["sh", "-c", "trap 'exit 0' TERM; echo ready; sleep 1000 & wait"],
                            stdio=(rt._devnull, w, 2))
        finally:
            os.close(w)
        with os.fdopen(r, "rb") as f:      # the trap is in place once it says so
            assert f.readline() == b"ready\n"
        assert box.running and box.state == "running" and box.pid > 0
        waiters = [asyncio.ensure_future(box.monitor()) for _ in range(3)]
        await asyncio.sleep(0)
        assert not any(w.done() for w in [early, *waiters])
        box.signal(15)
        assert await asyncio.gather(early, *waiters) == [None] * 4
        assert not box.running and box.state == "stopped"
        with pytest.raises(sandbox.SandboxNotRunning):
            await box.exec(["true"])


@run
async def test_monitor_exit_0():
    async with sandbox.Runtime() as rt:
        box = rt.sandbox()
        await box.start(entrypoint=["true"])
        ws = [box.monitor() for _ in range(3)]
        assert await asyncio.gather(*ws) == [None, None, None]
        assert await box.monitor() is None   # after the stop too
        assert box.state == "stopped"


@run
async def test_monitor_exit_3():
    async with sandbox.Runtime() as rt:
        box = rt.sandbox()
        await box.start(entrypoint=["sh", "-c", "exit 3"])
        for _ in range(2):
            with pytest.raises(sandbox.ContainerExitError) as ei:
                await box.monitor()
            assert ei.value.exit_code == 3
            assert isinstance(ei.value, sandbox.ContainerError)


@run
async def test_signal_term_stops_sleep_143():
    async with sandbox.Runtime() as rt:
        box = rt.sandbox()
        await box.start(entrypoint=["sleep", "1000"])
        m = asyncio.ensure_future(box.monitor())
        box.signal(15)
        with pytest.raises(sandbox.ContainerExitError) as ei:
            await asyncio.wait_for(m, 10)
        assert ei.value.exit_code == 143
        box.signal(15)  # after exit: nothing happens


@run
async def test_destroy_with_message_and_without():
    async with sandbox.Runtime() as rt:
        box = rt.sandbox()
        await box.start(entrypoint=["sleep", "1000"])
        ws = [asyncio.ensure_future(box.monitor()) for _ in range(3)]
        await box.destroy("out of budget")
        for w in ws:
            with pytest.raises(sandbox.ContainerError, match="out of budget") as ei:
                await w
            assert not isinstance(ei.value, sandbox.ContainerExitError)
        await box.destroy()  # idempotent
        assert box.state == "stopped"
        b2 = rt.sandbox()
        await b2.start()
        await b2.destroy()
        assert await b2.monitor() is None


@run
async def test_orphans_are_reaped_by_pid1():
    async with running(entrypoint=["sleep", "1000"]) as (rt, box):
        # 20 orphans whose parent exits at once: PID 1 inherits and reaps them.
        p = await box.exec(["sh", "-c", "for i in $(seq 20); do (sleep 0.01 &) ; done; exit 0"])
        assert await p.exit_code == 0
        p = await box.exec(["sh", "-c", "sleep 0.3; ps -e -o stat= 2>/dev/null || cat /proc/[0-9]*/stat"])
        out = (await p.output()).stdout.decode()
        states = [line.split(")")[-1].split()[0] if ")" in line else line.strip()[:1]
                  for line in out.splitlines() if line.strip()]
        assert "Z" not in states, out


@run
async def test_host_pids_invisible():
    async with running() as (rt, box):
        out = (await (await box.exec(["sh", "-c", "ls /proc | grep -E '^[0-9]+$'"])).output()).stdout
        pids = sorted(int(x) for x in out.split())
        assert 1 in pids and max(pids) < 50, pids
        assert os.getpid() not in pids or os.getpid() < 50


@run
async def test_writes_never_reach_host(tmp_path):
    marker = "/tmp/sandbox-test-marker-do-not-create"
    async with running() as (rt, box):
        script = f"echo x > {marker}; echo y > /workspace/f; echo z > /root/f; cat /workspace/f"
        out = await (await box.exec(["sh", "-c", script])).output()
        assert out.exit_code == 0 and out.stdout == b"y\n"
        for path in ["/usr/evil", "/etc/passwd", "/bin/evil", "/etc/evil"]:
            out = await (await box.exec(["sh", "-c", f"echo x > {path}"])).output()
            assert out.exit_code != 0, path
    assert not os.path.exists(marker)
    assert not os.path.exists("/usr/evil") and not os.path.exists("/etc/evil")


def make_image(root):
    """A tiny rootfs: dash, cat, id and the libraries they load, copied."""
    import shutil
    import subprocess
    for d in ["usr/bin", "etc", "tmp", "data"]:
        (root / d).mkdir(parents=True)
    for top in ["bin", "lib", "lib64"]:
        os.symlink(f"usr/{top}", root / top)
    files = set()
    for b in ["/usr/bin/dash", "/usr/bin/cat", "/usr/bin/id"]:
        files.add(b)
        for line in subprocess.run(["ldd", b], capture_output=True, text=True).stdout.splitlines():
            for part in line.split():
                if part.startswith("/"):
                    files.add(os.path.realpath(part))
                    files.add(part)
    for f in files:
        rel = f.lstrip("/")
        if rel.startswith(("lib/", "lib64/", "bin/")):
            rel = "usr/" + rel
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            shutil.copy2(os.path.realpath(f), dst)
    os.symlink("dash", root / "usr/bin/sh")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\napp:x:1000:\n")
    (root / "data" / "f").write_text("image\n")


@run
async def test_rootfs_dir_overlay_discarded(tmp_path):
    root = tmp_path / "img"
    make_image(root)
    async with sandbox.Runtime() as rt:
        box = rt.sandbox(rootfs=str(root))
        await box.start()
        out = await (await box.exec(["sh", "-c", "cat /data/f; echo new > /data/f; cat /data/f; cat /etc/hostname"])).output()
        assert out.stdout == f"image\nnew\n{box.name}\n".encode(), out
        out = await (await box.exec(["id", "-u"], user="app")).output()
        assert out.stdout == b"1000\n"
        await box.destroy()
        box2 = rt.sandbox(rootfs=str(root))       # a new sandbox sees the image again
        await box2.start()
        out = await (await box2.exec(["cat", "/data/f"])).output()
        assert out.stdout == b"image\n"
    assert (root / "data" / "f").read_text() == "image\n"
    assert not (root / "usr" / "upper").exists()


@run
async def test_twenty_concurrent_sandboxes():
    async with sandbox.Runtime() as rt:
        boxes = [rt.sandbox() for _ in range(20)]
        await asyncio.gather(*(b.start() for b in boxes))
        assert all(b.running for b in boxes)
        procs = await asyncio.gather(*(b.exec(["hostname"]) for b in boxes))
        outs = await asyncio.gather(*(p.output() for p in procs))
        assert [o.stdout.decode().strip() for o in outs] == [b.name for b in boxes]
        assert len({b.pid for b in boxes}) == 20
    assert all(b.state == "stopped" for b in boxes)
    assert not any(psutil.pid_exists(b.pid) and psutil.Process(b.pid).status() != "zombie"
                   for b in boxes)


@run
async def test_runtime_exit_destroys_everything_even_when_body_raises():
    pids = []
    with pytest.raises(RuntimeError):
        async with sandbox.Runtime() as rt:
            for _ in range(3):
                b = rt.sandbox()
                await b.start(entrypoint=["sleep", "1000"])
                pids.append(b.pid)
            p = await b.exec(["sleep", "1000"])
            pids.append(p.host_pid)
            raise RuntimeError("body failed")
    for pid in pids:
        assert not psutil.pid_exists(pid)
