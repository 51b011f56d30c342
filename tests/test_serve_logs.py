"""`sandbox logs` and GET /sandboxes/{name}/logs through a real `sandbox serve`;
and `sandbox exec` with a background descendant (SPEC §10)."""
from __future__ import annotations

import base64
import json
import subprocess

import pytest

from test_serve import SANDBOX, server, tmp_dir  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(60)


def test_logs_cli_and_api(server):
    st, obj = server.curl("POST", "/sandboxes", {
        "name": "lg", "log_limit": "1K",
        "entrypoint": ["sh", "-c", "echo hello-out; echo hello-err >&2; head -c 3000 /dev/zero | tr '\\0' a"]})
    assert st == 201, obj
    st, _ = server.curl("GET", "/sandboxes/lg/monitor")
    r = server.cli("logs", "lg")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"a" * 1024
    assert b"hello-err\n" in r.stderr
    assert b"dropped" in r.stderr          # the ring is 1 KiB: the client says what went
    st, raw = server.curl("GET", "/sandboxes/lg/logs", raw=True)
    lines = [json.loads(x) for x in raw.splitlines() if x.strip()]
    assert lines[-1] == {"dropped": {"stdout": 3000 + len("hello-out\n") - 1024, "stderr": 0}}
    err = b"".join(base64.b64decode(x["data"]) for x in lines[:-1] if x["stream"] == "stderr")
    assert err == b"hello-err\n"
    st, obj = server.curl("GET", "/sandboxes/nope/logs")
    assert st == 404


def test_logs_follow_until_stop(server):
    st, obj = server.curl("POST", "/sandboxes", {
        "name": "fl", "entrypoint": ["sh", "-c",
                                     "echo one; while [ ! -e /tmp/go ]; do sleep 0.02; done; echo two"]})
    assert st == 201, obj
    follower = subprocess.Popen([*SANDBOX, "logs", "--socket", server.sock, "-f", "fl"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert follower.stdout.readline() == b"one\n"
        st, _, _, code = server.exec("fl", {"cmd": ["touch", "/tmp/go"]})
        assert code == 0
        out, err = follower.communicate(timeout=20)
        assert out == b"two\n" and follower.returncode == 0, err
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.communicate()


def test_exec_with_background_child_returns(server):
    st, obj = server.curl("POST", "/sandboxes", {"name": "bg"})
    assert st == 201, obj
    r = server.cli("exec", "bg", "--", "sh", "-c", "sleep 300 & echo started")
    assert r.returncode == 0 and r.stdout == b"started\n", r.stderr
