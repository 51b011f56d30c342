"""`sandbox serve` and its thin clients `ps`, `exec`, `kill`, `rm`, `inspect` (SPEC §7).

The clients speak the JSON API of docs/api.md with the standard library's
`http.client` over the unix socket. Its commands register on the group of group.py.
"""
from __future__ import annotations

import base64
import errno
import http.client
import json
import os
import signal as _signal
import socket
import sys
import threading
import urllib.parse

import click

from .group import Failure, cli, env_pairs

SOCKET_NAME = "sandbox.sock"


def _default_socket() -> str:
    obj = click.get_current_context().find_root().obj or {}
    return os.path.join(obj.get("state_dir") or "/run/sandbox", SOCKET_NAME)


def socket_option(f):
    return click.option("--socket", "socket_path", default=None, metavar="PATH",
                        help=f"the server's unix socket [default: <state-dir>/{SOCKET_NAME}]")(f)


# -- serve ---------------------------------------------------------------------

@cli.command("serve")
@socket_option
@click.option("--resolver", default=None, help="DNS resolver ip[:port]")
@click.option("--insecure-registry", "insecure", multiple=True, metavar="HOST:PORT",
              help="a registry spoken to over plain HTTP")
@click.option("--registry-auth", default=None, metavar="PATH", help="Docker-style config.json")
@click.pass_context
def serve_command(ctx, socket_path, resolver, insecure, registry_auth):
    """Run the runtime as a daemon: a JSON-over-HTTP API on a unix socket.

    Prints "ready PATH" on stdout once it accepts connections. SIGTERM or
    SIGINT destroys every sandbox it made, removes the socket and exits 0.
    """
    import asyncio

    from ..server import BadArgument, ServerBusy, serve

    if os.geteuid() != 0:
        raise Failure("sandbox serve must run as root")
    path = os.path.abspath(socket_path or _default_socket())
    if len(os.fsencode(path)) > 107:
        raise click.UsageError(f"--socket path is too long for a unix socket: {path}")

    def ready(p: str) -> None:
        click.echo(f"ready {p}")
        sys.stdout.flush()

    try:
        asyncio.run(serve(ctx.obj["state_dir"], path, resolver, ready=ready,
                          insecure_registries=list(insecure), registry_auth=registry_auth))
    except BadArgument as e:
        raise click.UsageError(str(e))
    except ServerBusy as e:
        raise Failure(str(e))
    except OSError as e:
        raise Failure(f"cannot serve on {path}: {e.strerror or e}")


# -- the client ------------------------------------------------------------------

class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None = None):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if self.timeout is not None:
                s.settimeout(self.timeout)
            s.connect(self.unix_path)
        except BaseException:
            s.close()
            raise
        self.sock = s


class Client:
    def __init__(self, path: str | None):
        self.path = os.path.abspath(path or _default_socket())

    def connection(self) -> UnixHTTPConnection:
        conn = UnixHTTPConnection(self.path)
        try:
            conn.connect()
        except OSError as e:
            raise Failure(f"cannot reach the server at {self.path}: "
                          f"{e.strerror or e} (is `sandbox serve` running?)")
        return conn

    def call(self, method: str, path: str, body: dict | None = None):
        conn = self.connection()
        try:
            data = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise Failure(f"lost the server at {self.path}: {e}")
        finally:
            conn.close()
        try:
            obj = json.loads(raw) if raw.strip() else None
        except ValueError:
            raise Failure(f"the server answered {resp.status} with a body that is not JSON")
        if resp.status >= 300:
            raise_for(resp.status, obj)
        return obj


def raise_for(status: int, obj) -> None:
    msg = obj.get("error") if isinstance(obj, dict) else None
    msg = (msg or f"HTTP {status}").replace("\n", " ")
    if status == 400:
        raise click.UsageError(msg)
    raise Failure(msg)


def _q(name: str) -> str:
    return urllib.parse.quote(name, safe="")


# -- ps ----------------------------------------------------------------------------

def _dur(s) -> str:
    if s is None:
        return "-"
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _cpu(ns) -> str:
    return "-" if ns is None else f"{ns / 1e9:.2f}s"


def _mem(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return "-"


@cli.command("ps")
@socket_option
@click.option("--json", "as_json", is_flag=True, help="print the server's JSON")
def ps_command(socket_path, as_json):
    """List the sandboxes of a running `sandbox serve`, with CPU and memory."""
    boxes = Client(socket_path).call("GET", "/sandboxes")
    if as_json:
        click.echo(json.dumps(boxes, indent=2))
        return
    rows = [("NAME", "STATE", "PID", "ADDRESS", "UPTIME", "CPU", "MEM")]
    for b in boxes:
        rows.append((b["name"], b["state"], str(b.get("pid") or "-"), b.get("address") or "-",
                     _dur(b.get("uptime_s")), _cpu(b.get("cpu_ns")), _mem(b.get("memory_bytes"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


# -- exec --------------------------------------------------------------------------

def _send_stdin_chunked(sock: socket.socket) -> None:
    """Streams our stdin as the chunked request body (a thread: the main
    thread reads the response at the same time)."""
    try:
        while True:
            data = os.read(0, 65536)
            if not data:
                break
            sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))
        sock.sendall(b"0\r\n\r\n")
    except OSError:
        pass    # the server finished (or the process exited): the rest is dropped


@cli.command("exec", context_settings={"allow_interspersed_args": False})
@socket_option
@click.option("-i", "--interactive", is_flag=True, help="stream stdin to CMD")
@click.option("--env", "envs", multiple=True, metavar="K=V", help="environment variable")
@click.option("--cwd", default=None, help="working directory of CMD")
@click.option("--user", default=None, help="user name or UID for CMD")
@click.argument("name")
@click.argument("cmd", nargs=-1, required=True)
def exec_command(socket_path, interactive, envs, cwd, user, name, cmd):
    """Run CMD in the running sandbox NAME; exits with CMD's exit code."""
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise click.UsageError("exec needs a command: sandbox exec NAME -- CMD...")
    env = env_pairs(envs)
    client = Client(socket_path)
    conn = client.connection()
    url = f"/sandboxes/{_q(name)}/exec"
    try:
        if interactive:
            q = [("cmd", c) for c in cmd] + [("env", f"{k}={v}") for k, v in env.items()]
            q += [(k, v) for k, v in (("cwd", cwd), ("user", user)) if v is not None]
            conn.putrequest("POST", url + "?" + urllib.parse.urlencode(q))
            conn.putheader("Content-Type", "application/octet-stream")
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            threading.Thread(target=_send_stdin_chunked, args=(conn.sock,), daemon=True).start()
        else:
            body = {"cmd": list(cmd), "env": env or None, "cwd": cwd, "user": user}
            conn.request("POST", url, body=json.dumps(body).encode(),
                         headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raw = resp.read()
            try:
                obj = json.loads(raw)
            except ValueError:
                obj = None
            if isinstance(obj, dict) and obj.get("step") == "execve":
                if obj.get("errno") in (errno.ENOENT, errno.ENOTDIR):
                    raise Failure(f"{cmd[0]}: command not found", 127)
                raise Failure(f"{cmd[0]}: {os.strerror(obj.get('errno') or 0)}", 126)
            raise_for(resp.status, obj)
        outs = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
        for raw in resp:
            msg = json.loads(raw)
            if "exit_code" in msg:
                code = msg["exit_code"]
                break
            out = outs[msg["stream"]]
            out.write(base64.b64decode(msg["data"]))
            out.flush()
        else:
            raise Failure("the server ended the exec stream without an exit code")
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise Failure(f"lost the server at {client.path}: {e}")
    finally:
        conn.close()
    sys.exit(code)


# -- logs ------------------------------------------------------------------------------

@cli.command("logs")
@socket_option
@click.option("-f", "--follow", is_flag=True, help="keep streaming until the sandbox stops")
@click.argument("name")
def logs_command(socket_path, follow, name):
    """Print the captured stdout/stderr of NAME's entrypoint (to our stdout/stderr)."""
    client = Client(socket_path)
    conn = client.connection()
    url = f"/sandboxes/{_q(name)}/logs" + ("?follow=1" if follow else "")
    try:
        conn.request("GET", url)
        resp = conn.getresponse()
        if resp.status != 200:
            raw = resp.read()
            try:
                obj = json.loads(raw)
            except ValueError:
                obj = None
            raise_for(resp.status, obj)
        outs = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
        for raw in resp:
            msg = json.loads(raw)
            if "stream" in msg:
                out = outs[msg["stream"]]
                out.write(base64.b64decode(msg["data"]))
                out.flush()
            elif any((msg.get("dropped") or {}).values()):
                d = msg["dropped"]
                click.echo(f"sandbox: logs: {d.get('stdout', 0)} stdout and {d.get('stderr', 0)} "
                           "stderr bytes were dropped (ring full)", err=True)
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise Failure(f"lost the server at {client.path}: {e}")
    finally:
        conn.close()


# -- kill, rm, inspect -------------------------------------------------------------

def _parse_signal(text: str) -> int:
    if text.isdigit():
        n = int(text)
    else:
        name = text.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        try:
            n = int(_signal.Signals[name])
        except KeyError:
            raise click.BadParameter(f"unknown signal {text!r}", param_hint="SIG") from None
    if not 1 <= n <= 64:
        raise click.BadParameter(f"signal must be in 1..64, got {n}", param_hint="SIG")
    return n


@cli.command("kill")
@socket_option
@click.argument("name")
@click.argument("sig", default="KILL")
def kill_command(socket_path, name, sig):
    """Send SIG (default KILL; a number or a name like TERM) to NAME's entrypoint."""
    signo = _parse_signal(sig)
    Client(socket_path).call("POST", f"/sandboxes/{_q(name)}/signal", {"signal": signo})
    click.echo(name)


@cli.command("rm")
@socket_option
@click.option("-f", "--force", is_flag=True, help="accepted for docker habits: rm always kills")
@click.argument("names", nargs=-1, required=True)
def rm_command(socket_path, force, names):
    """Destroy sandboxes (kill everything in them, remove their resources)."""
    client = Client(socket_path)
    for name in names:
        client.call("DELETE", f"/sandboxes/{_q(name)}")
        click.echo(name)


@cli.command("inspect")
@socket_option
@click.argument("name")
def inspect_command(socket_path, name):
    """Print everything the server knows about NAME, as JSON."""
    click.echo(json.dumps(Client(socket_path).call("GET", f"/sandboxes/{_q(name)}"), indent=2))
