"""Issue 8 finding 2: nothing in a sandbox reaches the operator's terminal.

Every test runs `sandbox run` (or the operator's own shell) on a REAL pty
whose master is this test: the attack is a sandbox process pushing
`touch FILE` into the operator's shell with TIOCSTI, and the user-visible
half is a shell that has a terminal of its own (tty, job control, ^C, window
size, exit code). Output is read with deadlines; nothing sleeps.
"""
from __future__ import annotations

import base64
import fcntl
import os
import re
import select
import signal
import struct
import sys
import termios
import time

import pytest

pytestmark = pytest.mark.timeout(90)
SANDBOX = [sys.executable, "-m", "sandbox"]
ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/root", "TERM": "dumb",
       "PS1": "op$ ", "LC_ALL": "C"}
if "PYTHONPATH" in os.environ:
    ENV["PYTHONPATH"] = os.environ["PYTHONPATH"]
DEADLINE = 30.0


class Pty:
    """argv on a fresh pty that is its controlling terminal (as a login)."""

    def __init__(self, argv, *, rows=24, cols=80, stdin_null=False):
        master, slave = os.openpty()
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.close(master)
                os.setsid()
                fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
                for fd in (0, 1, 2):
                    os.dup2(slave, fd)
                if stdin_null:
                    null = os.open("/dev/null", os.O_RDONLY)
                    os.dup2(null, 0)
                os.closerange(3, 1024)
                os.execvpe(argv[0], argv, ENV)
            finally:
                os._exit(127)
        os.close(slave)
        self.pid, self.fd = pid, master
        self.pidfd = os.pidfd_open(pid)
        self.buf = b""
        self.pos = 0          # expect() searches from here on
        self.code: int | None = None

    def write(self, data: bytes) -> None:
        os.write(self.fd, data)

    def _fill(self, until: float) -> bool:
        left = until - time.monotonic()
        if left <= 0 or not select.select([self.fd], [], [], left)[0]:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:    # EIO: every slave fd is closed
            data = b""
        if not data:
            return False
        self.buf += data
        return True

    def expect(self, pattern: bytes, timeout: float = DEADLINE) -> re.Match:
        until = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            m = rx.search(self.buf, self.pos)
            if m:
                self.pos = m.end()
                return m
            if not self._fill(until):
                raise AssertionError(f"{pattern!r} not seen; terminal shows:\n{self.buf!r}")

    def wait(self, timeout: float = DEADLINE) -> int:
        """The exit code; reads the terminal meanwhile so the child never
        blocks on a full pty."""
        until = time.monotonic() + timeout
        watch = [self.pidfd, self.fd]
        while True:
            left = until - time.monotonic()
            if left <= 0:
                raise AssertionError(f"pid {self.pid} still running; terminal shows:\n{self.buf!r}")
            ready = select.select(watch, [], [], left)[0]
            if self.pidfd in ready:
                break
            if self.fd in ready and not self._fill(until):
                watch = [self.pidfd]     # EIO: the terminal has no reader left
        while select.select([self.fd], [], [], 0)[0] and self._fill(until):
            pass
        _, st = os.waitpid(self.pid, 0)
        self.code = os.waitstatus_to_exitcode(st)
        return self.code

    def close(self) -> None:
        """After a failed test: a hang-up first (`sandbox run` passes it on
        and cleans up), SIGKILL only if that does not end it."""
        if self.code is None:
            os.kill(self.pid, signal.SIGHUP)
            try:
                self.wait(timeout=20)
            except AssertionError:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                self.code = -9
        os.close(self.pidfd)
        os.close(self.fd)


@pytest.fixture
def terminals():
    made: list[Pty] = []

    def make(*a, **kw) -> Pty:
        t = Pty(*a, **kw)
        made.append(t)
        return t
    yield make
    for t in made:
        t.close()


ATTACK = r"""
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
TIOCSTI, TIOCLINUX = 0x5412, 0x541C
PAYLOAD = b"touch %(target)s\n"

def ioctl(fd, cmd, byte):
    b = ctypes.c_char(byte)
    r = libc.syscall(16, ctypes.c_long(fd), ctypes.c_ulong(cmd), ctypes.byref(b))
    return "OK" if r >= 0 else errno.errorcode[ctypes.get_errno()]

def inject(fd, cmd):
    for ch in PAYLOAD:
        r = ioctl(fd, cmd, ch)
        if r != "OK":
            return r
    return "INJECTED"

res = {}
for fd in (0, 1, 2):
    res["sti%%d" %% fd] = inject(fd, TIOCSTI)
    # the kernel truncates cmd to 32 bits: upper bits must not get past
    res["sti%%d_hi" %% fd] = inject(fd, (1 << 32) | TIOCSTI)
    res["sti%%d_hi2" %% fd] = inject(fd, (0xdeadbeef << 32) | TIOCSTI)
    res["linux%%d" %% fd] = ioctl(fd, TIOCLINUX, 3)   # TIOCL_PASTESEL
    # a line discipline swap would autoload n_gsm/n_hdlc on the host
    n_gsm = ctypes.c_int(21)
    r = libc.syscall(16, ctypes.c_long(fd), ctypes.c_ulong(0x5423), ctypes.byref(n_gsm))
    res["setd%%d" %% fd] = "OK" if r >= 0 else errno.errorcode[ctypes.get_errno()]
try:
    t = os.open("/dev/tty", os.O_RDWR)
    res["devtty"] = inject(t, TIOCSTI)
    res["devtty_hi"] = inject(t, (1 << 32) | TIOCSTI)
except OSError as e:
    res["devtty"] = errno.errorcode[e.errno]
print("RESULT " + " ".join("%%s=%%s" %% kv for kv in sorted(res.items())), flush=True)
"""


def _py_cmd(code: str) -> str:
    b64 = base64.b64encode(code.encode()).decode()
    return f"python3 -c \"import base64;exec(base64.b64decode('{b64}'))\""


@pytest.mark.parametrize("mode", ["tty", "stdin-not-a-tty"])
def test_tiocsti_never_reaches_the_operator_shell(terminals, tmp_path, mode):
    """The operator's shell runs `sandbox run -- ATTACK`; the attack pushes
    `touch FILE` with TIOCSTI through every fd it has and /dev/tty. If one
    byte got into the operator's terminal, the shell would run the line after
    the sandbox exits."""
    target = tmp_path / "pwned"
    shell = terminals(["sh"])
    shell.expect(rb"op\$ ")
    modes = termios.tcgetattr(shell.fd)   # on a pty master: the terminal's settings
    redirect = " </dev/null" if mode != "tty" else ""
    run = f"{' '.join(SANDBOX)} run -- {_py_cmd(ATTACK % {'target': target})}{redirect}"
    shell.write(f"{run}; echo EXIT=$?\n".encode())
    res = dict(kv.split("=") for kv in shell.expect(rb"RESULT ([^\r\n]*)").group(1).decode().split())
    assert shell.expect(rb"EXIT=(\d+)").group(1) == b"0"
    assert termios.tcgetattr(shell.fd) == modes, "the operator's terminal was left raw"
    # Whatever was injected sits in the shell's input before this line.
    shell.write(b"echo SYNC-$((6*7))\n")
    shell.expect(b"SYNC-42")
    shell.write(b"exit\n")
    assert shell.wait() == 0
    assert not target.exists(), "a sandbox process typed into the operator's shell"
    assert "INJECTED" not in res.values(), res
    for k, v in res.items():
        assert v in ("EPERM", "ENXIO"), (k, v, res)
    if mode == "tty":
        # /dev/tty is the sandbox's own pty (its controlling terminal), and
        # the filter refuses TIOCSTI there too.
        assert res["devtty"] == res["devtty_hi"] == "EPERM", res
    else:
        # no controlling terminal at all inside
        assert res["devtty"] == "ENXIO", res


def test_terminal_restored_when_a_signal_ends_the_run(terminals):
    """The operator's terminal leaves raw mode on every way out: here a
    hang-up sent to `sandbox run` (passed on, the entrypoint dies of it)."""
    import psutil
    shell = terminals(["sh"])
    shell.expect(rb"op\$ ")
    modes = termios.tcgetattr(shell.fd)
    shell.write(f"{' '.join(SANDBOX)} run -- sh -c 'echo R-$((1+1)); exec sleep 100'; "
                f"echo EXIT=$?\n".encode())
    shell.expect(rb"R-2\r\n")
    assert termios.tcgetattr(shell.fd) != modes          # raw while it runs
    runtime = psutil.Process(shell.pid).children()[0]
    runtime.send_signal(signal.SIGHUP)
    assert shell.expect(rb"EXIT=(\d+)").group(1) == b"129"
    assert termios.tcgetattr(shell.fd) == modes
    shell.write(b"exit\n")
    assert shell.wait() == 0


SESSIONS = r"""
import errno, os
def stat(pid):
    s = open("/proc/%d/stat" % pid).read()
    f = s[s.rindex(")") + 2:].split()
    return int(f[3]), int(f[4])      # session, tty_nr
try:
    os.open("/dev/tty", os.O_RDWR)
    tty = "OPEN"
except OSError as e:
    tty = errno.errorcode[e.errno]
me = os.getpid()
print("SESS", *stat(1), me, *stat(me), os.getsid(0), tty, flush=True)
"""


def test_no_session_or_terminal_of_the_runtime_inside(terminals):
    """`sandbox run` has a controlling terminal but stdin is not a terminal
    (non-tty mode): PID 1 and the entrypoint still lead sessions of their own
    without any controlling terminal."""
    t = terminals([*SANDBOX, "run", "--", "python3", "-c", SESSIONS], stdin_null=True)
    m = t.expect(rb"SESS ([^\r\n]*)").group(1).split()
    assert t.wait() == 0
    pid1_sid, pid1_tty, me, my_sid, my_tty, getsid, devtty = m
    assert (pid1_sid, pid1_tty) == (b"1", b"0"), m
    assert my_sid == getsid == me and my_tty == b"0", m
    assert devtty == b"ENXIO", m


def test_shell_on_a_terminal(terminals):
    """`sandbox run -- sh` on a terminal behaves as a login shell: its own
    pty, job control, ^C for the foreground job only, window size, exit code."""
    t = terminals([*SANDBOX, "run", "--", "sh"], rows=30, cols=90)
    t.expect(rb"# ")           # the shell's first prompt: no typeahead race with raw mode
    t.write(b"tty\n")
    t.expect(rb"\n/dev/pts/0\r\n")
    # PID 1 leads a session of its own and has no terminal.
    t.write(b"echo INIT $(cut -d' ' -f6,7 /proc/1/stat)\n")
    t.expect(rb"INIT 1 0\r\n")
    t.write(b"stty size\n")
    t.expect(rb"30 90\r\n")

    # Job control: a background job, then ^C while a foreground job runs.
    t.write(b"sleep 100 &\n")
    t.write(b"jobs\n")
    t.expect(rb"\[1\] [+-]? *Running\s+sleep 100")
    t.write(b"sh -c 'echo FG-$((2+3)); exec sleep 100'\n")
    t.expect(rb"FG-5\r\n")
    t.write(b"\x03")
    t.write(b"echo ALIVE-$((40+2))\n")
    t.expect(rb"ALIVE-42\r\n")
    t.write(b"jobs\n")
    t.expect(rb"\[1\] [+-]? *Running\s+sleep 100")

    # Window size: resize the operator's terminal (the kernel signals the
    # runtime, its foreground process) and say so once more explicitly.
    t.write(b"python3 -c \"import signal,os;signal.pthread_sigmask(signal.SIG_BLOCK,[signal.SIGWINCH]);"
            b"print('WAIT'+'ING',flush=True);signal.sigwait([signal.SIGWINCH]);"
            b"print('SIZE',*os.get_terminal_size()[::-1])\"\n")
    t.expect(rb"WAITING\r\n")
    fcntl.ioctl(t.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 37, 101, 0, 0))
    os.kill(t.pid, signal.SIGWINCH)
    t.expect(rb"SIZE 37 101\r\n")
    t.write(b"stty size\n")
    t.expect(rb"37 101\r\n")

    t.write(b"kill %1; exit 3\n")
    assert t.wait() == 3, t.buf
    assert b"Cannot set tty process group" not in t.buf, t.buf
    assert b"not a tty" not in t.buf, t.buf


def test_api_console(tmp_path):
    """Sandbox.start(console=True): the entrypoint's terminal is a pty of the
    sandbox; its master belongs to the Sandbox and is closed with it."""
    import asyncio

    import sandbox

    async def main():
        async with sandbox.Runtime() as rt:
            box = rt.sandbox()
            with pytest.raises(ValueError):
                await box.start(entrypoint=["true"], console=True, stdio=(0, 1, 2))
            with pytest.raises(TypeError):
                await box.start(entrypoint=["true"], console=1)
            await box.start(entrypoint=["sh", "-c", "tty; stat -c owner-%u $(tty); read x; echo got-$x"],
                            console=True, user="nobody")
            master = box.console_fd
            assert master is not None and os.isatty(master)
            os.write(master, b"ok\n")
            mine = os.dup(master)
            try:
                await box.monitor()
                out = b""
                while True:     # the entrypoint exited: EIO after its last bytes
                    try:
                        data = os.read(mine, 4096)
                    except OSError:
                        break
                    if not data:
                        break
                    out += data
            finally:
                os.close(mine)
            # a non-root entrypoint owns its terminal, as after a login
            assert b"/dev/pts/0\r\nowner-65534\r\n" in out and b"got-ok\r\n" in out, out
            await box.destroy()
            assert box.console_fd is None
    asyncio.run(main())


def test_operator_terminal_is_not_handed_in_without_a_pty(terminals):
    """stdin is not a terminal but stdout/stderr are: the sandbox gets pipes
    (copied out by the runtime), never the operator's terminal, so it can
    neither read the operator's keystrokes nor change the terminal."""
    probe = ("import os, termios\n"
             "print('FD1', os.readlink('/proc/self/fd/1'), 'FD2', os.readlink('/proc/self/fd/2'),"
             " flush=True)\n"
             "for fd in (1, 2):\n"
             "    try:\n"
             "        a = termios.tcgetattr(fd); a[3] &= ~termios.ECHO\n"
             "        termios.tcsetattr(fd, termios.TCSANOW, a); print('ECHO-OFF', fd, flush=True)\n"
             "    except termios.error as e:\n"
             "        print('NOTTY', fd, flush=True)\n")
    t = terminals([*SANDBOX, "run", "--", "python3", "-c", probe], stdin_null=True)
    m = t.expect(rb"FD1 (\S+) FD2 (\S+)")
    assert m.group(1).startswith(b"pipe:") and m.group(2).startswith(b"pipe:"), m.group(0)
    assert t.wait() == 0
    assert b"ECHO-OFF" not in t.buf and t.buf.count(b"NOTTY") == 2
    assert termios.tcgetattr(t.fd)[3] & termios.ECHO
