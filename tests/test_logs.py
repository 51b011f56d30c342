"""SPEC §10 "Entrypoint logs": per-sandbox bounded rings, logs(follow=)."""
import asyncio
import resource

import pytest

import sandbox
from helpers import run


async def collect(box, follow=False):
    out = {"stdout": bytearray(), "stderr": bytearray()}
    order = []
    async for stream, data in box.logs(follow=follow):
        out[stream] += data
        order.append(stream)
    return bytes(out["stdout"]), bytes(out["stderr"]), order


@run
async def test_entrypoint_output_goes_to_logs_not_runtime_stdio(capfd):
    async with sandbox.Runtime() as rt:
        box = rt.sandbox()
        await box.start(entrypoint=["sh", "-c", "echo to-out; echo to-err >&2"])
        await box.monitor()
        out, err, _ = await collect(box)
        assert out == b"to-out\n" and err == b"to-err\n"
        assert box.log_dropped == {"stdout": 0, "stderr": 0}
    cap = capfd.readouterr()
    assert "to-out" not in cap.out and "to-err" not in cap.err


@run
async def test_logs_keep_order_across_streams():
    async with sandbox.Runtime() as rt:
        box = rt.sandbox()
        await box.start(entrypoint=["sh", "-c", "echo 1; sleep 0.05; echo 2 >&2; sleep 0.05; echo 3"])
        await box.monitor()
        items = [x async for x in box.logs()]
        assert items == [("stdout", b"1\n"), ("stderr", b"2\n"), ("stdout", b"3\n")]


@run
async def test_follow_streams_until_stop():
    async with sandbox.Runtime() as rt:
        box = rt.sandbox()
        await box.start(entrypoint=["sh", "-c", "echo ready; while [ ! -e /tmp/go ]; do sleep 0.02; done;"
                                                " echo after; echo bye >&2"])
        seen = []

        async def follow():
            async for stream, data in box.logs(follow=True):
                seen.append((stream, data))
                if data == b"ready\n":
                    await (await box.exec(["touch", "/tmp/go"])).output()

        await asyncio.wait_for(follow(), 15)
        joined = b"".join(d for s, d in seen if s == "stdout")
        assert joined == b"ready\nafter\n"
        assert (b"".join(d for s, d in seen if s == "stderr")) == b"bye\n"
        await asyncio.wait_for(box.monitor(), 5)


@run
async def test_ring_keeps_last_mib_and_counts_dropped():
    async with sandbox.Runtime() as rt:
        box = rt.sandbox()
        # 3 MiB of numbered 16-byte records on stdout, 10 bytes on stderr.
        script = ("python3 -c \"import sys\n"
                  "w=sys.stdout.buffer.write\n"
                  "[w(b'%015d\\n' % i) for i in range(3*65536)]\n"
                  "sys.stderr.write('err-bytes\\n')\"")
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        await box.start(entrypoint=["sh", "-c", script])
        await box.monitor()
        out, err, _ = await collect(box)
        assert len(out) == 1 << 20
        assert out.endswith(b"%015d\n" % (3 * 65536 - 1))
        assert out.startswith(b"%015d\n" % (2 * 65536))
        assert err == b"err-bytes\n"
        assert box.log_dropped == {"stdout": 2 << 20, "stderr": 0}
        grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
        assert grown_kib < 8 * 1024


@run
async def test_log_limit_per_sandbox():
    async with sandbox.Runtime() as rt:
        box = rt.sandbox(log_limit="4K")
        await box.start(entrypoint=["sh", "-c", "head -c 10000 /dev/zero"])
        await box.monitor()
        out, _, _ = await collect(box)
        assert len(out) == 4096
        assert box.log_dropped["stdout"] == 10000 - 4096
        with pytest.raises(ValueError):
            rt.sandbox(log_limit="lots")


@run
async def test_endless_writer_does_not_block_and_memory_stays_bounded():
    async with sandbox.Runtime() as rt:
        box = rt.sandbox()
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        await box.start(entrypoint=["sh", "-c", "head -c 50000000 /dev/zero; echo finished >&2"])
        await asyncio.wait_for(box.monitor(), 30)
        _, err, _ = await collect(box)
        assert err == b"finished\n"
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 8 * 1024
