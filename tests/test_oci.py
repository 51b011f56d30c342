"""sandbox-oci (SPEC §12): runc's command line over the common executor,
driven as containerd drives runc — each command a new process — against
bundles built from the host's static busybox."""
from __future__ import annotations

import array
import glob
import json
import os
import select
import shutil
import socket
import subprocess
import sys

import pytest

BUSYBOX = "/bin/busybox"
pytestmark = pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="busybox-static not installed")
APPLETS = ("sh", "echo", "sleep", "cat", "id", "true", "mkdir", "touch", "grep", "ls", "hostname")


def oci(root, *args, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=30):
    if stdout is not subprocess.PIPE:  # run: the container writes there too
        with open(os.path.join(os.path.dirname(stdout.name), "cli.err"), "w+") as err:
            r = subprocess.run([sys.executable, "-m", "sandbox.oci.cli", "--root", str(root), *args],
                               stdout=stdout, stderr=err, stdin=stdin, text=True, timeout=timeout)
            err.seek(0)
            r.stderr = err.read()
            return r
    return subprocess.run([sys.executable, "-m", "sandbox.oci.cli", "--root", str(root), *args],
                          stdout=stdout, stderr=subprocess.PIPE, stdin=stdin, text=True,
                          timeout=timeout)


@pytest.fixture
def env(tmp_path):
    root = tmp_path / "state"
    bundle = tmp_path / "bundle"
    (bundle / "rootfs" / "bin").mkdir(parents=True)
    (bundle / "rootfs" / "tmp").mkdir()
    shutil.copy(BUSYBOX, bundle / "rootfs" / "bin" / "busybox")
    for a in APPLETS:
        os.symlink("busybox", bundle / "rootfs" / "bin" / a)
    r = oci(root, "spec", "--bundle", str(bundle))
    assert r.returncode == 0, r.stderr
    e = Env(root, bundle, tmp_path)
    yield e
    for cid in e.ids:
        oci(root, "delete", "--force", cid)
    assert not os.listdir(root) if root.exists() else True, "state left behind"
    assert not glob.glob("/sys/fs/cgroup/*/sandbox-oci/*"), "cgroups left behind"


class Env:
    def __init__(self, root, bundle, tmp):
        self.root, self.bundle, self.tmp = root, bundle, tmp
        self.ids: list[str] = []

    def config(self, **process):
        path = self.bundle / "config.json"
        cfg = json.loads(path.read_text())
        cfg["process"]["terminal"] = False
        cfg["process"].update(process)
        return cfg

    def write(self, cfg):
        (self.bundle / "config.json").write_text(json.dumps(cfg))

    def create(self, cid, *extra):
        self.ids.append(cid)
        # The container inherits create's stdio (as with runc): files, not pipes.
        with open(self.tmp / f"{cid}.out", "w") as out, open(self.tmp / f"{cid}.err", "w+") as err:
            r = subprocess.run([sys.executable, "-m", "sandbox.oci.cli", "--root", str(self.root),
                                "create", "--bundle", str(self.bundle), *extra, cid],
                               stdout=out, stderr=err, stdin=subprocess.DEVNULL, text=True,
                               timeout=30)
            err.seek(0)
            r.stderr = err.read()
        return r

    def state(self, cid):
        r = oci(self.root, "state", cid)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def output(self, cid):
        return (self.tmp / f"{cid}.out").read_text()


def wait_exit(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        assert select.select([fd], [], [], 20)[0], "container did not exit"
    finally:
        os.close(fd)


def test_lifecycle_create_start_kill_delete(env):
    env.write(env.config(args=["sleep", "1000"]))
    pidfile = env.tmp / "pid"
    r = env.create("c1", "--pid-file", str(pidfile))
    assert r.returncode == 0, r.stderr
    st = env.state("c1")
    assert st["status"] == "created" and st["id"] == "c1" and st["ociVersion"]
    assert st["bundle"] == str(env.bundle) and st["pid"] == int(pidfile.read_text())
    # the init waits: it is not the process yet
    assert open(f"/proc/{st['pid']}/cmdline").read().startswith("sbx-init\0")
    assert oci(env.root, "start", "c1").returncode == 0
    st = env.state("c1")
    assert st["status"] == "running"
    assert open(f"/proc/{st['pid']}/cmdline").read().startswith("sleep")
    r = oci(env.root, "start", "c1")
    assert r.returncode == 1 and r.stderr.startswith("Error: ")
    r = oci(env.root, "delete", "c1")
    assert r.returncode == 1 and "not stopped: running" in r.stderr
    assert oci(env.root, "kill", "c1", "KILL").returncode == 0
    wait_exit(st["pid"])
    assert env.state("c1")["status"] == "stopped"
    r = oci(env.root, "kill", "c1", "9")
    assert r.returncode == 1 and "not running" in r.stderr
    assert oci(env.root, "delete", "c1").returncode == 0
    assert not (env.root / "c1").exists()
    r = oci(env.root, "state", "c1")
    assert r.returncode == 1 and r.stderr.strip() == "Error: container does not exist"


def test_run_exit_code_env_cwd_hostname(env):
    cfg = env.config(args=["sh", "-c", "echo $FOO $(pwd) $(hostname); exit 3"], cwd="/tmp",
                     env=["PATH=/bin", "FOO=bar"])
    cfg["hostname"] = "box1"
    env.write(cfg)
    out = open(env.tmp / "run.out", "w")
    r = oci(env.root, "run", "--bundle", str(env.bundle), "r1", stdout=out)
    out.close()
    assert r.returncode == 3, r.stderr
    assert (env.tmp / "run.out").read_text() == "bar /tmp box1\n"
    assert not (env.root / "r1").exists()


def test_exec_into_running_container(env):
    env.write(env.config(args=["sleep", "1000"]))
    assert env.create("e1").returncode == 0
    assert oci(env.root, "start", "e1").returncode == 0
    r = oci(env.root, "exec", "e1", "sh", "-c", "echo $$ in; id -u; exit 5")
    assert r.returncode == 5 and r.stdout.split()[1:] == ["in", "0"], r.stderr
    r = oci(env.root, "exec", "--user", "1000:1000", "e1", "id")
    assert r.returncode == 0 and "uid=1000" in r.stdout
    r = oci(env.root, "exec", "e1", "/nonexistent")
    assert r.returncode == 1 and r.stderr.startswith("Error: ") and "No such file" in r.stderr
    r = oci(env.root, "ps", "--format", "json", "e1")
    assert json.loads(r.stdout) == [env.state("e1")["pid"]]
    assert oci(env.root, "delete", "--force", "e1").returncode == 0
    assert not (env.root / "e1").exists()


def test_console_socket_gets_pty_master(env):
    env.write(env.config(args=["sh", "-c", "tty; echo hi"], terminal=True))
    path = str(env.tmp / "console.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    try:
        r = env.create("t1", "--console-socket", path)
        assert r.returncode == 0, r.stderr
        conn, _ = srv.accept()
        fds = array.array("i")
        _, anc, _, _ = conn.recvmsg(16, socket.CMSG_SPACE(4))
        for level, typ, data in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds.frombytes(data[:4])
        conn.close()
        assert len(fds) == 1
        master = fds[0]
        try:
            assert os.isatty(master)
            pid = env.state("t1")["pid"]
            assert oci(env.root, "start", "t1").returncode == 0
            wait_exit(pid)
            got = b""
            while select.select([master], [], [], 5)[0]:
                try:
                    chunk = os.read(master, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                got += chunk
            assert b"/dev/pts/0" in got and b"hi" in got
        finally:
            os.close(master)
    finally:
        srv.close()
    assert oci(env.root, "delete", "t1").returncode == 0


def test_errors_as_runc(env):
    r = oci(env.root, "state", "nope")
    assert (r.returncode, r.stderr) == (1, "Error: container does not exist\n")
    env.write(env.config(args=["true"]))
    assert env.create("d1").returncode == 0
    r = env.create("d1")
    assert r.returncode == 1 and r.stderr == "Error: container with id exists: d1\n"
    empty = env.tmp / "empty"
    empty.mkdir()
    r = oci(env.root, "create", "--bundle", str(empty), "d2")
    assert r.returncode == 1 and "config.json not found" in r.stderr
    assert not (env.root / "d2").exists()
    r = oci(env.root, "--systemd-cgroup", "list")
    assert r.returncode == 1 and "systemd" in r.stderr
    r = oci(env.root, "checkpoint", "d1")
    assert r.returncode == 1 and "not supported" in r.stderr
    env.write(env.config(args=["/no/such/binary"]))
    r = env.create("d3")
    assert r.returncode == 1 and "No such file" in r.stderr
    assert not (env.root / "d3").exists()
    r = oci(env.root, "kill", "d1", "NOTASIGNAL")
    assert r.returncode == 1 and "unknown signal" in r.stderr
    # delete of a created container needs no --force (runc), and cleans up
    assert oci(env.root, "delete", "d1").returncode == 0
    assert oci(env.root, "delete", "--force", "never-was").returncode == 0


def test_seccomp_profile_with_argument_condition(env):
    cfg = env.config(args=["sh", "-c", "mkdir /tmp/a; echo mk=$?; kill -0 $$; echo k0=$?"])
    cfg["linux"]["seccomp"] = {
        "defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
            {"names": ["kill"], "action": "SCMP_ACT_ERRNO",
             "args": [{"index": 1, "value": 0, "op": "SCMP_CMP_EQ"}]},
        ]}
    cfg["root"]["readonly"] = False
    env.write(cfg)
    out = open(env.tmp / "sc.out", "w")
    r = oci(env.root, "run", "--bundle", str(env.bundle), "s1", stdout=out, timeout=30)
    out.close()
    assert r.returncode == 0, r.stderr
    assert (env.tmp / "sc.out").read_text() == "mk=1\nk0=1\n"
    assert not (env.bundle / "rootfs" / "tmp" / "a").exists()


def test_identity_caps_rlimits_and_mounts(env):
    host = env.tmp / "vol"
    host.mkdir()
    (host / "f").write_text("data\n")
    cfg = env.config(
        args=["sh", "-c", "id; grep -E 'CapEff|CapAmb' /proc/self/status; ulimit -n; umask; "
              "cat /vol/f; touch /vol/g; echo t=$?; cat /proc/kcore | wc -c"],
        user={"uid": 1000, "gid": 1000, "additionalGids": [5], "umask": 0o27},
        capabilities={k: ["CAP_NET_BIND_SERVICE"] for k in
                      ("bounding", "effective", "permitted", "inheritable", "ambient")},
        rlimits=[{"type": "RLIMIT_NOFILE", "soft": 99, "hard": 100}])
    cfg["mounts"].append({"destination": "/vol", "type": "bind", "source": str(host),
                          "options": ["rbind", "ro"]})
    env.write(cfg)
    out = open(env.tmp / "id.out", "w")
    r = oci(env.root, "run", "--bundle", str(env.bundle), "i1", stdout=out, timeout=30)
    out.close()
    assert r.returncode == 0, r.stderr
    lines = (env.tmp / "id.out").read_text().splitlines()
    assert lines[0].startswith("uid=1000 gid=1000") and "groups=5" in lines[0]
    assert lines[1].split() == ["CapEff:", "0000000000000400"]
    assert lines[2].split() == ["CapAmb:", "0000000000000400"]
    assert lines[3:6] == ["99", "0027", "data"]
    assert lines[6] == "t=1" and not (host / "g").exists()
    assert lines[7].strip() == "0"
    assert not (env.bundle / "rootfs" / "vol" / "f").exists()


@pytest.mark.parametrize("cmd", [["state", "x"], ["list"], ["kill", "x", "KILL"]])
def test_lean_import_path(cmd, tmp_path):
    """Every containerd call is a new process: state/kill/list load neither the
    executor nor the proxy, network or image stacks."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "sandbox.oci.cli", "--root",
                        str(tmp_path), *cmd], capture_output=True, text=True, timeout=30)
    mods = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if "|" in line}
    heavy = {m for m in mods if m.split(".")[0] in ("netns", "pyroute2", "cryptography", "httpx",
                                                    "structlog", "h11", "dns", "click")
             or m.startswith(("sandbox.proxy", "sandbox.runtime", "sandbox.images",
                              "sandbox._native"))}
    assert "sandbox.oci.state" in mods and not heavy, sorted(heavy)
