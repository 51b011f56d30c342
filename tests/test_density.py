"""Density (issue 14): the address plan, exhaustion as a SandboxError raised
before any kernel object of the sandbox exists, and allocation cost flat in N."""
import glob
import ipaddress
import os
import time

import pytest

import netns
import sandbox
from helpers import run
from sandbox import network


def _kernel_objects() -> dict:
    with open("/proc/self/mountinfo") as f:
        mounts = {" ".join(line.split()[3:5]) for line in f}
    return {
        "links": set(os.listdir("/sys/class/net")),
        "cgroups": set(glob.glob("/sys/fs/cgroup/*/sandbox/*/")) | set(glob.glob("/sys/fs/cgroup/sandbox/*/")),
        "mounts": mounts,
        "fds": set(os.listdir("/proc/self/fd")),
    }


def test_address_plan_holds_10000_per_runtime():
    """The documented plan: a /31 per sandbox in a /17 per runtime -- at least
    10 000 sandboxes, slots disjoint and inside the sandbox range."""
    slot = next(network.POOL_SPACE.subnets(new_prefix=network.SLOT_PREFIX))
    pool = netns.AddressPool(str(slot), block_prefix=network.BLOCK_PREFIX)
    assert pool.capacity >= 10_000
    assert len(list(network.POOL_SPACE.subnets(new_prefix=network.SLOT_PREFIX))) >= 16


def test_pool_31_blocks_and_flat_allocation():
    pool = netns.AddressPool("10.9.0.0/29", block_prefix=31)
    blocks = [pool.allocate() for _ in range(4)]
    assert [(str(b.host), str(b.peer), b.prefixlen) for b in blocks[:2]] == [
        ("10.9.0.0", "10.9.0.1", 31), ("10.9.0.2", "10.9.0.3", 31)]
    with pytest.raises(netns.PoolExhausted) as ei:
        pool.allocate()
    assert (ei.value.capacity, ei.value.held) == (4, 4)
    pool.release(blocks[3])
    pool.release(blocks[1])
    assert pool.allocate() == blocks[1]          # the lowest free one first
    assert pool.allocate() == blocks[3]

    # The old pool scanned from the lowest released block: with the first of
    # 16 000 held blocks released and re-taken, each allocate walked them all.
    big = netns.AddressPool("10.64.0.0/16", block_prefix=31)
    held = [big.allocate() for _ in range(16_000)]
    t0 = time.perf_counter()
    for _ in range(2000):
        big.release(held[0])
        held[0] = big.allocate()
        big.allocate()      # the next one above the high-water mark
        big.release(held[0])
        held[0] = big.allocate()
    assert time.perf_counter() - t0 < 0.5
    assert len(big) == 18_000 and len({b.network for b in held}) == len(held)


@run
async def test_pool_exhaustion_is_sandbox_error_before_any_object():
    async with sandbox.Runtime(_pool_blocks=2) as rt:
        a, b = rt.sandbox(), rt.sandbox()
        await a.start(enable_internet=False)
        await b.start(enable_internet=False)
        assert a.address != b.address
        record_before = rt._state.record["sandboxes"]
        before = _kernel_objects()
        c = rt.sandbox()
        with pytest.raises(sandbox.SandboxError) as ei:
            await c.start(enable_internet=False)
        msg = str(ei.value)
        assert "2 blocks" in msg and str(ipaddress.ip_network(msg.split("runtime's ")[1].split()[0])), msg
        assert not isinstance(ei.value, RuntimeError) or isinstance(ei.value, sandbox.SandboxError)
        assert _kernel_objects() == before            # no netns, veth, cgroup, mount or fd
        assert rt._state.record["sandboxes"] == record_before
        assert not c.running
        await c.destroy()
        # The address comes back with the sandbox that held it.
        await a.destroy()
        d = rt.sandbox()
        await d.start(enable_internet=False)
        p = await d.exec(["true"])
        assert await p.exit_code == 0


def test_state_record_changes_are_flat_in_n(tmp_path):
    """A runtime's state record used to be rewritten whole (JSON of every
    sandbox) three times per start: O(N) per start. Changes are now journal
    lines, replayed by load(), compacted when the journal outgrows them."""
    from sandbox import state
    st = state.RuntimeState(tmp_path, "rdensity")
    st.open(table="t")
    try:
        def cycle(i):
            st.add_sandbox(f"s{i}", netns=f"/x/{i}", veth=f"v{i}", block="10.0.0.0/31")
            st.update_sandbox(f"s{i}", cgroup=f"c.{i}")

        def timed(first, k=200):
            t0 = time.perf_counter()
            for i in range(first, first + k):
                cycle(i)
                st.remove_sandbox(f"s{i}")
            return time.perf_counter() - t0

        small = timed(10_000_000)
        for i in range(10_000):
            cycle(i)
        for i in range(0, 10_000, 3):
            st.remove_sandbox(f"s{i}")
        large = timed(20_000_000)
        assert large < 3 * small + 0.05, (small, large)
        (rec,) = state.load_all(tmp_path)
        assert rec["sandboxes"] == st.record["sandboxes"]
        assert list(rec["sandboxes"])[:2] == ["s1", "s2"]
        assert rec["sandboxes"]["s1"] == {"netns": "/x/1", "veth": "v1", "block": "10.0.0.0/31",
                                          "cgroup": "c.1"}
        # A line torn by a kill mid-write is skipped; what came before stays.
        (jname,) = os.listdir(tmp_path / "journal")
        with open(tmp_path / "journal" / jname, "ab") as f:
            f.write(b'["a","torn",{"netns":')
        (rec,) = state.load_all(tmp_path)
        assert "torn" not in rec["sandboxes"] and len(rec["sandboxes"]) == len(st.record["sandboxes"])
    finally:
        st.close()
    assert os.listdir(tmp_path / "journal") == [] and os.listdir(state.runtimes_dir(tmp_path)) == []


@run
async def test_runtime_fds_per_sandbox():
    """Each idle sandbox used to hold six fds in the runtime (netns, pidfd,
    four cgroup.procs on v1): 10 000 of them need more than this host's
    RLIMIT_NOFILE hard limit (20 000), which root without CAP_SYS_RESOURCE
    cannot raise. Now only its pidfd stays; the rest are reopened on use."""
    async with sandbox.Runtime() as rt:
        first = rt.sandbox()
        await first.start(enable_internet=False)
        rt._procs.keep = 2        # the LRU of cgroup.procs fds (64 by default) out of the count
        before = len(os.listdir("/proc/self/fd"))
        boxes = [rt.sandbox() for _ in range(20)]
        for b in boxes:
            await b.start(enable_internet=False)
        for b in boxes:           # exec still joins every cgroup hierarchy (seen from the host)
            p = await b.exec(["sleep", "30"], stdout="ignore", stderr="ignore")
            with open(f"/proc/{p.host_pid}/cgroup") as f:
                lines = [line.strip() for line in f]
            p.kill(9)
            await p.exit_code
            mine = {line.split(":")[1] for line in lines if f"/sandbox/{rt.tag}." in line}
            assert {"memory", "pids", "cpu", "cpuacct"} <= mine, lines
        after = len(os.listdir("/proc/self/fd"))
        assert (after - before) / 20 < 2, (before, after)
