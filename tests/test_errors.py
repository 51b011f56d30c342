"""Every error case of SPEC §4 and §10 with its exact exception type."""
import errno

import pytest

import sandbox
from helpers import run, running

BAD_TYPE = [
    dict(cmd=[]),
    dict(cmd="echo hi"),
    dict(cmd=b"echo"),
    dict(cmd=["echo", 1]),
    dict(cmd=None),
    dict(cmd=["echo"], stdin="bogus"),
    dict(cmd=["echo"], stdin=123),
    dict(cmd=["echo"], stdout="bogus"),
    dict(cmd=["echo"], stderr="bogus"),
    dict(cmd=["echo"], stdout="ignore", stderr="combined"),
]
BAD_VALUE = [
    dict(cmd=["echo"], env={"": "x"}),
    dict(cmd=["echo"], env={"A=B": "x"}),
    dict(cmd=["echo"], env={"A\0": "x"}),
    dict(cmd=["echo"], env={"A": "x\0y"}),
    dict(cmd=["echo"], cwd="/tm\0p"),
    dict(cmd=["echo"], user="ro\0ot"),
    dict(cmd=["echo"], user="no-such-user"),
]


def _call(box, kw):
    kw = dict(kw)
    return box.exec(kw.pop("cmd"), **kw)


@pytest.mark.parametrize("kw", BAD_TYPE)
@run
async def test_bad_exec_arguments_typeerror(kw):
    async with running() as (rt, box):
        with pytest.raises(TypeError):
            await _call(box, kw)


@pytest.mark.parametrize("kw", BAD_VALUE)
@run
async def test_bad_exec_arguments_valueerror(kw):
    async with running() as (rt, box):
        with pytest.raises(ValueError):
            await _call(box, kw)


@run
async def test_validation_comes_before_state():
    async with sandbox.Runtime() as rt:
        box = rt.sandbox()
        with pytest.raises(TypeError):
            await box.exec([])
        with pytest.raises(ValueError):
            await box.exec(["echo"], env={"": "x"})
        with pytest.raises(sandbox.SandboxNotRunning):
            await box.exec(["echo"])
        await box.start()
        await box.destroy()
        with pytest.raises(TypeError):
            await box.exec("echo")
        with pytest.raises(sandbox.SandboxNotRunning):
            await box.exec(["echo"])


@run
async def test_exec_missing_binary_is_execerror():
    async with running() as (rt, box):
        with pytest.raises(sandbox.ExecError) as ei:
            await box.exec(["no-such-binary-xyz"])
        e = ei.value
        assert isinstance(e, OSError) and isinstance(e, sandbox.SandboxError)
        assert e.errno == errno.ENOENT and e.step == "execve"
        with pytest.raises(sandbox.ExecError) as ei:
            await box.exec(["/etc/passwd"])
        assert ei.value.errno == errno.EACCES and ei.value.step == "execve"
        with pytest.raises(sandbox.ExecError) as ei:
            await box.exec(["true"], cwd="/no/such/dir")
        assert ei.value.errno == errno.ENOENT and ei.value.step == "chdir"
        # the sandbox still works after failures
        assert (await (await box.exec(["echo", "ok"])).output()).stdout == b"ok\n"


@run
async def test_entrypoint_that_cannot_exec_makes_start_raise():
    async with sandbox.Runtime() as rt:
        box = rt.sandbox()
        with pytest.raises(sandbox.ExecError) as ei:
            await box.start(entrypoint=["/no/such/entry"])
        assert ei.value.errno == errno.ENOENT
        assert box.state != "running"


@pytest.mark.parametrize("bad", [0, 65, -1, 1.5, True, "9", None])
@run
async def test_signal_and_kill_range(bad):
    async with running(entrypoint=["sleep", "1000"]) as (rt, box):
        with pytest.raises(ValueError):
            box.signal(bad)
        p = await box.exec(["sleep", "1000"])
        with pytest.raises(ValueError):
            p.kill(bad)
        p.kill(9)
        await p.exit_code


@run
async def test_names():
    async with sandbox.Runtime() as rt:
        for bad in ["", "-x", "a" * 65, "a b", "a/b", ".x", 12, None and 1]:
            if bad is None:
                continue
            with pytest.raises(ValueError):
                rt.sandbox(bad)
        a = rt.sandbox("job-42")
        with pytest.raises(ValueError):
            rt.sandbox("job-42")
        assert a.name == "job-42" and a.state == "created" and isinstance(a.id, str)
        b = rt.sandbox()
        assert b.name != a.name and b.id != a.id
        await a.start()
        await a.destroy()
        again = rt.sandbox("job-42")   # free once destroyed
        assert again is not a


@run
async def test_start_twice_is_sandboxerror():
    async with running() as (rt, box):
        with pytest.raises(sandbox.SandboxError):
            await box.start()
