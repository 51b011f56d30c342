"""The security floor of SPEC §9, observed from inside."""
import pytest

from helpers import run, running

PROBE = r"""
import ctypes, errno, os, sys
libc = ctypes.CDLL(None, use_errno=True)
def sc(nr, *args):
    r = libc.syscall(nr, *[ctypes.c_long(a) for a in args])
    return 0 if r >= 0 else ctypes.get_errno()
calls = {
  "unshare": lambda: sc(272, 0x00020000),          # CLONE_NEWNS
  "mount": lambda: sc(165, 0, 0, 0, 0, 0),
  "ptrace": lambda: sc(101, 16, 1, 0, 0),          # PTRACE_ATTACH pid 1
  "init_module": lambda: sc(175, 0, 0, 0),
  "bpf": lambda: sc(321, 0, 0, 0),
  "keyctl": lambda: sc(250, 0, 0, 0),
  "setns": lambda: sc(308, 0, 0),
  "pivot_root": lambda: sc(155, 0, 0),
  "umount2": lambda: sc(166, 0, 0),
  "kexec_load": lambda: sc(246, 0, 0, 0, 0),
  "perf_event_open": lambda: sc(298, 0, 0, 0, 0, 0),
  "userfaultfd": lambda: sc(323, 0),
  "add_key": lambda: sc(248, 0, 0, 0, 0, 0),
  "open_by_handle_at": lambda: sc(304, 0, 0, 0),
  "swapon": lambda: sc(167, 0, 0),
  "reboot": lambda: sc(169, 0, 0, 0, 0),
  "settimeofday": lambda: sc(164, 0, 0),
  "clock_settime": lambda: sc(227, 0, 0),
  "acct": lambda: sc(163, 0),
  "quotactl": lambda: sc(179, 0, 0, 0, 0),
  "clone_newns": lambda: sc(56, 0x00020000 | 17, 0, 0, 0, 0),
  "clone_newuser": lambda: sc(56, 0x10000000 | 17, 0, 0, 0, 0),
  "clone3": lambda: sc(435, 0, 0),
  "x32_getpid": lambda: sc(0x40000000 + 39),
}
for name, f in calls.items():
    print(name, errno.errorcode.get(f(), "OK"))
"""


@run
async def test_status_nnp_seccomp_caps():
    async with running() as (rt, box):
        out = (await (await box.exec(["cat", "/proc/self/status"])).output()).stdout.decode()
        f = dict(line.split(":\t", 1) for line in out.splitlines() if ":\t" in line)
        assert f["NoNewPrivs"].strip() == "1"
        assert f["Seccomp"].strip() == "2"
        eff = int(f["CapEff"], 16)
        assert eff == int(f["CapBnd"], 16) == 0x405fb   # SPEC §10's ten capabilities
        assert not eff & (1 << 21)   # CAP_SYS_ADMIN
        assert not eff & (1 << 13)   # CAP_NET_RAW
        out = (await (await box.exec(["cat", "/proc/self/status"], user="nobody")).output()).stdout.decode()
        assert "CapEff:\t0000000000000000" in out


@run
async def test_dangerous_syscalls_fail_with_eperm():
    async with running() as (rt, box):
        out = await (await box.exec(["python3", "-c", PROBE])).output()
        assert out.exit_code == 0, out.stderr
        res = dict(line.split() for line in out.stdout.decode().splitlines())
        for name in ["unshare", "mount", "ptrace", "init_module", "bpf", "keyctl", "setns",
                     "pivot_root", "umount2", "kexec_load", "perf_event_open", "userfaultfd",
                     "add_key", "open_by_handle_at", "swapon", "reboot", "settimeofday",
                     "clock_settime", "acct", "quotactl", "clone_newns", "clone_newuser",
                     "x32_getpid"]:
            assert res[name] == "EPERM", (name, res[name])
        assert res["clone3"] == "ENOSYS"


@run
async def test_tools_that_fork_and_thread_still_work():
    async with running() as (rt, box):
        script = "import threading, subprocess; t=threading.Thread(target=print, args=('t',)); t.start(); t.join(); print(subprocess.run(['echo','s'],capture_output=True).stdout.decode().strip())"
        out = await (await box.exec(["python3", "-c", script])).output()
        assert out.stdout == b"t\ns\n", out


@run
async def test_kernel_views_readonly_and_masked():
    async with running() as (rt, box):
        checks = ("echo 1 > /proc/sys/kernel/hostname; echo rc=$?; "
                  "echo 1 > /proc/sysrq-trigger; echo rc=$?; "
                  "touch /sys/x; echo rc=$?; "
                  "cat /proc/keys | wc -c; cat /proc/timer_list | wc -c; "
                  "ls /dev | sort | tr '\\n' ' '; mount -t tmpfs x /mnt; echo rc=$?")
        out = (await (await box.exec(["sh", "-c", checks])).output())
        lines = out.stdout.decode().split("\n")
        assert all(x.startswith("rc=") and x != "rc=0" for x in lines[0:3]), out
        assert lines[3:5] == ["0", "0"]
        for node in ["null", "zero", "full", "random", "urandom", "tty", "pts", "shm", "ptmx"]:
            assert node in lines[5].split()
        assert lines[6] != "rc=0"


@run
async def test_old_root_detached_and_only_own_cgroup():
    async with running() as (rt, box):
        out = (await (await box.exec(["sh", "-c", "cat /proc/self/mountinfo; echo ---; cat /proc/self/cgroup"])).output())
        mounts, cg = out.stdout.decode().split("---\n")
        targets = [l.split()[4] for l in mounts.splitlines()]
        assert "/" in targets and not any(t.startswith("/run/sandbox") for t in targets)
        assert all(line.endswith(":/") for line in cg.strip().splitlines()), cg


@run
async def test_network_is_isolated_loopback_only():
    async with running() as (rt, box):
        out = (await (await box.exec(["ls", "/sys/class/net"])).output()).stdout.split()
        assert set(out) <= {b"lo", b"eth0"}


# -- issue 8: socket families, io_uring, personality (csrc/seccomp.c) -------
SYSCALL_ARGS = r"""
import ctypes, errno, json
libc = ctypes.CDLL(None, use_errno=True)
def sc(nr, *args):
    r = libc.syscall(nr, *[ctypes.c_ulong(a) for a in args])
    return ("OK", r) if r >= 0 else (errno.errorcode[ctypes.get_errno()], r)
SOCKET, SOCKETPAIR, PERSONALITY, IO_URING_SETUP = 41, 53, 135, 425
STREAM, DGRAM, RAW = 1, 2, 3
fds = (ctypes.c_int * 2)()
params = (ctypes.c_char * 120)()
out = {
  "unix": sc(SOCKET, 1, STREAM, 0), "inet": sc(SOCKET, 2, STREAM, 0),
  "inet6": sc(SOCKET, 10, STREAM, 0), "netlink": sc(SOCKET, 16, RAW, 0),
  # the kernel reads the family as an int: upper bits are not a way around
  "unix_hi": sc(SOCKET, (1 << 32) | 1, STREAM, 0),
  "vsock": sc(SOCKET, 40, STREAM, 0), "vsock_hi": sc(SOCKET, (7 << 32) | 40, STREAM, 0),
  "packet": sc(SOCKET, 17, RAW, 0), "alg": sc(SOCKET, 38, 5, 0), "key": sc(SOCKET, 15, RAW, 2),
  "bluetooth": sc(SOCKET, 31, RAW, 0),
  "pair_unix": sc(SOCKETPAIR, 1, STREAM, 0, ctypes.addressof(fds)),
  "pair_vsock": sc(SOCKETPAIR, 40, STREAM, 0, ctypes.addressof(fds)),
  "io_uring_setup": sc(IO_URING_SETUP, 4, ctypes.addressof(params)),
  "io_uring_enter": sc(426, 0, 0, 0, 0, 0, 0), "io_uring_register": sc(427, 0, 0, 0, 0),
  "persona_query": sc(PERSONALITY, 0xffffffff),
  "persona_linux": sc(PERSONALITY, 0),
  "read_implies_exec": sc(PERSONALITY, 0x0400000),
  "addr_no_randomize": sc(PERSONALITY, 0x0040000),
  "read_implies_exec_hi": sc(PERSONALITY, (1 << 32) | 0x0400000),
}
print(json.dumps({k: v[0] for k, v in out.items()}))
"""


@run
async def test_socket_families_io_uring_and_personality():
    """Finding 10 and 14: only AF_UNIX/INET/INET6/NETLINK sockets; no
    io_uring; personality() only the harmless values."""
    import json
    async with running() as (rt, box):
        out = await (await box.exec(["python3", "-c", SYSCALL_ARGS])).output()
        assert out.exit_code == 0, out.stderr
        res = json.loads(out.stdout)
        for k in ("unix", "inet", "inet6", "netlink", "unix_hi", "pair_unix", "persona_query",
                  "persona_linux"):
            assert res[k] == "OK", (k, res)
        for k in ("vsock", "vsock_hi", "packet", "alg", "key", "bluetooth", "pair_vsock",
                  "io_uring_setup", "io_uring_enter", "io_uring_register", "read_implies_exec",
                  "addr_no_randomize", "read_implies_exec_hi"):
            assert res[k] == "EPERM", (k, res)
