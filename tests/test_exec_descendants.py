"""SPEC §10 "Output and descendants": output() and the end of stream
iteration come at the exec'd process's exit once what it already wrote has
been read; descendants holding the pipes neither hold them up nor block."""
import asyncio
import json
import time

import pytest

from helpers import run, running


@run
async def test_background_child_does_not_hold_output():
    async with running() as (rt, box):
        t0 = time.monotonic()
        p = await box.exec(["sh", "-c", "sleep 300 & echo started"])
        out = await asyncio.wait_for(p.output(), 10)
        assert out.stdout == b"started\n"
        assert out.exit_code == 0
        assert time.monotonic() - t0 < 2
        # The background sleep is still alive inside.
        ps = await (await box.exec(["sh", "-c", "for d in /proc/[0-9]*; do cat $d/comm; done"])).output()
        assert b"sleep" in ps.stdout.split()


@run
async def test_background_writer_keeps_writing_after_end():
    """The daemon's later output is drained and discarded: it neither blocks
    on a full pipe nor dies of SIGPIPE (it counts its successful writes)."""
    async with running() as (rt, box):
        script = ("(i=0; while [ $i -lt 2000 ]; do echo xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
                  " || exit 9; i=$((i+1)); done; echo done > /tmp/bg-done) & echo started")
        p = await box.exec(["sh", "-c", script])
        out = await asyncio.wait_for(p.output(), 10)
        assert b"started\n" in out.stdout
        # 2000 lines x 54 bytes is past a pipe's capacity: it only finishes
        # if the runtime keeps draining.
        w = await box.exec(["sh", "-c", "while [ ! -e /tmp/bg-done ]; do sleep 0.05; done; cat /tmp/bg-done"])
        res = await asyncio.wait_for(w.output(), 20)
        assert res.stdout == b"done\n"


@run
async def test_stream_iteration_ends_at_exit():
    async with running() as (rt, box):
        p = await box.exec(["sh", "-c", "sleep 300 & echo a; echo b >&2"])
        chunks = []

        async def collect():
            async for c in p.stdout:
                chunks.append(c)
            return b"".join(chunks)

        out, err = await asyncio.wait_for(asyncio.gather(collect(), p.stderr.read()), 10)
        assert out == b"a\n" and err == b"b\n"
        assert await p.exit_code == 0


@run
async def test_large_output_then_exit_arrives_whole():
    async with running() as (rt, box):
        p = await box.exec(["sh", "-c", "sleep 300 & head -c 5000000 /dev/zero | tr '\\0' 'z'"])
        out = await asyncio.wait_for(p.output(), 30)
        assert out.stdout == b"z" * 5_000_000


@run
async def test_slow_consumer_still_gets_everything_before_exit():
    async with running() as (rt, box):
        p = await box.exec(["sh", "-c", "sleep 300 & seq 1 200000"])
        got = bytearray()
        async for chunk in p.stdout:
            got += chunk
            await asyncio.sleep(0)
        expected = "".join(f"{i}\n" for i in range(1, 200001)).encode()
        assert bytes(got) == expected


@run
@pytest.mark.timeout(60)
async def test_fork_loop_under_pids_limit_returns_json():
    code = ("import json, os\n"
            "kids = []\n"
            "for i in range(20):\n"
            "    pid = os.fork()\n"
            "    if pid == 0:\n"
            "        os.execvp('sleep', ['sleep', '300'])\n"
            "    kids.append(pid)\n"
            "print(json.dumps({'kids': len(kids)}))\n")
    import sandbox
    async with sandbox.Runtime() as rt:
        box = rt.sandbox(pids=64)
        await box.start()
        p = await box.exec(["python3", "-c", code])
        out = await asyncio.wait_for(p.output(), 10)
        assert json.loads(out.stdout) == {"kids": 20}
        assert out.exit_code == 0


@run
async def test_descendant_output_after_destroy_is_released():
    async with running() as (rt, box):
        p = await box.exec(["sh", "-c", "(while :; do echo spam; done) & echo go"])
        out = await asyncio.wait_for(p.output(), 10)
        assert b"go\n" in out.stdout
        await box.destroy()
        assert not box._drains
