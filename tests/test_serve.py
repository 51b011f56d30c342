"""`sandbox serve` (the daemon) and its thin clients, driven from outside:
every endpoint with `curl --unix-socket`, every client through the CLI.

One server per test (a subprocess); its teardown sends SIGTERM and checks the
exit code 0 and the removed socket; the autouse leak guard then checks that
the server destroyed every sandbox and kernel object it made."""
from __future__ import annotations

import base64
import json
import os
import signal
import socket
import stat
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.timeout(60)

SANDBOX = [sys.executable, "-c", "import sys; from sandbox.cli import main; main(sys.argv[1:])"]


def sandbox_cli(*args, input=None, timeout=30):
    return subprocess.run([*SANDBOX, *args], input=input, capture_output=True, timeout=timeout)


class Server:
    def __init__(self, tmp):
        self.tmp = tmp
        self.sock = str(tmp / "s.sock")
        self.state = str(tmp / "state")
        self.log_path = tmp / "server.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [*SANDBOX, "--state-dir", self.state, "serve", "--socket", self.sock],
            stdout=subprocess.PIPE, stderr=self._log)
        line = self.proc.stdout.readline()    # readiness: the server says so, no polling
        if line != f"ready {self.sock}\n".encode():
            self.proc.kill()
            self.proc.wait()
            self.proc.stdout.close()
            self._log.close()
            pytest.fail(f"server did not start: {line!r}\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def curl_args(self, method, path, *extra):
        return ["curl", "-sS", "-N", "--unix-socket", self.sock, "-X", method, *extra,
                f"http://localhost{path}"]

    def curl(self, method, path, body=None, *extra, data: bytes | None = None, raw=False):
        """-> (status, parsed JSON, or raw bytes when asked or not JSON)"""
        args = ["-w", "\n%{http_code}"]
        if body is not None:
            data = json.dumps(body).encode()
        if data is not None:
            args += ["--data-binary", "@-"]
        r = subprocess.run(self.curl_args(method, path, *args, *extra), input=data,
                           capture_output=True, timeout=30)
        assert r.returncode == 0, r.stderr
        out, _, code = r.stdout.rpartition(b"\n")
        if raw:
            return int(code), out
        try:
            return int(code), json.loads(out) if out.strip() else None
        except ValueError:
            return int(code), out

    def exec(self, name, body=None, path_extra="", *extra, data=None):
        """-> (status, stdout, stderr, exit_code | error JSON)"""
        status, out = self.curl("POST", f"/sandboxes/{name}/exec{path_extra}", body, *extra,
                                data=data, raw=True)
        if status != 200:
            return status, None, None, json.loads(out)
        return (status, *decode_ndjson(out))

    def cli(self, *args, input=None):
        cmd, rest = args[0], args[1:]
        return sandbox_cli(cmd, "--socket", self.sock, *rest, input=input)

    def stop(self):
        """SIGTERM: destroys every sandbox, removes the socket, exits 0."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=30)
        finally:
            self.proc.stdout.close()
            self._log.close()
        assert rc == 0, self.log()
        assert not os.path.lexists(self.sock)


def decode_ndjson(raw: bytes):
    lines = [json.loads(x) for x in raw.splitlines() if x.strip()]
    assert "exit_code" in lines[-1] and all("stream" in x for x in lines[:-1]), lines
    out = b"".join(base64.b64decode(x["data"]) for x in lines[:-1] if x["stream"] == "stdout")
    err = b"".join(base64.b64decode(x["data"]) for x in lines[:-1] if x["stream"] == "stderr")
    return out, err, lines[-1]["exit_code"]


@pytest.fixture
def tmp_dir():
    # Not pytest's tmp_path: its cleanup of old numbered dirs renames them
    # (mount points included) while the leak guard watches.
    d = tempfile.mkdtemp(prefix="sbx-serve-")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def server(tmp_dir):
    s = Server(tmp_dir)
    yield s
    s.stop()


def one_line(r) -> str:
    err = r.stderr.decode()
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# -- the API, endpoint by endpoint ----------------------------------------------

def test_create_list_inspect_start_delete(server):
    st, box = server.curl("POST", "/sandboxes", {"name": "web", "memory": "64M", "pids": 50,
                                                 "env": {"FOO": "1", "BAR": "2"}})
    assert st == 201, box
    assert box["name"] == "web" and box["state"] == "running" and box["pid"] > 0 and box["id"]
    assert server.curl("POST", "/sandboxes", {"name": "web"})[0] == 400       # duplicate
    assert server.curl("POST", "/sandboxes", {"name": "bad name!"})[0] == 400
    assert server.curl("POST", "/sandboxes", {"memory": "lots"})[0] == 400
    st, err = server.curl("POST", "/sandboxes", {"nmae": "typo"})
    assert st == 400 and "nmae" in err["error"]
    assert server.curl("POST", "/sandboxes", data=b"{not json")[0] == 400

    st, idle = server.curl("POST", "/sandboxes", {"start": False})
    assert st == 201 and idle["state"] == "created" and idle["pid"] is None

    st, boxes = server.curl("GET", "/sandboxes")
    assert st == 200 and sorted(b["name"] for b in boxes) == sorted(["web", idle["name"]])
    web = next(b for b in boxes if b["name"] == "web")
    for key in ("id", "state", "pid", "address", "uptime_s", "cpu_ns", "memory_bytes"):
        assert key in web
    assert web["uptime_s"] >= 0 and web["cpu_ns"] > 0 and web["memory_bytes"] > 0

    st, info = server.curl("GET", "/sandboxes/web")
    assert st == 200
    assert info["limits"] == {"memory": 64 << 20, "pids": 50, "cpus": None}
    assert info["env_keys"] == ["BAR", "FOO"] and "1" not in json.dumps(info["env_keys"])
    assert info["stats"]["pids_current"] >= 1

    # start: a created box starts; a running one is a conflict
    assert server.curl("POST", "/sandboxes/web/start", {})[0] == 409
    st, started = server.curl("POST", f"/sandboxes/{idle['name']}/start", {"env": {"X": "y"}})
    assert st == 200 and started["state"] == "running"
    assert server.exec(idle["name"], {"cmd": ["sh", "-c", "echo $X"]})[1] == b"y\n"

    # delete, then it is gone and its name is free again
    st, gone = server.curl("DELETE", f"/sandboxes/{idle['name']}")
    assert st == 200 and gone["state"] == "stopped"
    assert server.curl("GET", f"/sandboxes/{idle['name']}")[0] == 404
    assert server.curl("DELETE", f"/sandboxes/{idle['name']}")[0] == 404
    st, again = server.curl("POST", "/sandboxes", {"name": idle["name"], "start": False})
    assert st == 201
    # the server keeps its sandboxes: SIGTERM (the fixture) destroys them


def test_errors_and_unknown_routes(server):
    st, err = server.curl("GET", "/nope")
    assert st == 404 and "error" in err
    assert server.curl("GET", "/sandboxes/none")[0] == 404
    assert server.curl("POST", "/sandboxes/none/exec", {"cmd": ["true"]})[0] == 404
    assert server.curl("PATCH", "/sandboxes")[0] == 405
    assert server.curl("GET", "/sandboxes/x/exec")[0] in (404, 405)
    # a broken request gets a 400 and the server lives on
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(server.sock)
        s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 400")
    # keep-alive: two requests on one connection
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(server.sock)
        with s.makefile("rb") as f:
            for _ in range(2):
                s.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
                assert f.readline().startswith(b"HTTP/1.1 200")
                length = 0
                while (h := f.readline()) != b"\r\n":
                    if h.lower().startswith(b"content-length:"):
                        length = int(h.split(b":")[1])
                assert json.loads(f.read(length))["server"]["pid"] == server.proc.pid
    st, stats = server.curl("GET", "/stats")
    assert st == 200 and stats["sandboxes"] == 0 and stats["running"] == 0


def test_signal_and_monitor(server):
    assert server.curl("POST", "/sandboxes", {"name": "s", "entrypoint": ["sleep", "100"]})[0] == 201
    assert server.curl("POST", "/sandboxes", {"name": "d", "entrypoint": ["sleep", "100"]})[0] == 201
    assert server.curl("POST", "/sandboxes", {"name": "ok", "entrypoint": ["true"]})[0] == 201
    # long-polls, started before the stops
    mon_s = subprocess.Popen(server.curl_args("GET", "/sandboxes/s/monitor"), stdout=subprocess.PIPE)
    mon_d = subprocess.Popen(server.curl_args("GET", "/sandboxes/d/monitor"), stdout=subprocess.PIPE)
    try:
        assert server.curl("POST", "/sandboxes/s/signal", {"signal": 0})[0] == 400
        assert server.curl("POST", "/sandboxes/s/signal", {"signal": True})[0] == 400
        assert server.curl("POST", "/sandboxes/s/signal", {"signal": "SIGNOPE"})[0] == 400
        assert server.curl("POST", "/sandboxes/s/signal", {})[0] == 400
        st, r = server.curl("POST", "/sandboxes/s/signal", {"signal": "TERM"})
        assert st == 200 and r["signal"] == 15
        assert json.loads(mon_s.communicate(timeout=30)[0]) == {
            "exit_code": 143, "error": "container exited with code 143"}
        st, r = server.curl("DELETE", "/sandboxes/d?error=shutting%20down")
        assert st == 200
        assert json.loads(mon_d.communicate(timeout=30)[0]) == {"exit_code": None,
                                                                "error": "shutting down"}
    finally:
        for p in (mon_s, mon_d):
            p.kill()
            p.wait()
            p.stdout.close()
    # after the stop: at once
    assert server.curl("GET", "/sandboxes/s/monitor") == (200, {
        "exit_code": 143, "error": "container exited with code 143"})
    assert server.curl("GET", "/sandboxes/ok/monitor") == (200, {"exit_code": 0, "error": None})
    assert server.curl("GET", "/sandboxes/s")[1]["state"] == "stopped"
    # a stopped sandbox can be signalled (no-op) but not exec'd
    assert server.curl("POST", "/sandboxes/s/signal", {"signal": 9})[0] == 200
    assert server.curl("POST", "/sandboxes/s/exec", {"cmd": ["true"]})[0] == 409
    # an entrypoint that cannot run: ExecError, and the name stays free
    st, err = server.curl("POST", "/sandboxes", {"name": "bad", "entrypoint": ["/no/such"]})
    assert st == 404 and err["step"] == "execve" and err["errno"] == 2
    assert server.curl("GET", "/sandboxes/bad")[0] == 404


def test_policy(server):
    from sandbox import Sandbox
    assert server.curl("POST", "/sandboxes", {"name": "p"})[0] == 201
    body = {"allowed_hosts": ["example.com", "*.example.org"], "denied_hosts": ["evil.com"],
            "http_handlers": {"my.kv": "http://127.0.0.1:9"}}
    st, r = server.curl("PUT", "/sandboxes/p/policy", body)
    supported = all(hasattr(Sandbox, m) for m in ("set_allowed_hosts", "set_denied_hosts",
                                                  "intercept_outbound_http"))
    if not supported:
        assert st == 501 and "error" in r
        return
    assert st == 200 and r["applied"] == ["allowed_hosts", "denied_hosts", "http_handlers"]
    pol = server.curl("GET", "/sandboxes/p")[1]["policy"]
    assert pol["allowed_hosts"] == ["example.com", "*.example.org"]
    assert pol["denied_hosts"] == ["evil.com"]
    assert pol["http_handlers"] == {"my.kv": "http://127.0.0.1:9"}
    st, r = server.curl("PUT", "/sandboxes/p/policy", {"allowed_hosts": None})
    assert st == 200 and r["applied"] == ["allowed_hosts"]
    assert server.curl("PUT", "/sandboxes/p/policy", {"allowed_hosts": "example.com"})[0] == 400
    # all or nothing: a bad handler target leaves the allowlist as it was
    st, e = server.curl("PUT", "/sandboxes/p/policy", {"allowed_hosts": ["other.com"],
                                                       "denied_hosts": ["exa mple..com:99999"]})
    assert st == 400 and "denied_hosts" in e["error"]
    assert server.curl("GET", "/sandboxes/p")[1]["policy"]["allowed_hosts"] is None
    assert server.curl("PUT", "/sandboxes/p/policy", {"http_handlers": {"x.y": "ftp://a"}})[0] == 400
    assert server.curl("PUT", "/sandboxes/p/policy", {"routes": {}})[0] == 400
    assert server.curl("PUT", "/sandboxes/none/policy", {})[0] == 404
    # hosts at creation
    st, _ = server.curl("POST", "/sandboxes", {"name": "q", "allowed_hosts": ["example.com"],
                                               "denied_hosts": ["evil.com"]})
    assert st == 201


def test_policy_url_handler_end_to_end(server):
    """A handler given as a URL receives the sandbox's request (SPEC §3)."""
    import http.server
    import threading
    from sandbox import Sandbox
    if not hasattr(Sandbox, "intercept_outbound_http"):
        pytest.skip("this build has no outbound interception")
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, self.headers.get("X-Sandbox-Id"),
                         self.headers.get("X-Original-Url")))
            body = b"from the orchestrator"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        st, box = server.curl("POST", "/sandboxes", {"name": "kv", "enable_internet": False})
        assert st == 201
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        st, r = server.curl("PUT", "/sandboxes/kv/policy", {"http_handlers": {"my.kv": url},
                                                            "denied_hosts": ["203.0.113.7"]})
        assert st == 200, r
        st, out, err, code = server.exec("kv", {"cmd": ["curl", "-sS", "-m", "10",
                                                        "http://my.kv/key?x=1"]})
        assert (out, code) == (b"from the orchestrator", 0), err
        assert seen == [("/key?x=1", box["id"], "http://my.kv/key?x=1")]
        st, out, err, code = server.exec("kv", {"cmd": ["curl", "-sS", "-m", "10", "-w",
                                                        " %{http_code}", "http://203.0.113.7/"]})
        assert out.endswith(b" 403") and b"denied_hosts" in out, (out, err)
    finally:
        httpd.shutdown()
        httpd.server_close()
        t.join()


def test_exec_streams_and_exit_codes(server):
    assert server.curl("POST", "/sandboxes", {"name": "x", "env": {"BASE": "b"}})[0] == 201
    st, out, err, code = server.exec("x", {"cmd": ["sh", "-c", "echo out; echo err >&2; exit 3"]})
    assert (st, out, err, code) == (200, b"out\n", b"err\n", 3)
    # env, cwd, user; stdin as base64
    st, out, err, code = server.exec("x", {"cmd": ["sh", "-c", "echo $BASE$E; pwd; id -u; cat"],
                                           "env": {"E": "e"}, "cwd": "/tmp", "user": "nobody",
                                           "stdin": base64.b64encode(b"from stdin").decode()})
    assert (out, code) == (b"be\n/tmp\n65534\nfrom stdin", 0), err
    # combined stderr
    st, out, err, code = server.exec("x", {"cmd": ["sh", "-c", "echo a; echo b >&2"],
                                           "stderr": "combined"})
    assert (out, err, code) == (b"a\nb\n", b"", 0)
    # a lot of output on both streams, in order
    st, out, err, code = server.exec("x", {"cmd": ["sh", "-c", "seq 100000; seq 50000 >&2"]})
    assert out == b"".join(b"%d\n" % i for i in range(1, 100001))
    assert err == b"".join(b"%d\n" % i for i in range(1, 50001)) and code == 0
    # stdin streamed as the request body; args in the query string
    blob = os.urandom(300_000)
    st, out, err, code = server.exec(
        "x", None, "?cmd=sh&cmd=-c&cmd=cat%3B%20echo%20%24V%20%3E%262&env=V=v&cwd=/tmp", "-H",
        "Content-Type: application/octet-stream", data=blob)
    assert (out, err, code) == (blob, b"v\n", 0)
    # killed by a signal: 128 + N
    assert server.exec("x", {"cmd": ["sh", "-c", "kill -9 $$"]})[3] == 137
    # errors of exec itself
    st, *_, e = server.exec("x", {"cmd": ["/no/such/binary"]})
    assert st == 404 and e["step"] == "execve" and e["errno"] == 2 and "error" in e
    st, *_, e = server.exec("x", {"cmd": ["/etc/passwd"]})
    assert st == 400 and e["step"] == "execve" and e["errno"] == 13
    st, *_, e = server.exec("x", {"cmd": ["true"], "cwd": "/no/dir"})
    assert st in (400, 404) and e["step"] == "chdir"
    for bad in ({"cmd": "true"}, {"cmd": []}, {}, {"cmd": ["true"], "env": {"A=B": "c"}},
                {"cmd": ["true"], "user": "nosuchuser"}, {"cmd": ["true"], "stdin": "%%%"},
                {"cmd": ["true"], "stderr": "ignore-me"}):
        st, *_, e = server.exec("x", bad)
        assert st == 400 and "error" in e, (bad, e)
    st, *_, e = server.exec("x", None, "", "-H", "Content-Type: application/octet-stream",
                            data=b"")
    assert st == 400                                     # no cmd in the query


def test_exec_is_streamed_both_ways(server):
    """Output arrives while the process still runs, and stdin is fed as it
    comes. (curl reads its stdin with blocking reads, so it cannot show
    this; an h11 client on a raw socket can.)"""
    import h11
    assert server.curl("POST", "/sandboxes", {"name": "io"})[0] == 201
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(server.sock)
        c = h11.Connection(h11.CLIENT)

        def send(ev):
            s.sendall(c.send(ev))

        def next_event():
            while (ev := c.next_event()) is h11.NEED_DATA:
                c.receive_data(s.recv(65536))
            return ev

        lines = []

        def next_line():
            while not lines:
                ev = next_event()
                assert isinstance(ev, (h11.Response, h11.Data)), ev
                if isinstance(ev, h11.Response):
                    assert ev.status_code == 200
                    assert dict(ev.headers)[b"content-type"] == b"application/x-ndjson"
                else:
                    lines.extend(json.loads(x) for x in bytes(ev.data).splitlines())
            return lines.pop(0)

        send(h11.Request(method="POST", target="/sandboxes/io/exec?cmd=cat", headers=[
            ("Host", "x"), ("Content-Type", "application/octet-stream"),
            ("Transfer-Encoding", "chunked")]))
        for word in (b"ping\n", b"pong\n"):
            send(h11.Data(data=word))
            assert next_line() == {"stream": "stdout",                  # before stdin ends
                                   "data": base64.b64encode(word).decode()}
        send(h11.EndOfMessage())
        assert next_line() == {"exit_code": 0}
        assert isinstance(next_event(), h11.EndOfMessage)
        # the connection stays usable (keep-alive)
        c.start_next_cycle()
        send(h11.Request(method="GET", target="/sandboxes/io", headers=[("Host", "x")]))
        send(h11.EndOfMessage())
        assert next_event().status_code == 200


def test_exec_client_hangup_kills_process(server):
    assert server.curl("POST", "/sandboxes", {"name": "h"})[0] == 201
    curl = subprocess.Popen(server.curl_args("POST", "/sandboxes/h/exec", "--data-binary",
                                             '{"cmd": ["sh", "-c", "echo up; exec sleep 1000"]}'),
                            stdout=subprocess.PIPE)
    try:
        assert json.loads(curl.stdout.readline())["stream"] == "stdout"
        sleeps = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
                  if p.name() == "sleep"]
        assert len(sleeps) == 1
    finally:
        curl.kill()
        curl.wait()
        curl.stdout.close()
    sleeps[0].wait(timeout=20)          # the server kills it when the client leaves
    assert server.curl("GET", "/stats")[0] == 200


def test_sigterm_with_requests_in_flight(tmp_dir):
    srv = Server(tmp_dir)
    try:
        assert srv.curl("POST", "/sandboxes", {"name": "a", "entrypoint": ["sleep", "1000"]})[0] == 201
        assert srv.curl("POST", "/sandboxes", {"name": "b"})[0] == 201
        mon = subprocess.Popen(srv.curl_args("GET", "/sandboxes/a/monitor"), stdout=subprocess.PIPE)
        ex = subprocess.Popen(srv.curl_args("POST", "/sandboxes/b/exec", "--data-binary",
                                            '{"cmd": ["sh", "-c", "echo up; exec sleep 1000"]}'),
                              stdout=subprocess.PIPE)
        assert json.loads(ex.stdout.readline())["stream"] == "stdout"
    finally:
        srv.stop()           # exit 0, socket removed; the leak guard checks the rest
    for p in (mon, ex):
        p.wait(timeout=30)
        p.stdout.close()


# -- the socket ---------------------------------------------------------------------

def test_socket_is_private_exclusive_and_replaces_stale(tmp_dir):
    # a stale socket file (nobody listening) is replaced
    path = tmp_dir / "s.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
    srv = Server(tmp_dir)
    try:
        st = os.lstat(srv.sock)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        # a second server on a live socket refuses, and leaves it alone
        r = sandbox_cli("--state-dir", str(tmp_dir / "state2"), "serve", "--socket", srv.sock)
        assert r.returncode == 125 and "already listening" in one_line(r)
        assert srv.curl("GET", "/stats")[0] == 200
    finally:
        srv.stop()
    # not a socket: refused
    path.write_text("x")
    r = sandbox_cli("--state-dir", str(tmp_dir / "state2"), "serve", "--socket", str(path))
    assert r.returncode == 125 and "not a socket" in one_line(r)
    assert path.read_text() == "x"


# -- the CLI clients ------------------------------------------------------------------

def test_cli_clients(server):
    assert server.curl("POST", "/sandboxes", {"name": "c1"})[0] == 201
    assert server.curl("POST", "/sandboxes", {"name": "c2", "entrypoint": ["sleep", "1000"]})[0] == 201

    r = server.cli("ps")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[0].split() == ["NAME", "STATE", "PID", "ADDRESS", "UPTIME", "CPU", "MEM"]
    rows = {ln.split()[0]: ln.split() for ln in lines[1:]}
    assert set(rows) == {"c1", "c2"} and rows["c1"][1] == "running"
    assert rows["c1"][6].endswith(("B", "KiB", "MiB")) and rows["c1"][5].endswith("s")

    r = server.cli("exec", "c1", "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (r.returncode, r.stdout, r.stderr) == (7, b"out\n", b"err\n")
    r = server.cli("exec", "--env", "A=1", "--cwd", "/tmp", "c1", "sh", "-c", "echo $A; pwd")
    assert (r.returncode, r.stdout) == (0, b"1\n/tmp\n"), r.stderr
    r = server.cli("exec", "-i", "c1", "--", "tr", "a-z", "A-Z", input=b"hello")
    assert (r.returncode, r.stdout) == (0, b"HELLO"), r.stderr
    r = server.cli("exec", "c1", "--", "/no/such")
    assert r.returncode == 127 and "command not found" in one_line(r)
    r = server.cli("exec", "c1", "--", "/etc/passwd")
    assert r.returncode == 126 and one_line(r)
    r = server.cli("exec", "nobox", "--", "true")
    assert r.returncode == 125 and "no such sandbox" in one_line(r)

    r = server.cli("inspect", "c1")
    assert r.returncode == 0 and json.loads(r.stdout)["name"] == "c1"
    r = server.cli("inspect", "nobox")
    assert r.returncode == 125 and one_line(r)

    r = server.cli("kill", "c2", "TERM")
    assert r.returncode == 0, r.stderr
    assert server.curl("GET", "/sandboxes/c2/monitor")[1]["exit_code"] == 143
    r = server.cli("kill", "c2", "NOSIG")
    assert r.returncode == 2 and one_line(r).startswith("sandbox: error:")
    r = server.cli("kill", "nobox")
    assert r.returncode == 125 and one_line(r)

    r = server.cli("rm", "c1", "c2")
    assert (r.returncode, r.stdout) == (0, b"c1\nc2\n"), r.stderr
    assert server.curl("GET", "/sandboxes")[1] == []
    r = server.cli("rm", "c1")
    assert r.returncode == 125 and "no such sandbox" in one_line(r)
    r = server.cli("ps")
    assert r.stdout.decode().splitlines() == ["NAME  STATE  PID  ADDRESS  UPTIME  CPU  MEM"]


def test_cli_without_server_and_bad_flags(tmp_dir):
    sock = str(tmp_dir / "none.sock")
    for args in (["ps"], ["exec", "x", "--", "true"], ["kill", "x"], ["rm", "x"],
                 ["inspect", "x"]):
        r = sandbox_cli(args[0], "--socket", sock, *args[1:])
        assert r.returncode == 125, (args, r.stderr)
        assert "cannot reach the server" in one_line(r)
    # the default socket lives in the state dir
    r = sandbox_cli("--state-dir", str(tmp_dir), "ps")
    assert r.returncode == 125 and str(tmp_dir / "sandbox.sock") in one_line(r)
    for args in (["ps", "--bogus"], ["exec"], ["exec", "x"], ["kill"], ["rm"], ["inspect"],
                 ["serve", "--bogus"], ["exec", "--env", "nope", "x", "true"]):
        r = sandbox_cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert one_line(r).startswith("sandbox: error:")


def test_port_fetch_reaches_a_server_inside(server):
    """POST /sandboxes/{name}/fetch: HTTP to a port inside, nothing exposed on the host."""
    import base64
    # The entrypoint serves one known file; it prints once it is listening.
    code = ("import http.server, os, sys\n"
            "os.chdir('/tmp'); open('/tmp/x', 'w').write('inside')\n"
            "s = http.server.HTTPServer(('127.0.0.1', 8080), http.server.SimpleHTTPRequestHandler)\n"
            "open('/tmp/ready', 'w').close(); s.serve_forever()\n")
    st, r = server.curl("POST", "/sandboxes", {"name": "web", "entrypoint": ["python3", "-c", code]})
    assert st == 201, r
    st, r = server.curl("POST", "/sandboxes/web/exec",
                        {"cmd": ["sh", "-c", "while [ ! -e /tmp/ready ]; do sleep 0.01; done"]})
    assert st == 200
    st, r = server.curl("POST", "/sandboxes/web/fetch", {"port": 8080, "path": "/x"})
    assert st == 200 and r["status"] == 200, r
    assert base64.b64decode(r["body"]) == b"inside"
    assert server.curl("POST", "/sandboxes/web/fetch", {"port": 9}) [0] == 502
    assert server.curl("POST", "/sandboxes/web/fetch", {"port": 70000})[0] == 400


def test_policy_switches(server):
    assert server.curl("POST", "/sandboxes", {"name": "sw", "enable_internet": False})[0] == 201
    st, r = server.curl("PUT", "/sandboxes/sw/policy", {"enable_internet": True, "intercept_https": True,
                                                         "catch_all_handler": "http://127.0.0.1:9"})
    assert st == 200, r
    assert r["applied"] == ["catch_all_handler", "intercept_https", "enable_internet"]
    assert server.curl("PUT", "/sandboxes/sw/policy", {"enable_internet": "yes"})[0] == 400
    assert server.curl("PUT", "/sandboxes/sw/policy", {"catch_all_handler": "ftp://x"})[0] == 400
    # The CA appears inside once HTTPS interception is on.
    st, out, err, code = server.exec("sw", {"cmd": ["cat", "/etc/sandbox/certs/sandbox-ca.crt"]})
    assert (st, code) == (200, 0) and out.startswith(b"-----BEGIN CERTIFICATE-----"), err
