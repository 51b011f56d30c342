"""`sandbox run`: stdio, exit codes and one-line errors (SPEC §7, §10 CLI)."""
import os
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)
CLI = [sys.executable, "-m", "sandbox"]


def run(*args, stdin=None):
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, timeout=50,
                          **({} if stdin is not None else {"stdin": subprocess.DEVNULL}))


def test_hello_and_stdin_forwarded():
    r = run("run", "--", "echo", "hello")
    assert (r.returncode, r.stdout) == (0, b"hello\n")
    r = run("run", "--", "cat", stdin=b"piped in")
    assert r.stdout == b"piped in"


@pytest.mark.parametrize("args,code", [
    (["--", "sh", "-c", "exit 5"], 5),
    (["--", "sh", "-c", "kill -TERM $$"], 143),
    (["--", "no-such-command-xyz"], 127),
    (["--", "/etc/passwd"], 126),
    (["--memory", "64M", "--", "python3", "-c", "b = bytearray(300 << 20)"], 137),
])
def test_exit_codes(args, code):
    r = run("run", *args)
    assert r.returncode == code, r.stderr
    if code in (126, 127):
        assert r.stderr.decode().count("\n") == 1 and b"Traceback" not in r.stderr


@pytest.mark.parametrize("args", [
    ["run", "--bogus", "--", "true"],
    ["run"],
    ["run", "--memory", "12X", "--", "true"],
    ["run", "--name", "bad name", "--", "true"],
    ["run", "--allow-host", "[bad", "--", "true"],
    ["run", "--env", "NOEQUALS", "--", "true"],
    ["--log-format", "xml", "run", "--", "true"],
])
def test_usage_errors_exit_2_with_one_line(args):
    r = run(*args)
    assert r.returncode == 2
    err = r.stderr.decode()
    assert err.startswith("sandbox: error: ") and err.count("\n") == 1, err


def test_runtime_failure_is_125_one_line(tmp_path):
    bad = tmp_path / "not-a-dir"
    bad.write_text("x")
    r = run("--state-dir", str(bad), "run", "--", "true")
    assert r.returncode == 125
    assert r.stderr.decode().count("\n") == 1 and b"Traceback" not in r.stderr


def test_env_cwd_user_and_json_logs():
    r = run("--log-format", "json", "run", "--env", "A=b", "--cwd", "/tmp", "--user", "nobody",
            "--", "sh", "-c", "echo $A $(pwd) $(id -u)")
    assert r.stdout == b"b /tmp 65534\n"


def test_sigterm_is_forwarded():
    p = subprocess.Popen([*CLI, "run", "--", "sh", "-c", "trap 'echo got; exit 4' TERM; echo ready; sleep 100 & wait"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b"ready\n"
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=20) == 4
        assert p.stdout.read() == b"got\n"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
        p.stderr.close()


def test_bad_resolver_is_usage_error():
    r = run("run", "--resolver", "not an ip", "--", "true")
    assert r.returncode == 2 and r.stderr.decode().count("\n") == 1
