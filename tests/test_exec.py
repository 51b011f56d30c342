"""The exec documentation's examples, in Python, against real sandboxes."""
import asyncio

import pytest

import sandbox
from helpers import run, running


@run
async def test_stdin_bytes_reaches_process():
    async with running() as (rt, box):
        p = await box.exec(["cat"], stdin=b"hello from bytes")
        out = await p.output()
        assert out == sandbox.ExecOutput(b"hello from bytes", b"", 0)


@run
async def test_stdin_pipe_two_writes_then_close():
    async with running() as (rt, box):
        p = await box.exec(["cat"], stdin="pipe")
        p.stdin.write(b"first ")
        await p.stdin.drain()
        p.stdin.write(b"second")
        await p.stdin.drain()
        p.stdin.close()
        out = await p.output()
        assert out.stdout == b"first second"
        assert out.exit_code == 0


@run
async def test_stdin_omitted_is_eof():
    async with running() as (rt, box):
        p = await box.exec(["cat"])
        assert p.stdin is None
        out = await asyncio.wait_for(p.output(), 10)
        assert out == sandbox.ExecOutput(b"", b"", 0)


@run
async def test_stdin_async_iterable_streams():
    async def gen():
        for i in range(100):
            yield b"x" * 1000 + b"\n"

    async with running() as (rt, box):
        p = await box.exec(["wc", "-c"], stdin=gen())
        out = await p.output()
        assert out.stdout.strip() == b"100100"


@run
async def test_async_iterable_stdin_dropped_when_process_exits_early():
    async def endless():
        while True:
            yield b"y" * 65536

    async with running() as (rt, box):
        p = await box.exec(["head", "-c", "10"], stdin=endless())
        out = await asyncio.wait_for(p.output(), 10)
        assert out.stdout == b"y" * 10
        assert out.exit_code == 0


@run
async def test_cwd_env_user_and_env_override():
    async with running(env={"MODE": "start", "KEEP": "yes"}) as (rt, box):
        p = await box.exec(["sh", "-c", 'echo "$PWD $MODE $KEEP $HOME"; id -u; id -g'],
                           cwd="/tmp", env={"MODE": "exec"}, user="nobody")
        out = await p.output()
        assert out.exit_code == 0, out
        assert out.stdout.decode().split("\n") == ["/tmp exec yes /nonexistent", "65534", "65534", ""]


@run
async def test_numeric_user_without_entry_and_default_identity():
    async with running() as (rt, box):
        out = await (await box.exec(["sh", "-c", "id -u; id -g; id -G; echo $HOME; pwd"], user=4242)).output()
        assert out.stdout.split() == [b"4242", b"4242", b"4242", b"/", b"/"]
        out = await (await box.exec(["sh", "-c", "id -u; echo $HOME; echo $PATH"])).output()
        assert out.stdout.split() == [b"0", b"/root",
                                      b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]


@run
async def test_stderr_combined():
    async with running() as (rt, box):
        p = await box.exec(["sh", "-c", "echo out; echo err >&2; echo out2"], stderr="combined")
        assert p.stderr is None
        out = await p.output()
        assert out.stdout == b"out\nerr\nout2\n"
        assert out.stderr == b""


@run
async def test_exit_7_with_stdout_ignored():
    async with running() as (rt, box):
        p = await box.exec(["sh", "-c", "echo ignored; exit 7"], stdout="ignore")
        assert p.stdout is None
        assert await p.exit_code == 7
        assert await p.exit_code == 7     # a future: await it again
        out = await p.output()
        assert out == sandbox.ExecOutput(b"", b"", 7)


@run
async def test_100k_lines_each_stream_concurrently_exact():
    script = ("import sys\n"
              "for i in range(100000):\n"
              "    sys.stdout.write('out %06d\\n' % i)\n"
              "    sys.stderr.write('err %06d\\n' % i)\n")
    async with running() as (rt, box):
        p = await box.exec(["python3", "-c", script])

        async def collect(stream):
            chunks = []
            async for c in stream:
                chunks.append(c)
            return b"".join(chunks)

        out, err = await asyncio.gather(collect(p.stdout), collect(p.stderr))
        assert await p.exit_code == 0
        assert len(out) == 100000 * 11 and len(err) == 100000 * 11
        assert out.splitlines()[12345] == b"out 012345"
        assert err.splitlines()[-1] == b"err 099999"
        assert out == b"".join(b"out %06d\n" % i for i in range(100000))


@run
async def test_reader_that_stops_applies_backpressure():
    async with running() as (rt, box):
        # Writes 50 MB; we read only a little and check the writer is blocked.
        p = await box.exec(["sh", "-c", "head -c 50000000 /dev/zero; echo done >&2"])
        first = await p.stdout.read(1000)
        assert first == b"\0" * 1000
        done = asyncio.ensure_future(p.stderr.read())
        finished, _ = await asyncio.wait([done, p.exit_code], timeout=0.5)
        assert not finished, "the writer should be blocked by backpressure"
        total = len(first)
        async for c in p.stdout:
            total += len(c)
        assert total == 50000000
        assert await done == b"done\n"
        assert await p.exit_code == 0


@run
async def test_output_twice_is_typeerror():
    async with running() as (rt, box):
        p = await box.exec(["echo", "x"])
        assert (await p.output()).stdout == b"x\n"
        with pytest.raises(TypeError):
            await p.output()
        p2 = await box.exec(["echo", "y"])
        assert await p2.stdout.read() == b"y\n"
        with pytest.raises(TypeError):
            await p2.output()


@run
async def test_kill_then_exit_code_resolves():
    async with running() as (rt, box):
        p = await box.exec(["sleep", "1000"])
        p.kill()
        assert await asyncio.wait_for(p.exit_code, 10) == 128 + 15
        p2 = await box.exec(["sleep", "1000"])
        p2.kill(9)
        assert await asyncio.wait_for(p2.exit_code, 10) == 137
        p2.kill()  # already exited: no error


@run
async def test_pid_inside_and_host_pid():
    async with running() as (rt, box):
        p = await box.exec(["sh", "-c", "echo $$; exec sleep 1000"])
        line = await p.stdout.read(100)
        assert int(line) == p.pid
        assert p.pid > 1 and p.host_pid != p.pid
        with open(f"/proc/{p.host_pid}/status") as f:
            nspid = [l for l in f if l.startswith("NSpid:")][0].split()
        assert int(nspid[-1]) == p.pid
        p.kill()
        await p.exit_code


@run
async def test_exec_inherits_sandbox_cgroup_and_namespaces():
    async with running() as (rt, box):
        out = await (await box.exec(["sh", "-c", "readlink /proc/1/ns/pid /proc/self/ns/pid /proc/1/ns/mnt /proc/self/ns/mnt; cat /proc/self/cgroup | head -3"])).output()
        lines = out.stdout.decode().split("\n")
        assert lines[0] == lines[1] and lines[2] == lines[3]
