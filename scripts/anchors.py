"""Time the anchor runtimes that our benchmarks compare against.

Each `time_*` returns per-run wall seconds of N runs of `true` (spawn to exit of
the runtime's process, as seen from here), and cleans up after itself.

    python3 scripts/anchors.py [N]     # median / p90 in ms, N=30 by default

crun 1.8 on a hybrid host: it refuses to run ("cgroups in hybrid mode not
supported, drop all controllers from cgroupv2") because /sys/fs/cgroup/unified is
a cgroup2 mount with a controller (hugetlb).  We run its loop in a private mount
namespace where /dev/null is bound over /sys/fs/cgroup/unified/cgroup.controllers,
so crun sees the usual controller-less hybrid layout; the host's mounts are
untouched, and crun still makes (and removes) its cgroups, v1 and unified.
(A tmpfs over /sys/fs/cgroup/unified also works, but crun then writes its
"cgroup.procs" into that tmpfs as a plain file.)  No `--cgroup-manager=disabled`:
crun and runc both run with cgroups.  runc 1.1 runs as is.

Each OCI runtime is first probed with `sh -c "exit 7"` (the status must come
back as 7), so a runtime that "succeeds" without running anything is caught.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

BWRAP = ["bwrap", "--unshare-all", "--die-with-parent",
         "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin",
         "--symlink", "usr/sbin", "/sbin", "--symlink", "usr/lib", "/lib",
         "--symlink", "usr/lib64", "/lib64", "--proc", "/proc", "--dev", "/dev",
         "--tmpfs", "/tmp", "true"]
PACKAGES = {"bwrap": "bubblewrap", "crun": "crun", "runc": "runc",
            "nsenter": "util-linux", "unshare": "util-linux"}
# Run argv after hiding the controller-bearing cgroup2 mount (see module docstring).
HIDE_UNIFIED = ('mount --bind /dev/null /sys/fs/cgroup/unified/cgroup.controllers && exec "$@"')


def ensure_installed() -> None:
    """apt-get install whatever of bubblewrap, crun, runc (and util-linux) is missing."""
    missing = sorted({pkg for tool, pkg in PACKAGES.items() if shutil.which(tool) is None})
    if missing:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
                       check=True, env=env)


def _time(argv: list[str], n: int, check_rc: int = 0) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
        times.append(time.perf_counter() - t0)
        if r.returncode != check_rc:
            raise RuntimeError(f"{argv[0]} exited {r.returncode}: {r.stderr.decode().strip()}")
    return times


def time_bwrap(n: int) -> list[float]:
    return _time(BWRAP, n)


# -- OCI runtimes ---------------------------------------------------------------------

@contextlib.contextmanager
def _bundle(runtime: str):
    """A temp OCI bundle: `<runtime> spec`, no terminal, read-only rootfs with host /usr."""
    d = tempfile.mkdtemp(prefix=f"anchor-{runtime}-")
    try:
        subprocess.run([runtime, "spec"], cwd=d, check=True, capture_output=True)
        with open(os.path.join(d, "config.json")) as f:
            cfg = json.load(f)
        cfg["process"]["terminal"] = False
        cfg["process"]["args"] = ["true"]
        cfg["mounts"].append({"destination": "/usr", "type": "bind", "source": "/usr",
                              "options": ["rbind", "ro", "nosuid", "nodev"]})
        _write_config(d, cfg)
        root = os.path.join(d, "rootfs")
        for sub in ("usr", "proc", "dev", "sys", "tmp"):
            os.makedirs(os.path.join(root, sub))
        for link, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"),
                             ("lib64", "usr/lib64")):
            os.symlink(target, os.path.join(root, link))
        yield d, cfg
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _write_config(bundle: str, cfg: dict) -> None:
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(cfg, f)


def _oci_loop(runtime: str, bundle: str, n: int, prefix: str, check_rc: int = 0) -> list[float]:
    """n timed `<runtime> run` of the bundle; unique ids, each deleted --force after
    (untimed; `run` without --detach already deletes, this catches failures)."""
    out = []
    for i in range(n):
        cid = f"{prefix}-{i}"
        try:
            out += _time([runtime, "run", "--bundle", bundle, cid], 1, check_rc)
        finally:
            subprocess.run([runtime, "delete", "--force", cid],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def _oci_argv(runtime: str) -> list[str]:
    """How to run this script's loop for `runtime`: crun in a mount ns without cgroup2."""
    me = [sys.executable, os.path.abspath(__file__), "--loop", runtime]
    if runtime == "crun":
        return ["unshare", "-m", "--propagation", "private", "sh", "-c", HIDE_UNIFIED, "sh", *me]
    return me


def _time_oci(runtime: str, n: int) -> list[float]:
    prefix = f"anchor-{os.getpid()}-{runtime}"
    with _bundle(runtime) as (bundle, cfg):
        # Check that the runtime really runs the workload: an exit status must come through.
        probe = dict(cfg, process=dict(cfg["process"], args=["sh", "-c", "exit 7"]))
        _write_config(bundle, probe)
        try:
            _run_loop(runtime, bundle, 1, prefix + "-probe", check_rc=7)
        finally:
            _sweep_cgroups(prefix + "-probe")
        _write_config(bundle, cfg)
        try:
            return _run_loop(runtime, bundle, n, prefix)
        finally:
            _sweep_cgroups(prefix)


def _sweep_cgroups(prefix: str) -> None:
    """A run that fails half-way can leave its cgroups behind even after delete --force."""
    base = "/sys/fs/cgroup"
    for ctl in os.listdir(base):
        try:
            names = [e for e in os.listdir(os.path.join(base, ctl)) if e.startswith(prefix + "-")]
        except (NotADirectoryError, FileNotFoundError):
            continue
        for name in names:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(base, ctl, name))


def _run_loop(runtime, bundle, n, prefix, check_rc=0) -> list[float]:
    r = subprocess.run([*_oci_argv(runtime), bundle, str(n), prefix, str(check_rc)],
                       capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{runtime}: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout)


def time_crun(n: int) -> list[float]:
    return _time_oci("crun", n)


def time_runc(n: int) -> list[float]:
    return _time_oci("runc", n)


# -- nsenter into a running target --------------------------------------------------------

@contextlib.contextmanager
def nsenter_target():
    """A `sleep` as PID 1 of fresh pid/mount/uts/ipc/net namespaces; yields its host pid."""
    p = subprocess.Popen(["unshare", "--fork", "--kill-child", "--pid", "--mount-proc",
                          "-m", "-u", "-i", "-n", "sh", "-c", "echo ready; exec sleep infinity"],
                         stdout=subprocess.PIPE)
    try:
        if p.stdout.readline() != b"ready\n":  # the child exists once it has spoken
            raise RuntimeError("nsenter target did not start")
        with open(f"/proc/{p.pid}/task/{p.pid}/children") as f:
            target = int(f.read().split()[0])
        pidfd = os.pidfd_open(target)  # pins it: the kill below cannot hit a reused pid
        try:
            yield target
        finally:
            # unshare --fork ignores SIGTERM/SIGINT; killing the namespace's PID 1
            # ends the namespace and unshare with it.
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            os.close(pidfd)
    finally:
        if p.poll() is None:
            p.kill()  # --kill-child: the target gets SIGKILL when unshare dies
        p.wait()
        p.stdout.close()


def time_nsenter(n: int, pid: int | None = None) -> list[float]:
    """`nsenter -a -t PID true`; pid=None starts (and kills) a target of our own."""
    if pid is not None:
        return _time(["nsenter", "-a", "-t", str(pid), "true"], n)
    with nsenter_target() as target:
        return _time(["nsenter", "-a", "-t", str(target), "true"], n)


# -- main ---------------------------------------------------------------------------------

def summary(times: list[float]) -> tuple[float, float]:
    """(median, p90) in ms."""
    ms = sorted(t * 1000 for t in times)
    p90 = statistics.quantiles(ms, n=10, method="inclusive")[-1] if len(ms) > 1 else ms[0]
    return statistics.median(ms), p90


def main(argv: list[str]) -> int:
    if argv[:1] == ["--loop"]:  # internal: the OCI loop, maybe inside a private mount ns
        runtime, bundle, n, prefix, rc = argv[1:6]
        print(json.dumps(_oci_loop(runtime, bundle, int(n), prefix, int(rc))))
        return 0
    n = int(argv[0]) if argv else 30
    ensure_installed()
    print(f"{'anchor':<10} {'median ms':>10} {'p90 ms':>8}   (n={n}, `true`)")
    for label, fn in (("bwrap", time_bwrap), ("crun", time_crun), ("runc", time_runc),
                      ("nsenter", time_nsenter)):
        med, p90 = summary(fn(n))
        print(f"{label:<10} {med:>10.2f} {p90:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
