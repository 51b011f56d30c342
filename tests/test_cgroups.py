"""sandbox.cgroups against the real kernel (this host: cgroup v1 for memory/pids/cpu).

Every test has a timeout and leaves no cgroup behind: names carry a per-process
prefix, and the `no_leak` fixture checks /sys/fs/cgroup/*/sandbox after each test.
"""
import ctypes
import dataclasses
import errno
import itertools
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from sandbox import cgroups
from sandbox.cgroups import CgroupError, Limits, MiB, parse_size

pytestmark = pytest.mark.timeout(60)

PREFIX = f"tcg{os.getpid()}-"
_seq = itertools.count()
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="cgroups need root")


def _name():
    return f"{PREFIX}{next(_seq)}"


def _shared_parents():
    base = cgroups.CGROUP_ROOT
    return [os.path.join(base, d, cgroups.SHARED_PARENT) for d in sorted(os.listdir(base))
            if os.path.isdir(os.path.join(base, d))]


def _snapshot():
    return {p: (set(os.listdir(p)) if os.path.isdir(p) else None) for p in _shared_parents()}


@pytest.fixture(autouse=True)
def no_leak():
    before = _snapshot()
    yield
    for parent, kids in _snapshot().items():
        if kids is None:
            continue
        ours = sorted(k for k in kids if k.startswith(PREFIX))
        assert not ours, f"leaked cgroups in {parent}: {ours}"
        if before.get(parent) is None:
            # Made during the test: only acceptable if a concurrent runtime uses it now.
            assert {k for k in kids if os.path.isdir(os.path.join(parent, k))}, \
                f"empty shared parent left behind: {parent}"


def _gated(code, **kw):
    """A python3 child that runs `code` once we write a byte to its stdin."""
    prog = "import os, sys\nos.read(0, 1)\n" + textwrap.dedent(code)
    return subprocess.Popen([sys.executable, "-c", prog], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, **kw)


def _go(proc, timeout=30):
    proc.stdin.write(b"g")
    proc.stdin.close()
    out = proc.stdout.read()
    proc.wait(timeout=timeout)
    return out.decode()


@pytest.fixture
def procs():
    started = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait()
        for f in (p.stdin, p.stdout):
            if f is not None:
                f.close()


# -- pure: sizes, limits, limit plans -------------------------------------------------

@pytest.mark.parametrize("text, n", [
    ("0", 0), ("4096", 4096), (4096, 4096), ("1k", 1024), ("1K", 1024), ("256M", 256 * MiB),
    ("256m", 256 * MiB), ("2G", 2 << 30), (" 3 g ", 3 << 30),
])
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "M", "1.5G", "-1", "1T", "1MB", "1 2M", "0x10", "1Mi"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError) as e:
        parse_size(text)
    assert "\n" not in str(e.value) and repr(text) in str(e.value)


@pytest.mark.parametrize("value", [None, 1.5, True, b"1M", [1]])
def test_parse_size_type(value):
    with pytest.raises(TypeError):
        parse_size(value)


def test_parse_size_negative_int():
    with pytest.raises(ValueError):
        parse_size(-5)


def test_limits_defaults():
    lim = Limits()
    assert (lim.memory, lim.pids, lim.cpus) == (512 * MiB, 1024, None)
    assert Limits.from_args() == lim
    assert Limits.from_args(memory="64M", pids=16, cpus=0.5) == Limits(64 * MiB, 16, 0.5)
    assert Limits(memory="1M").memory == MiB
    with pytest.raises(dataclasses.FrozenInstanceError):
        lim.pids = 3


@pytest.mark.parametrize("kw, exc, field", [
    ({"memory": MiB - 1}, ValueError, "memory"),
    ({"memory": "bad"}, ValueError, "size"),
    ({"memory": 1.0}, TypeError, "size"),
    ({"pids": 0}, ValueError, "pids"),
    ({"pids": True}, TypeError, "pids"),
    ({"pids": 1.0}, TypeError, "pids"),
    ({"cpus": 0}, ValueError, "cpus"),
    ({"cpus": -1.0}, ValueError, "cpus"),
    ({"cpus": 0.001}, ValueError, "cpus"),
    ({"cpus": float("inf")}, ValueError, "cpus"),
    ({"cpus": float("nan")}, ValueError, "cpus"),
    ({"cpus": "1"}, TypeError, "cpus"),
    ({"cpus": False}, TypeError, "cpus"),
])
def test_limits_validation(kw, exc, field):
    with pytest.raises(exc) as e:
        Limits(**kw)
    assert field in str(e.value) and "\n" not in str(e.value)


def test_limit_plans():
    lim = Limits(memory="64M", pids=16, cpus=0.5)
    assert cgroups.v2_limit_writes(lim) == [
        ("memory.max", str(64 * MiB)), ("memory.swap.max", "0"),
        ("pids.max", "16"), ("cpu.max", "50000 100000")]
    assert cgroups.v2_limit_writes(Limits())[-1] == ("cpu.max", "max 100000")
    assert cgroups.v1_limit_writes(lim) == [
        ("memory", "memory.limit_in_bytes", str(64 * MiB)),
        ("memory", "memory.memsw.limit_in_bytes", str(64 * MiB)),
        ("memory", "memory.kmem.tcp.limit_in_bytes", str(64 * MiB)),
        ("pids", "pids.max", "16"),
        ("cpu", "cpu.cfs_period_us", "100000"), ("cpu", "cpu.cfs_quota_us", "50000")]
    assert cgroups.v1_limit_writes(Limits())[-1] == ("cpu", "cpu.cfs_quota_us", "-1")
    assert Limits(cpus=2).cpu_quota_us() == 200000


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".", "..", "-x", "x" * 129, "a b"])
def test_bad_names(name):
    with pytest.raises(ValueError):
        cgroups.create_cgroup(name=name, backend=object())


def test_mkdir_survives_concurrent_parent_removal(tmp_path):
    """Another runtime's close() may rmdir the empty shared parent between our steps."""
    parent = tmp_path / "sandbox"
    removed = []

    def race():
        if not removed:
            removed.append(1)
            os.rmdir(parent)

    path = cgroups._mkdir_child(str(parent), "box", race)
    assert os.path.isdir(path) and removed


def test_detect_here():
    mounts = cgroups._v1_mounts()
    if "memory" in mounts and "pids" in mounts:
        assert cgroups.detect() == "v1"
    else:
        assert cgroups.detect() == "v2"


# -- v1 on the real kernel ---------------------------------------------------------------

def _v1():
    try:
        return cgroups.V1Backend()
    except CgroupError as e:
        pytest.skip(f"no v1 memory+pids hierarchies: {e}")


@needs_root
def test_v1_create_writes_limits_and_close_removes():
    be = _v1()
    name = _name()
    cg = cgroups.create_cgroup(name=name, limits=Limits("64M", 16, 0.5), backend=be)
    try:
        assert cg.dirfd is None
        mem = cg.dirs["memory"]
        assert open(f"{mem}/memory.limit_in_bytes").read().strip() == str(64 * MiB)
        if os.path.exists(f"{mem}/memory.memsw.limit_in_bytes"):
            assert open(f"{mem}/memory.memsw.limit_in_bytes").read().strip() == str(64 * MiB)
        assert open(f"{cg.dirs['pids']}/pids.max").read().strip() == "16"
        assert open(f"{cg.dirs['cpu']}/cpu.cfs_quota_us").read().strip() == "50000"
        assert name in cgroups.list_cgroups(backend=be)
        st = cg.stats()
        assert set(st) == {"memory_current", "memory_max", "pids_current", "cpu_usage_ns",
                           "nr_throttled", "throttled_ns", "oom_kills"}
        assert st["memory_max"] == 64 * MiB and st["pids_current"] == 0 and st["oom_kills"] == 0
        assert not cg.oom_killed()
    finally:
        cg.close()
    assert not any(os.path.exists(p) for p in cg.paths)
    cg.close()  # idempotent


@needs_root
def test_v1_duplicate_name_keeps_the_first():
    be = _v1()
    name = _name()
    with cgroups.create_cgroup(name=name, backend=be) as cg:
        with pytest.raises(CgroupError) as e:
            cgroups.create_cgroup(name=name, backend=be)
        assert e.value.errno == errno.EEXIST
        assert all(os.path.isdir(p) for p in cg.paths)


@needs_root
def test_v1_shared_parent_removed_with_last_cgroup():
    be = _v1()
    a = cgroups.create_cgroup(name=_name(), backend=be)
    b = cgroups.create_cgroup(name=_name(), backend=be)
    parents = {os.path.dirname(p) for p in a.paths}
    a.close()
    assert all(os.path.isdir(p) for p in parents)
    others = {p: set(os.listdir(p)) - {b.name} for p in parents}
    b.close()
    for p in parents:  # gone, unless a concurrent runtime has its own cgroups there
        assert not os.path.exists(p) or any(os.path.isdir(f"{p}/{k}") for k in others[p])


@needs_root
def test_v1_oom_kill(procs):
    be = _v1()
    with cgroups.create_cgroup(name=_name(), limits=Limits(memory="64M"), backend=be) as cg:
        p = _gated("b = b'x' * (200 << 20)\nprint('survived', len(b))")
        procs.append(p)
        cg.join(p.pid)
        assert cg.pids() == [p.pid]
        out = _go(p)
        assert p.returncode == -signal.SIGKILL, out
        assert cg.oom_killed()
        assert cg.stats()["oom_kills"] >= 1


@needs_root
def test_v1_pids_limit_fork_fails_with_eagain(procs):
    be = _v1()
    with cgroups.create_cgroup(name=_name(), limits=Limits(pids=16), backend=be) as cg:
        p = _gated("""
            import errno
            r, w = os.pipe()
            ok = eagain = 0
            kids = []
            for _ in range(100):
                try:
                    pid = os.fork()
                except OSError as e:
                    assert e.errno == errno.EAGAIN, e
                    eagain += 1
                    continue
                if pid == 0:
                    os.close(w)
                    os.read(r, 1)
                    os._exit(0)
                ok += 1
                kids.append(pid)
            os.close(w)
            for k in kids:
                os.waitpid(k, 0)
            print(ok, eagain)
        """)
        procs.append(p)
        cg.join(p.pid)
        ok, eagain = map(int, _go(p).split())
        assert p.returncode == 0
        assert ok + eagain == 100
        assert ok == 15 and eagain == 85  # 16 tasks: the parent and 15 children


@needs_root
def test_v1_cpu_quota_throttles(procs):
    be = _v1()
    if "cpu" not in be.mounts:
        pytest.skip("no v1 cpu hierarchy")
    with cgroups.create_cgroup(name=_name(), limits=Limits(cpus=0.5), backend=be) as cg:
        # Burn 0.4 s of CPU: at half a core over 100 ms periods that spans ~8 periods.
        p = _gated("""
            import time
            while time.process_time() < 0.4:
                pass
        """)
        procs.append(p)
        cg.join(p.pid)
        _go(p)
        assert p.returncode == 0
        st = cg.stats()
        assert st["nr_throttled"] > 0 and st["throttled_ns"] > 0, st
        if st["cpu_usage_ns"] is not None:
            assert st["cpu_usage_ns"] >= 0.35e9, st


@needs_root
def test_v1_close_kills_a_forking_tree(procs):
    """close() on a busy cgroup: kill_all loops until cgroup.procs is empty, then rmdir."""
    be = _v1()
    cg = cgroups.create_cgroup(name=_name(), limits=Limits(pids=32), backend=be)
    try:
        p = subprocess.Popen(["sh", "-c", "read x; sleep 100 & echo up; "
                              "while :; do sleep 100 & done 2>/dev/null"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        procs.append(p)
        cg.join(p.pid)
        p.stdin.write(b"\n")
        p.stdin.flush()
        assert p.stdout.readline() == b"up\n"
        members = cg.pids()
        assert p.pid in members and len(members) >= 2
    finally:
        cg.close()
    assert p.wait(timeout=10) == -signal.SIGKILL
    assert not any(os.path.exists(d) for d in cg.paths)
    for pid in members:
        assert _gone_or_zombie(pid)


def _gone_or_zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@needs_root
def test_v1_gc_remove_by_name(procs):
    be = _v1()
    name = _name()
    cg = cgroups.create_cgroup(name=name, backend=be)
    p = subprocess.Popen(["sleep", "100"])
    procs.append(p)
    cg.join(p.pid)
    assert name in cgroups.list_cgroups(backend=be)
    assert cgroups.remove_cgroup_by_name(name, backend=be) is True
    assert p.wait(timeout=10) == -signal.SIGKILL
    assert name not in cgroups.list_cgroups(backend=be)
    assert cgroups.remove_cgroup_by_name(name, backend=be) is False
    cg.close()  # the runtime's own close after gc: ENOENT tolerated


@needs_root
def test_kill_all_never_signals_a_non_member(procs):
    be = _v1()
    with cgroups.create_cgroup(name=_name(), backend=be) as cg:
        outsider = subprocess.Popen(["sleep", "100"])
        procs.append(outsider)
        assert cg._pidfd_of_member(outsider.pid) is None
        assert cg.kill_all() is True
        assert outsider.poll() is None


# -- v2: a private cgroup2 mount ------------------------------------------------------

V2_WHY = ("memory, pids and cpu are bound to the v1 hierarchies mounted under /sys/fs/cgroup; "
          "the kernel attaches each controller to one hierarchy at a time and gives it to "
          "cgroup2 only when no v1 hierarchy holds it (or at boot with cgroup_no_v1=), so "
          "cgroup2 here only has: {have}")


@pytest.fixture
def cgroup2_root(tmp_path):
    mnt = tmp_path / "cg2"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "cgroup2", "none", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount cgroup2: {r.stderr.strip()}")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@needs_root
def test_v2_refuses_without_memory_and_pids(cgroup2_root):
    be = cgroups.V2Backend(root=cgroup2_root)
    have = be.controllers()
    if {"memory", "pids"} <= have:
        pytest.skip("this cgroup2 has memory and pids: the refusal path does not apply")
    with pytest.raises(CgroupError) as e:
        cgroups.create_cgroup(name=_name(), backend=be)
    assert e.value.errno == errno.ENOTSUP and "memory" in str(e.value)
    assert not os.path.exists(os.path.join(cgroup2_root, "sandbox"))


@needs_root
def test_v2_limits_written(cgroup2_root):
    be = cgroups.V2Backend(root=cgroup2_root)
    have = be.controllers()
    if not {"memory", "pids", "cpu"} <= have:
        pytest.skip("v2 limit files cannot exist on this kernel: "
                    + V2_WHY.format(have=" ".join(sorted(have)) or "nothing"))
    with cgroups.create_cgroup(name=_name(), limits=Limits("64M", 16, 0.5), backend=be) as cg:
        d = cg.dirs[""]
        assert open(f"{d}/memory.max").read().strip() == str(64 * MiB)
        assert open(f"{d}/pids.max").read().strip() == "16"
        assert open(f"{d}/cpu.max").read().split() == ["50000", "100000"]
        assert cg.stats()["memory_max"] == 64 * MiB


@needs_root
def test_v2_lifecycle_join_kill_close(cgroup2_root, procs):
    """Everything of the v2 backend that needs no controller: mkdir, dirfd, cgroup.procs,
    cpu.stat, cgroup.kill, rmdir of the cgroup and of the shared parent."""
    be = cgroups.V2Backend(root=cgroup2_root, required=())
    name = _name()
    cg = cgroups.create_cgroup(name=name, limits=Limits("64M", 16, 0.5), backend=be)
    try:
        d = cg.dirs[""]
        assert os.path.samestat(os.fstat(cg.dirfd), os.stat(d))
        assert name in cgroups.list_cgroups(backend=be)
        p = subprocess.Popen(["sleep", "100"])
        procs.append(p)
        cg.join(p.pid)
        assert f"0::/sandbox/{name}\n" in open(f"/proc/{p.pid}/cgroup").read()
        assert cg.pids() == [p.pid]
        st = cg.stats()
        assert st["cpu_usage_ns"] is not None and st["pids_current"] is None
        assert os.path.exists(f"{d}/cgroup.kill")
        assert cg.kill_all() is True
        assert p.wait(timeout=10) == -signal.SIGKILL
    finally:
        cg.close()
    assert not os.path.exists(os.path.join(cgroup2_root, "sandbox"))


CLONE_INTO_CGROUP = 0x200000000
SYS_clone3 = {"x86_64": 435, "aarch64": 435}.get(os.uname().machine)


class _CloneArgs(ctypes.Structure):
    _fields_ = [(f, ctypes.c_uint64) for f in (
        "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack", "stack_size",
        "tls", "set_tid", "set_tid_size", "cgroup")]


@needs_root
@pytest.mark.skipif(SYS_clone3 is None, reason="clone3 number unknown for this arch")
def test_v2_dirfd_clone_into_cgroup(cgroup2_root):
    """The child of clone3(CLONE_INTO_CGROUP, cgroup=dirfd) starts inside the cgroup."""
    be = cgroups.V2Backend(root=cgroup2_root, required=())
    name = _name()
    with cgroups.create_cgroup(name=name, backend=be) as cg:
        r, w = os.pipe()
        args = _CloneArgs(flags=CLONE_INTO_CGROUP, exit_signal=signal.SIGCHLD, cgroup=cg.dirfd)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        pid = libc.syscall(ctypes.c_long(SYS_clone3), ctypes.byref(args),
                           ctypes.c_size_t(ctypes.sizeof(args)))
        if pid == 0:  # child: like fork(), but already in the cgroup; exec at once
            try:
                os.dup2(w, 1)
                os.execv("/bin/cat", ["cat", "/proc/self/cgroup"])
            finally:
                os._exit(127)
        os.close(w)
        assert pid > 0, os.strerror(ctypes.get_errno())
        with os.fdopen(r) as f:
            out = f.read()
        assert os.waitpid(pid, 0)[1] == 0
        assert f"0::/sandbox/{name}\n" in out


@needs_root
def test_private_mount_namespace_cannot_give_cgroup2_controllers(tmp_path):
    """Even with every v1 hierarchy unmounted in a private mount namespace, a fresh
    cgroup2 mount has no memory/pids: the hierarchies stay alive (mounted in the host
    namespace) and keep their controllers; only booting with cgroup_no_v1= frees them."""
    if cgroups.detect() == "v2":
        pytest.skip("pure v2 host: controllers are already on cgroup2")
    mnt = tmp_path / "cg2"
    mnt.mkdir()
    script = (f"mount --make-rprivate / && "
              f"for d in /sys/fs/cgroup/*; do umount $d 2>/dev/null; done; "
              f"grep -c ' cgroup ' /proc/self/mounts; "
              f"mount -t cgroup2 none {mnt} && cat {mnt}/cgroup.controllers && "
              f"python3 -c \"import os; os.write(os.open('{mnt}/cgroup.subtree_control', "
              f"os.O_WRONLY), b'+memory')\"")
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True)
    lines = r.stdout.split("\n")
    assert lines[0] == "0"  # no v1 hierarchy visible in that namespace
    assert "memory" not in lines[1].split() and "pids" not in lines[1].split()
    assert r.returncode != 0 and "No such file or directory" in r.stderr  # +memory: ENOENT
