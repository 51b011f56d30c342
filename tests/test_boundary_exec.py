"""Issue 8, findings 1 and 7, written as the attack: root inside a sandbox
against the window in which an exec'd process is being set up, and against
the runtime's event loop.

- The window race: an attacker inside spins on the next PIDs of its namespace
  and, the moment one appears, opens its /proc/PID/mem, environ and fd/. An
  open mem fd keeps the address space it was opened on, so one success during
  the window gives the runtime's memory for good: it reads a secret the
  runtime holds and writes a canary. Zero successes allowed.
- SIGSTOP: an attacker stops every new process it sees (so also processes
  stopped between fork and execve) while the test execs and an event-loop
  heartbeat measures the longest gap between ticks.
- The exec'd process has a session of its own: no controlling terminal of the
  runtime's is reachable through /dev/tty.
"""
from __future__ import annotations

import asyncio
import ctypes
import errno
import json
import os
import secrets
import signal
import sys
import time

import pytest

import sandbox
from helpers import run, running

# -- the window race ---------------------------------------------------------------------

# argv: SECRET_ADDR CANARY_ADDR MARKER. Spins on the next PIDs after its own;
# stdin EOF ends the run; prints one JSON object.
RACE = r"""
import errno, json, os, sys
secret_addr, canary_addr, marker = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].encode()
me = os.getpid()
os.set_blocking(0, False)
found = []           # anything that is not a plain exec'd process: the runtime's
reads = []           # bytes read at the secret's address through any mem fd
wrote = 0            # successful writes at the canary's address
opened = 0
nxt, spins = me + 1, 0

def probe(pid):
    global opened, wrote
    base = f"/proc/{pid}"
    mem = -1
    for flags in (os.O_RDWR, os.O_RDONLY):
        try:
            mem = os.open(base + "/mem", flags)
            break
        except FileNotFoundError:
            return False
        except OSError:
            pass
    try:
        fd = os.open(base + "/environ", os.O_RDONLY)
        try:
            env = os.read(fd, 1 << 16)
        finally:
            os.close(fd)
        if env and marker not in env:
            found.append(["environ", pid, env[:120].decode(errors="replace")])
    except OSError:
        pass
    try:
        names = os.listdir(base + "/fd")
    except OSError:
        names = []
    for name in names:
        # The names alone say nothing; what an fd refers to, or an fd of its
        # own on the same file, is what the runtime must never give away.
        if int(name) <= 2:
            continue
        target = None
        try:
            target = os.readlink(f"{base}/fd/{name}")
            found.append(["fd link", pid, name, target])
        except OSError:
            pass
        try:
            os.close(os.open(f"{base}/fd/{name}", os.O_RDONLY | os.O_NONBLOCK))
            found.append(["fd open", pid, name, target])
        except OSError:
            pass
        try:
            with open(f"{base}/fdinfo/{name}") as f:
                found.append(["fd info", pid, name, target, f.read(200)])
        except OSError:
            pass
    if mem >= 0:
        opened += 1
        try:
            reads.append(os.pread(mem, 32, secret_addr).hex())
        except OSError:
            pass
        try:
            if os.pwrite(mem, b"PWNED!", canary_addr) > 0:
                wrote += 1
        except OSError:
            pass
        os.close(mem)
    return True

print("ready", flush=True)
while True:
    for pid in range(nxt, nxt + 4):
        if probe(pid):
            nxt = pid + 1
    spins += 1
    if spins % 512 == 0:
        try:
            if os.read(0, 1) == b"":
                break
        except BlockingIOError:
            pass
        live = [int(p) for p in os.listdir("/proc") if p.isdigit()]
        nxt = max([nxt] + [p + 1 for p in live if p > me])
print(json.dumps({"found": found, "reads": reads, "wrote": wrote, "opened": opened,
                  "last": nxt - 1}), flush=True)
"""


async def read_line(stream) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = await stream.read(1)
        if not chunk:
            break
        buf += chunk
    return buf


@pytest.mark.timeout(120)
@run
async def test_exec_window_never_exposes_runtime_memory_or_fds():
    secret = secrets.token_hex(16).encode()            # held only by this process
    secret_addr = id(secret) + bytes.__basicsize__ - 1  # PyBytesObject.ob_sval
    canary = ctypes.create_string_buffer(b"canary-canary-canary", 32)
    marker = "x" + secrets.token_hex(8)
    async with running() as (rt, box):
        att = await box.exec(["python3", "-c", RACE, str(secret_addr),
                              str(ctypes.addressof(canary)), marker], stdin="pipe")
        assert await read_line(att.stdout) == b"ready\n"
        deadline = time.monotonic() + 12
        n = 0
        while n < 400 and time.monotonic() < deadline:
            p = await box.exec(["true"], env={"MARK": marker}, stdout="ignore", stderr="ignore")
            assert await p.exit_code == 0
            n += 1
        att.stdin.close()
        rest = await att.stdout.read()
        assert await att.exit_code == 0, await att.stderr.read()
        res = json.loads(rest)
    assert n >= 100
    assert res["last"] > 0 and res["opened"] > 0, res   # it did see the execs
    assert secret.hex() not in res["reads"], "the runtime's memory was read from inside"
    assert canary.value == b"canary-canary-canary", "the runtime's memory was written from inside"
    assert res["wrote"] == 0
    # The exec'd program's own fds (its dynamic loader's) are no finding.
    leaked = [f for f in res["found"] if not (f[0].startswith("fd") and own_file(f[3]))]
    assert leaked == [], leaked[:5]


def own_file(target) -> bool:
    return isinstance(target, str) and (target.startswith(("/usr/", "/lib")) or
                                        target == "/etc/ld.so.cache")


def test_runtime_is_not_dumpable():
    libc = ctypes.CDLL(None, use_errno=True)
    PR_GET_DUMPABLE = 3

    async def main():
        async with sandbox.Runtime():
            return libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)

    assert asyncio.run(main()) == 0


EXE_PROBE = r"""
import errno, json, os
r = {"link": os.readlink("/proc/1/exe")}
for name, flags in (("wronly", os.O_WRONLY), ("rdwr", os.O_RDWR),
                    ("trunc", os.O_WRONLY | os.O_TRUNC)):
    try:
        fd = os.open("/proc/1/exe", flags)
        try:
            r[name] = "wrote %d" % os.write(fd, b"\x7fELF-pwned")
        except OSError as e:
            r[name] = "opened, write " + errno.errorcode[e.errno]
        os.close(fd)
    except OSError as e:
        r[name] = errno.errorcode[e.errno]
print(json.dumps(r))
"""


@run
async def test_pid1_exe_is_a_sealed_memfd_not_a_host_file():
    init = os.path.join(os.path.dirname(sandbox.__file__), "sbx-init")
    with open(init, "rb") as f:
        before = f.read()
    async with running() as (rt, box):
        out = await (await box.exec(["python3", "-c", EXE_PROBE])).output()
        assert out.exit_code == 0, out.stderr
        r = json.loads(out.stdout)
    assert r["link"].startswith("/memfd:sbx-init"), r
    for k in ("wronly", "rdwr", "trunc"):
        assert not r[k].startswith("wrote"), r
    with open(init, "rb") as f:
        assert f.read() == before


# -- SIGSTOP ---------------------------------------------------------------------------

# argv: HOLD (seconds a stopped process stays stopped; < 0: until the end).
# Stops every new process; prints "stopped PID EXE" per stop; stdin EOF ends
# the run: everything is continued and a JSON summary printed.
STOPPER = r"""
import errno, json, os, signal, sys, time
hold = float(sys.argv[1])
me = os.getpid()
os.set_blocking(0, False)
stopped, held = {}, {}
top, spins = me, 0
print("ready", flush=True)
while True:
    # Every PID not yet stopped up to a few past the highest seen: two
    # concurrent forks may become visible out of PID order (alloc before
    # attach), so a lower PID can appear after a higher one was stopped.
    for pid in range(me + 1, top + 5):
        if pid in stopped:
            continue
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            continue
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError as e:
            exe = "!" + errno.errorcode[e.errno]
        stopped[pid] = exe
        held[pid] = time.monotonic()
        top = max(top, pid)
        print("stopped", pid, exe, flush=True)
    if hold >= 0:
        now = time.monotonic()
        for pid, t in list(held.items()):
            if now - t >= hold:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:      # it was a zombie when stopped
                    pass
                del held[pid]
    spins += 1
    if spins % 256 == 0:
        try:
            if os.read(0, 1) == b"":
                break
        except BlockingIOError:
            pass
        live = [int(p) for p in os.listdir("/proc") if p.isdigit()]
        top = max([top] + [p for p in live if p > me])
for pid in stopped:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass
print(json.dumps({"stopped": stopped}), flush=True)
"""


class Heartbeat:
    """An event-loop task that records the longest gap between its ticks."""

    def __init__(self, tick: float = 0.01):
        self.tick = tick
        self.max_gap = 0.0
        self._task = None

    async def _run(self):
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.tick)
            now = time.monotonic()
            self.max_gap = max(self.max_gap, now - last)
            last = now

    def __enter__(self):
        self._task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *exc):
        self._task.cancel()


def pre_exec(exe: str) -> bool:
    """A stop that caught the process before its execve: the runtime's old
    shared-memory child showed python's exe, a non-dumpable one refuses
    (EACCES). After execve it is `true`; a zombie has none (ENOENT)."""
    return not exe.endswith("/true") and exe != "!ENOENT"


@pytest.mark.timeout(90)
@run
async def test_sigstop_in_the_exec_window_never_stalls_the_event_loop():
    async with running() as (rt, box):
        att = await box.exec(["python3", "-c", STOPPER, "1.0"], stdin="pipe")
        assert await read_line(att.stdout) == b"ready\n"
        codes = []
        with Heartbeat() as hb:
            for _ in range(8):
                procs = await asyncio.gather(*(box.exec(["true"], stdout="ignore", stderr="ignore")
                                               for _ in range(5)))
                codes += await asyncio.gather(*(p.exit_code for p in procs))
            att.stdin.close()
            rest = await att.stdout.read()
            assert await att.exit_code == 0, await att.stderr.read()
        res = json.loads(rest.splitlines()[-1])
    assert codes == [0] * 40
    assert res["stopped"], "the attacker saw no exec"
    early = [exe for exe in res["stopped"].values() if pre_exec(exe)]
    assert early, f"no stop landed before execve: {res['stopped']}"
    assert hb.max_gap < 0.5, f"the event loop stalled {hb.max_gap:.2f} s ({len(early)} early stops)"


@pytest.mark.timeout(60)
@run
async def test_execs_stopped_forever_do_not_block_destroy():
    async with running() as (rt, box):
        att = await box.exec(["python3", "-c", STOPPER, "-1"], stdin="pipe")
        assert await read_line(att.stdout) == b"ready\n"
        with Heartbeat() as hb:
            # sleeps: each of them is seen (and stopped), before or after its execve
            tasks = [asyncio.ensure_future(box.exec(["sleep", "1000"], stdout="ignore",
                                                    stderr="ignore"))
                     for _ in range(6)]
            stops = 0
            while stops < 6:
                line = await read_line(att.stdout)
                assert line.startswith(b"stopped "), line
                stops += 1
            t0 = time.monotonic()
            await asyncio.wait_for(box.destroy(), 10)
            took = time.monotonic() - t0
            done, pending = await asyncio.wait(tasks, timeout=10)
        assert not pending
        for t in done:
            if t.exception() is not None:
                assert isinstance(t.exception(), sandbox.SandboxNotRunning), t.exception()
            else:
                assert await asyncio.wait_for(t.result().exit_code, 5) == 128 + signal.SIGKILL
        await asyncio.wait_for(att.exit_code, 5)
    assert took < 5
    assert hb.max_gap < 0.5, f"the event loop stalled {hb.max_gap:.2f} s"


# -- sessions and terminals ---------------------------------------------------------------

# The runtime under test, in its own process whose controlling terminal is a pty.
# argv: STATE_DIR RESULT_FILE
TTY_RUNTIME = r"""
import asyncio, errno, fcntl, json, os, sys, termios
import sandbox
fcntl.ioctl(0, termios.TIOCSCTTY, 0)
PROBE = '''
import errno, json, os
r = {"pid": os.getpid(), "sid": os.getsid(0), "pgid": os.getpgid(0)}
try:
    os.close(os.open("/dev/tty", os.O_RDWR))
    r["tty"] = "opened"
except OSError as e:
    r["tty"] = errno.errorcode[e.errno]
print(json.dumps(r))
'''
async def main():
    fd = os.open("/dev/tty", os.O_RDWR)       # the runtime does have a terminal
    os.close(fd)
    async with sandbox.Runtime(sys.argv[1]) as rt:
        box = rt.sandbox()
        await box.start()
        out = await (await box.exec(["python3", "-c", PROBE])).output()
    with open(sys.argv[2], "w") as f:
        f.write(out.stdout.decode() or json.dumps({"stderr": out.stderr.decode()}))
asyncio.run(main())
"""


@pytest.mark.timeout(60)
@run
async def test_exec_has_its_own_session_and_no_terminal(tmp_path):
    master, slave = os.openpty()
    loop = asyncio.get_running_loop()
    seen = bytearray()

    def drain():
        try:
            seen.extend(os.read(master, 4096))
        except OSError:
            loop.remove_reader(master)

    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", TTY_RUNTIME, str(tmp_path / "state"), str(tmp_path / "out"),
            stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        os.close(slave)
        slave = -1
        loop.add_reader(master, drain)
        assert await asyncio.wait_for(proc.wait(), 45) == 0, seen.decode(errors="replace")
    finally:
        loop.remove_reader(master)
        os.close(master)
        if slave >= 0:
            os.close(slave)
    r = json.loads((tmp_path / "out").read_text())
    assert r.get("sid") == r.get("pid") == r.get("pgid"), r
    assert r["tty"] == "ENXIO", r


@pytest.mark.timeout(60)
@run
async def test_cancelled_execs_leave_nothing_behind():
    """exec() cancelled at any point: what it started is killed and reaped
    (the leak guard checks the runtime's children after the runtime closed)."""
    async with running() as (rt, box):
        started = []
        for spins in range(8):
            tasks = [asyncio.ensure_future(box.exec(["sleep", "1000"])) for _ in range(4)]
            for _ in range(spins):
                await asyncio.sleep(0)
            for t in tasks:
                t.cancel()
            jobs = set(box._exec_jobs)
            for t in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(t, sandbox.ExecProcess):   # finished before the cancel
                    t.kill(signal.SIGKILL)
                    started.append(t.exit_code)
            for rep in await asyncio.gather(*jobs):
                if rep.watcher is not None:
                    started.append(rep.watcher.exited)
        assert started, "no cancelled exec got as far as starting its process"
        codes = await asyncio.wait_for(asyncio.gather(*started), 10)
        assert codes == [128 + signal.SIGKILL] * len(codes)
        out = await (await box.exec(["echo", "ok"])).output()
        assert out.stdout == b"ok\n"


@run
async def test_exec_joins_every_cgroup_of_the_sandbox_memory_included():
    """The helper joins all but the memory cgroup, the process that one
    (csrc/exechelper.c): the process ends up where PID 1 is, in every
    hierarchy."""
    async with running() as (rt, box):
        p = await box.exec(["sleep", "100"])
        try:
            with open(f"/proc/{p.host_pid}/cgroup") as f:
                mine = sorted(f.read().splitlines())
            with open(f"/proc/{box.pid}/cgroup") as f:
                init = sorted(f.read().splitlines())
        finally:
            p.kill(signal.SIGKILL)
        assert await p.exit_code == 128 + signal.SIGKILL
    assert mine == init
    assert any(":memory:" in line or line.startswith("0::") for line in mine), mine
