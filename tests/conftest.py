"""Test harness: root only, a hard timeout on every test (pyproject), and an
autouse leak guard that snapshots kernel objects and our own process state
before and after each test and fails on any difference (DESIGN §6.12)."""
from __future__ import annotations

import glob
import os
import subprocess

import psutil
import pytest

if os.geteuid() != 0:  # pragma: no cover
    pytest.exit("the sandbox tests need root (real namespaces, nft, cgroups)", returncode=2)


def _netns() -> set[str]:
    out = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    return out


def _links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


def _nft_tables() -> set[str]:
    try:
        r = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, timeout=10)
        return set(r.stdout.split("\n")) - {""}
    except FileNotFoundError:
        return set()


def _ip_rules() -> set[str]:
    r = subprocess.run(["ip", "rule", "show"], capture_output=True, text=True, timeout=10)
    return set(r.stdout.split("\n")) - {""}


def _cgroups() -> set[str]:
    return set(glob.glob("/sys/fs/cgroup/*/sandbox/*/")) | set(glob.glob("/sys/fs/cgroup/sandbox/*/")) \
        | set(glob.glob("/sys/fs/cgroup/*/sandbox/"))


def _mounts() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {" ".join(line.split()[3:5]) for line in f}


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _fds() -> set[int]:
    return {int(x) for x in os.listdir("/proc/self/fd")}


SNAPSHOTS = {
    "netns": _netns, "links": _links, "nft tables": _nft_tables, "ip rules": _ip_rules,
    "cgroups": _cgroups, "mounts": _mounts, "child processes": _children,
}


@pytest.fixture(autouse=True)
def leak_guard(request):
    if request.node.get_closest_marker("no_leak_guard"):
        yield
        return
    before = {k: f() for k, f in SNAPSHOTS.items()}
    fds_before = _fds()
    yield
    leaks = []
    for k, f in SNAPSHOTS.items():
        extra = f() - before[k]
        if extra:
            leaks.append(f"{k}: {sorted(map(str, extra))}")
    # an fd opened by the test's listdir itself is gone again by now
    extra_fds = {fd for fd in _fds() - fds_before if os.path.exists(f"/proc/self/fd/{fd}")}
    if extra_fds:
        leaks.append("fds: " + ", ".join(f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}"
                                          for fd in sorted(extra_fds)
                                          if os.path.exists(f"/proc/self/fd/{fd}")))
    if leaks:
        pytest.fail("leaked: " + "; ".join(leaks))


def pytest_configure(config):
    config.addinivalue_line("markers", "no_leak_guard: the test checks leaks itself")
