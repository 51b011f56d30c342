"""Crash-safe runtime records (sandbox.state) and `sandbox gc` (sandbox.gc) on the real kernel.

The "dead runtime" is a forked child that does what a runtime does — writes its
record first, then creates the host network, netns, veths and cgroups — and is
then SIGKILLed, so its pid and start time are genuinely dead.  The processes
inside its cgroups are our own children (so the test can reap them and see
the SIGKILL).  Names are unique per test process (tag, link prefix, address
range) so concurrent suites cannot collide with ours.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback

import psutil
import pytest
from pyroute2 import IPRoute

import netns
import sandbox.runtime
from netns import AddressPool, HostNetwork, NetNS, Veth
from netns import gc as netns_gc
from netns._threads import run_in_thread
from sandbox import cgroups
from sandbox import gc as sgc
from sandbox import state

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

_ID = os.getpid() % 100000
TAG = f"g{_ID}"
PREFIX = f"g{_ID}h"             # host ends g12345h0.. (<= 15 chars)
CG_PREFIX = f"{TAG}."
CIDR = f"10.249.{_ID % 256}.0/24"
TABLE_NAME = netns.table_name(TAG)
MARK, RT_TABLE = netns.derive_mark_table(TAG)
CLI = [sys.executable, "-c", "from sandbox.cli import main; main()"]

runtime_writes_state = hasattr(sandbox.runtime.Runtime, "_state")


# -- helpers -----------------------------------------------------------------------

def _our_rules() -> list[tuple[int, int]]:
    def dump():
        with IPRoute() as ipr:
            return [(r.get("FRA_FWMARK"), r.get("FRA_TABLE")) for r in ipr.rule("dump")
                    if r.get("FRA_FWMARK") == MARK or r.get("FRA_TABLE") == RT_TABLE]
    return run_in_thread(dump)


def _our_routes() -> list:
    def dump():
        with IPRoute() as ipr:
            return ipr.route("dump", table=RT_TABLE)
    return [r for r in run_in_thread(dump) if r.get("table") == RT_TABLE or
            r.get("RTA_TABLE") == RT_TABLE]


def _mounts_under(path) -> list[str]:
    prefix = os.path.realpath(path)
    return [m for m in sgc._mount_points() if m == prefix or m.startswith(prefix + "/")]


def _our_cgroups() -> list[str]:
    return [n for n in cgroups.list_cgroups() if n.startswith(CG_PREFIX)]


def _kernel_objects(tmp_path) -> dict:
    return {
        "links": netns_gc.list_links(PREFIX),
        "table": TABLE_NAME in netns_gc.list_tables(),
        "rules": _our_rules(),
        "routes": bool(_our_routes()),
        "mounts": _mounts_under(tmp_path),
        "cgroups": _our_cgroups(),
    }


NOTHING = {"links": [], "table": False, "rules": [], "routes": False, "mounts": [], "cgroups": []}


def _dead_pid() -> tuple[int, float]:
    """pid and start time of a process that existed and is gone (reaped)."""
    p = subprocess.Popen(["sleep", "100"])
    start = psutil.Process(p.pid).create_time()
    p.kill()
    p.wait()
    return p.pid, start


def _write_record(tmp_path, tag: str, pid: int, start: float, host: dict, sandboxes: dict) -> str:
    os.makedirs(state.runtimes_dir(tmp_path), exist_ok=True)
    path = state.record_path(tmp_path, tag)
    with open(path, "w") as f:
        json.dump({"version": 1, "pid": pid, "start_time": start, "tag": tag, "host": host,
                   "sandboxes": sandboxes}, f)
    return path


class FakeRuntime:
    """A forked "runtime" that records and creates real objects, then waits to be killed.

    `processes` are our own children (`sleep 100`) moved into its sandboxes' cgroups.
    """

    def __init__(self, tmp_path, n: int = 2):
        self.tmp_path = tmp_path
        self.n = n
        self.pid = 0
        self.processes: list[subprocess.Popen] = []
        self.netns_paths = [str(tmp_path / "netns" / f"sb{i}") for i in range(n)]
        self.cgroup_names = [f"{CG_PREFIX}{i}" for i in range(n)]

    def start(self) -> "FakeRuntime":
        ready_r, ready_w = os.pipe()
        hold_r, hold_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the runtime-to-be-killed
            code = 1
            try:
                os.close(ready_r)
                os.close(hold_w)
                self._child()
                os.write(ready_w, b"k")
                os.read(hold_r, 1)  # until SIGKILL (or the parent dies: EOF)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        self.pid = pid
        self._hold_w = hold_w
        os.close(ready_w)
        os.close(hold_r)
        try:
            ok = os.read(ready_r, 1) == b"k"
        finally:
            os.close(ready_r)
        if not ok:
            self.kill()
            raise AssertionError("the fake runtime failed to set up (see its stderr)")
        backend = cgroups.default_backend()
        for name in self.cgroup_names:
            p = subprocess.Popen(["sleep", "100"])
            self.processes.append(p)
            backend.open(cgroups.SHARED_PARENT, name).join(p.pid)
        return self

    def _child(self) -> None:
        st = state.RuntimeState(self.tmp_path, TAG)
        st.open(table=TABLE_NAME, mark=MARK, rt_table=RT_TABLE, prefix=PREFIX,
                netns_dir=str(self.tmp_path / "netns"), cgroup_prefix=CG_PREFIX)
        HostNetwork(TAG, PREFIX, 1080, 1053).setup()
        pool = AddressPool(CIDR)
        for i in range(self.n):
            block = pool.allocate()
            st.add_sandbox(f"sb{i}", netns=self.netns_paths[i], veth=f"{PREFIX}{i}",
                           cgroup=self.cgroup_names[i], block=str(block.network))
            cgroups.create_cgroup(name=self.cgroup_names[i])
            ns = NetNS.create(self.tmp_path, f"sb{i}")
            Veth.create(ns, f"{PREFIX}{i}", block)

    @property
    def record_path(self) -> str:
        return state.record_path(self.tmp_path, TAG)

    def kill(self) -> None:
        """kill -9 the runtime and reap it: from now on its pid + start time are dead."""
        if self.pid:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.pid = 0
            os.close(self._hold_w)

    def cleanup(self) -> None:
        """Whatever the test asserted, leave nothing behind."""
        self.kill()
        for name in self.cgroup_names:
            with contextlib.suppress(Exception):
                cgroups.remove_cgroup_by_name(name)
        for p in self.processes:
            if p.poll() is None:
                p.kill()
            p.wait()
        for i, path in enumerate(self.netns_paths):
            netns_gc.remove_link(f"{PREFIX}{i}")
            netns_gc.remove_netns(path)
        netns_gc.remove_table(TABLE_NAME)
        netns_gc.remove_rule(MARK, RT_TABLE)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.record_path)


@pytest.fixture
def fake_runtime(tmp_path):
    rt = FakeRuntime(tmp_path)
    try:
        yield rt
    finally:
        rt.cleanup()


# -- state.py ----------------------------------------------------------------------

def test_state_record_lifecycle(tmp_path):
    st = state.RuntimeState(tmp_path, TAG)
    st.open(table=TABLE_NAME, mark=MARK, rt_table=RT_TABLE, prefix=PREFIX)
    try:
        (rec,) = state.load_all(tmp_path)
        me = psutil.Process()
        assert rec["pid"] == os.getpid() and abs(rec["start_time"] - me.create_time()) < 0.01
        assert rec["start_ticks"] == state._start_ticks(os.getpid())
        assert rec["tag"] == TAG and rec["host"]["table"] == TABLE_NAME and rec["sandboxes"] == {}
        assert state.owner_status(rec) == "alive"

        st.update_host(proxy_port=1234)
        st.add_sandbox("a", netns="/x/netns/a", veth=PREFIX + "0", cgroup="c.a", block="10.0.0.0/30")
        st.add_sandbox("b", veth=PREFIX + "1")
        st.update_sandbox("b", cgroup="c.b")
        (rec,) = state.load_all(tmp_path)
        assert rec["host"]["proxy_port"] == 1234 and rec["host"]["mark"] == MARK
        assert list(rec["sandboxes"]) == ["a", "b"]  # creation order is kept
        assert rec["sandboxes"]["b"] == {"veth": PREFIX + "1", "cgroup": "c.b"}
        st.remove_sandbox("a")
        st.remove_sandbox("a")  # unknown: no-op
        (rec,) = state.load_all(tmp_path)
        assert list(rec["sandboxes"]) == ["b"]
        assert os.listdir(state.runtimes_dir(tmp_path)) == [f"{TAG}.json"]  # no temp files

        # A second runtime with the same tag must not clobber the record.
        with pytest.raises(FileExistsError, match="live runtime"):
            state.RuntimeState(tmp_path, TAG).open()
    finally:
        st.close()
    assert os.listdir(state.runtimes_dir(tmp_path)) == []
    st.close()  # idempotent
    with pytest.raises(RuntimeError):
        st.add_sandbox("c")
    with pytest.raises(ValueError):
        state.RuntimeState(tmp_path, "../x")


def test_state_write_cost(tmp_path):
    """Each call is one small atomic write: well under 0.5 ms (measured ~25-40 us)."""
    st = state.RuntimeState(tmp_path, TAG)
    st.open(table=TABLE_NAME, mark=MARK, rt_table=RT_TABLE, prefix=PREFIX)
    try:
        for i in range(8):  # a realistic record: eight live sandboxes
            st.add_sandbox(f"s{i}", netns=f"{tmp_path}/netns/s{i}", veth=f"{PREFIX}{i}",
                           cgroup=f"{TAG}.{i:016x}", block=f"10.213.0.{4 * i}/30")
        times = []
        for i in range(300):
            t = time.perf_counter()
            st.add_sandbox("s9", netns=f"{tmp_path}/netns/s9", veth=f"{PREFIX}9",
                           cgroup=f"{TAG}.{i:016x}", block="10.213.0.36/30")
            t1 = time.perf_counter()
            st.remove_sandbox("s9")
            times += [t1 - t, time.perf_counter() - t1]
        median = statistics.median(times)
        print(f"state write: median {median * 1e6:.1f} us, "
              f"p90 {sorted(times)[int(len(times) * 0.9)] * 1e6:.1f} us")
        assert median < 0.0005
    finally:
        st.close()


def test_is_alive():
    me = psutil.Process()
    assert state.is_alive(me.pid, me.create_time())
    assert state.is_alive(me.pid, me.create_time() + 0.004)  # rounding
    assert not state.is_alive(me.pid, me.create_time() - 1)  # a recycled pid
    assert not state.is_alive(*_dead_pid())
    assert not state.is_alive(0, 0.0) and not state.is_alive(-1, 0.0)
    assert not state.is_alive("1", 0.0)
    ticks = state._start_ticks(me.pid)
    assert state.is_alive(me.pid, 0.0, ticks)  # ticks win over a shifted wall clock
    assert not state.is_alive(me.pid, me.create_time(), ticks + 1)
    # A zombie holds nothing: its runtime is dead.
    p = subprocess.Popen(["true"])
    start = psutil.Process(p.pid).create_time()
    os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
    try:
        assert not state.is_alive(p.pid, start)
    finally:
        p.wait()


# -- gc ----------------------------------------------------------------------------

def test_gc_removes_everything_of_a_killed_runtime(tmp_path, fake_runtime):
    """(a) kill -9 of a runtime with two sandboxes; collect removes every object."""
    assert _kernel_objects(tmp_path) == NOTHING
    rt = fake_runtime.start()
    during = _kernel_objects(tmp_path)
    assert during["links"] == [f"{PREFIX}0", f"{PREFIX}1"]
    assert during["table"] and during["rules"] and during["routes"]
    assert sorted(during["cgroups"]) == sorted(rt.cgroup_names)
    assert len(during["mounts"]) == 3  # the netns dir + two namespaces
    rt.kill()

    report = sgc.collect([tmp_path])
    assert report.errors == [] and report.problems == [] and report.skipped == []
    for p in rt.processes:  # the sandboxes' processes were SIGKILLed
        assert p.wait(timeout=10) == -signal.SIGKILL
    assert _kernel_objects(tmp_path) == NOTHING
    assert not os.path.exists(rt.record_path)
    kinds = [r.kind for r in report.removed]
    assert {"processes", "cgroup", "link", "netns", "nft-table", "ip-rule", "mount", "state"} \
        <= set(kinds)
    assert kinds[-1] in ("state", "mount", "cgroup")  # the record after the runtime's objects
    # Newest sandbox first; processes, then the veth, then the netns.
    order = [str(r) for r in report.removed if r.kind in ("cgroup", "link", "netns")]
    assert order[:3] == [f"cgroup sandbox/{CG_PREFIX}1", f"link {PREFIX}1",
                         f"netns {os.path.realpath(rt.netns_paths[1])}"]
    assert kinds.index("state") > kinds.index("nft-table") > kinds.index("netns")

    again = sgc.collect([tmp_path])  # idempotent
    assert again.removed == [] and again.errors == []


def test_gc_never_touches_a_live_runtime(tmp_path, fake_runtime):
    """(b) the same runtime, alive: nothing is removed; once killed, all of it is."""
    rt = fake_runtime.start()
    before = _kernel_objects(tmp_path)
    report = sgc.collect([tmp_path, tmp_path])  # a duplicate dir is scanned once
    assert report.removed == [] and report.errors == []
    assert report.skipped == [f"runtime {TAG} (pid {rt.pid}, alive)"]
    assert _kernel_objects(tmp_path) == before
    assert all(p.poll() is None for p in rt.processes)
    assert os.path.exists(rt.record_path)

    # Also when the owner is this very process (a runtime running gc in-process).
    own = state.RuntimeState(tmp_path, TAG + "x")
    own.open(table=TABLE_NAME, mark=MARK, rt_table=RT_TABLE, prefix=PREFIX)
    try:
        own.add_sandbox("s", netns=rt.netns_paths[0], veth=f"{PREFIX}0", cgroup=rt.cgroup_names[0])
        report = sgc.collect([tmp_path])
        assert report.removed == [] and report.errors == [] and len(report.skipped) == 2
        assert _kernel_objects(tmp_path) == before
    finally:
        own.close()

    rt.kill()
    assert sgc.collect([tmp_path]).errors == []
    assert _kernel_objects(tmp_path) == NOTHING


def test_gc_skips_torn_and_garbage_records(tmp_path):
    """(c) unreadable files are reported and left alone; gc does not crash."""
    d = state.runtimes_dir(tmp_path)
    os.makedirs(d)
    files = {
        "torn": b'{"pid": 12, "start_ti',
        "garbage": b"\xff\xfe\x00",
        "list": b"[1, 2]",
        "notag": json.dumps({"pid": 1, "start_time": 0, "tag": "other", "host": {},
                             "sandboxes": {}}).encode(),
        "badpid": json.dumps({"pid": "1", "start_time": 0, "tag": "badpid", "host": {},
                              "sandboxes": {}}).encode(),
    }
    for name, data in files.items():
        with open(os.path.join(d, name + ".json"), "wb") as f:
            f.write(data)
    with open(os.path.join(d, "x.json.tmp"), "wb") as f:  # an in-flight write: ignored
        f.write(b"{")
    problems: list = []
    assert state.load_all(tmp_path, problems) == []
    assert sorted(os.path.basename(p) for p, _ in problems) == sorted(f"{n}.json" for n in files)
    report = sgc.collect([tmp_path])
    assert report.errors == [] and report.removed == [] and len(report.problems) == len(files)
    assert sorted(os.listdir(d)) == sorted([f"{n}.json" for n in files] + ["x.json.tmp"])


def test_gc_half_made_runtime(tmp_path):
    """(d) a record lists objects that never came to be (killed right after the write)."""
    pid, start = _dead_pid()
    ns_dir = tmp_path / "netns"
    ns_dir.mkdir()
    (ns_dir / "sb1").touch()  # a mount-point file whose mount never happened
    path = _write_record(tmp_path, TAG, pid, start,
                         {"table": TABLE_NAME, "mark": MARK, "rt_table": RT_TABLE,
                          "prefix": PREFIX, "netns_dir": str(ns_dir), "cgroup_prefix": CG_PREFIX},
                         {"sb0": {"netns": str(ns_dir / "sb0"), "veth": f"{PREFIX}0",
                                  "cgroup": f"{CG_PREFIX}0", "block": "10.249.0.0/30"},
                          "sb1": {"netns": str(ns_dir / "sb1")},
                          "sb2": {}})
    with open(path[:-5] + ".json.tmp", "w") as f:  # and a write it never finished
        f.write("{")
    report = sgc.collect([tmp_path])
    assert report.errors == []
    assert [str(r) for r in report.removed] == [
        f"netns {os.path.realpath(ns_dir / 'sb1')} (unmounted file)", f"state {path}"]
    assert os.listdir(state.runtimes_dir(tmp_path)) == [] and os.listdir(ns_dir) == []
    assert sgc.collect([tmp_path]).removed == []


def test_gc_refuses_names_outside_its_reach(tmp_path):
    """A record naming foreign objects: errors, nothing touched, the record kept for a look."""
    pid, start = _dead_pid()
    victim = tmp_path / "victim"
    victim.touch()
    path = _write_record(tmp_path, TAG, pid, start,
                         {"table": "filter", "mark": MARK, "rt_table": 254, "prefix": "e"},
                         {"sb0": {"netns": str(victim), "cgroup": "../..", "veth": "lo/"}})
    try:
        report = sgc.collect([tmp_path])
        assert len(report.errors) == 5, report.errors
        assert report.removed == []
        assert victim.exists() and os.path.exists(path)
        assert "lo" in netns_gc.list_links("lo")
    finally:
        os.unlink(path)


def test_cli_gc(tmp_path):
    pid, start = _dead_pid()
    path = _write_record(tmp_path, TAG, pid, start, {"table": TABLE_NAME}, {"sb0": {}})
    r = subprocess.run([*CLI, "--state-dir", str(tmp_path), "gc"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert f"removed state {path}\n" in r.stdout
    assert not os.path.exists(path)

    r = subprocess.run([*CLI, "--state-dir", str(tmp_path), "gc"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0 and "removed state" not in r.stdout

    # A failure: one line, exit 125, no traceback; the record stays.
    path = _write_record(tmp_path, TAG, pid, start, {"table": "filter"}, {})
    try:
        r = subprocess.run([*CLI, "--state-dir", str(tmp_path), "gc"], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 125, (r.stdout, r.stderr)
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("sandbox: gc: runtime") and "Traceback" not in r.stderr
        assert os.path.exists(path)
    finally:
        os.unlink(path)


def test_cli_gc_nothing(tmp_path):
    from click.testing import CliRunner

    from sandbox.cli import cli

    r = CliRunner().invoke(cli, ["--state-dir", str(tmp_path), "gc"])
    assert r.exit_code == 0, r.output
    assert r.output.endswith("nothing to collect\n") or "removed" in r.output


def test_gc_after_kill_9_of_sandbox_run(tmp_path):
    """End to end: kill -9 `sandbox run -- sleep 100`, then `sandbox gc` leaves nothing."""
    runner = subprocess.Popen(
        [*CLI, "--state-dir", str(tmp_path), "run", "--", "/bin/sh", "-c", "echo ready; exec sleep 100"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    inside: list[psutil.Process] = []
    try:
        # The entrypoint printed: the sandbox (netns, veth, cgroup...) is up.
        line = runner.stdout.readline()
        if line != b"ready\n":
            runner.kill()
            _, err = runner.communicate(timeout=10)
            pytest.fail(f"sandbox run did not start: {line!r} {err.decode(errors='replace')}")
        (record,) = state.load_all(tmp_path)
        assert record["pid"] == runner.pid and record["sandboxes"]
        backend = cgroups.default_backend()
        for objs in record["sandboxes"].values():
            if "cgroup" not in objs:   # a ready (warm) netns no sandbox took yet
                continue
            cg = backend.open(cgroups.SHARED_PARENT, objs["cgroup"])
            inside += [psutil.Process(pid) for pid in cg.pids()]
        assert inside
        os.kill(runner.pid, signal.SIGKILL)  # the runtime itself, by its exact pid
        assert runner.wait(timeout=10) == -signal.SIGKILL
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()

    r = subprocess.run([*CLI, "--state-dir", str(tmp_path), "gc"], capture_output=True,
                       text=True, timeout=60)
    runner.stdout.close()
    runner.stderr.close()
    assert r.returncode == 0, r.stderr
    assert "removed state" in r.stdout and "removed cgroup" in r.stdout
    if any("netns" in objs for objs in record["sandboxes"].values()):
        assert "removed netns" in r.stdout
    for p in inside:  # killed (reaped by whoever inherited them, or a zombie awaiting that)
        with contextlib.suppress(psutil.NoSuchProcess):
            assert p.status() == psutil.STATUS_ZOMBIE
    assert state.load_all(tmp_path) == []
    assert _mounts_under(tmp_path) == []


def test_gc_finds_a_dead_runtime_whose_state_file_is_gone(tmp_path):
    """The nft table names its owner: gc needs no state file to judge it dead."""
    sd = tmp_path / "lost"
    runner = subprocess.Popen(
        [*CLI, "--state-dir", str(sd), "run", "--", "/bin/sh", "-c", "echo ready; exec sleep 100"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert runner.stdout.readline() == b"ready\n"
        (record,) = state.load_all(sd)
        tag = record["tag"]
        os.kill(runner.pid, signal.SIGKILL)
        assert runner.wait(timeout=10) == -signal.SIGKILL
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
        runner.stdout.close()
        runner.stderr.close()
    os.unlink(record["path"])                 # the state file is lost
    report = sgc.collect([tmp_path / "elsewhere"])
    kinds = {r.kind for r in report.removed}
    assert not report.errors, report.errors
    assert {"nft-table", "cgroup", "netns"} <= kinds, report.removed
    from netns import gc as netns_gc
    assert netns_gc.list_links(f"s{tag}h") == []
    assert f"sandbox_{tag}" not in netns_gc.list_tables()
    assert not any(name.startswith(f"{tag}.") for name in cgroups.list_cgroups())
    # Only the directory pin of the lost state dir remains (no netns inside).
    with open("/proc/self/mountinfo") as f:
        left = [line.split()[4] for line in f if str(sd) in line.split()[4]]
    for path in sorted(left, reverse=True):
        subprocess.run(["umount", "-l", path], check=True)
