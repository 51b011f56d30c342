"""SPEC §3/§10: read-only identity, signal.Signals accepted as ints."""
import asyncio
import signal

import pytest

import sandbox
from helpers import run, running


@run
async def test_identity_is_read_only():
    async with running() as (rt, box):
        for attr, value in (("id", "x"), ("name", "y"), ("pid", 1), ("state", "stopped"),
                            ("running", False)):
            before = getattr(box, attr)
            with pytest.raises(AttributeError):
                setattr(box, attr, value)
            assert getattr(box, attr) == before
        assert isinstance(box.id, str) and box.pid > 0 and box.state == "running"


@run
async def test_signals_enum_members_are_accepted():
    async with running() as (rt, box):
        p = await box.exec(["sleep", "100"])
        p.kill(signal.SIGTERM)
        assert await asyncio.wait_for(p.exit_code, 10) == 128 + 15
        for bad in (True, signal.SIGTERM.name, 0, 65, 1.0):
            with pytest.raises(ValueError):
                p.kill(bad)
            with pytest.raises(ValueError):
                box.signal(bad)
    async with sandbox.Runtime() as rt:
        box = rt.sandbox()
        await box.start(entrypoint=["sleep", "100"])
        box.signal(signal.SIGTERM)
        with pytest.raises(sandbox.ContainerExitError) as e:
            await asyncio.wait_for(box.monitor(), 10)
        assert e.value.exit_code == 143


@run
async def test_default_group_names_nobody():
    async with running() as (rt, box):
        out = await (await box.exec(["sh", "-c", "id -gn nobody; grep ^nobody: /etc/group"])).output()
        assert out.stdout.split(b"\n")[0] == b"nobody"
        assert out.stdout.split(b"\n")[1].startswith(b"nobody:x:65534:")
