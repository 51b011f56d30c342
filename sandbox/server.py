"""`sandbox serve`: the runtime as a daemon (SPEC §7).

JSON over HTTP/1.1 on a unix socket, for orchestrators written in any
language. h11 does the HTTP framing (no hand-written parser); asyncio unix
streams carry it. One `Runtime` per server; every sandbox it creates dies
with it (SIGTERM/SIGINT: stop accepting, end open requests, destroy every
sandbox, remove the socket).

The endpoints are documented in docs/api.md. The design in two lines:

* every answer is JSON (`{"error": ...}` on failure, with 400 for bad
  arguments, 404 for an unknown sandbox, 409 for a state conflict, 501 for a
  feature this build lacks, 500 otherwise) — except `exec`, which streams
  `application/x-ndjson` lines (`{"stream": "stdout"|"stderr", "data": b64}`
  then `{"exit_code": N}`);
* a request's lifetime bounds what it waits for: closing the connection
  during `exec` kills the process (SIGKILL), during `monitor` ends the wait.

Security: the socket is the authentication. It is created 0600 under a
temporary name and renamed into place, so there is no window in which
another user could connect; only root runs the server.
"""
from __future__ import annotations

import asyncio
import base64
import errno
import inspect
import json
import os
import signal as _signal
import socket
import stat
import time
import urllib.parse
from http import HTTPStatus
from typing import Any

import h11

from .errors import ContainerError, ContainerExitError, ExecError, SandboxError, SandboxNotRunning
from .log import get_logger

log = get_logger("sandbox.server")

MAX_JSON = 1 << 20          # a JSON request body larger than this: 413
READ_SIZE = 64 * 1024
SERVER_NAME = b"sandbox"


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


class HttpError(Exception):
    def __init__(self, status: int, msg: str, **extra: Any):
        super().__init__(msg)
        self.status = status
        self.extra = extra


class BadArgument(Exception):
    """A bad `serve` argument (the CLI reports it as a usage error)."""


class ServerBusy(Exception):
    """Another live server already listens on the socket."""


# -- one HTTP connection -----------------------------------------------------

class Conn:
    """h11 on an asyncio stream pair; single-task use except `watch_hangup`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.SERVER)
        self.closed = False

    async def _fill(self) -> None:
        try:
            data = await self.reader.read(READ_SIZE)
        except (ConnectionError, OSError):
            data = b""
        self.h11.receive_data(data)

    async def next_event(self):
        while True:
            ev = self.h11.next_event()
            if ev is h11.NEED_DATA:
                if self.h11.they_are_waiting_for_100_continue:
                    await self.send(h11.InformationalResponse(status_code=100, headers=[]))
                await self._fill()
                continue
            return ev

    async def send(self, event) -> None:
        data = self.h11.send(event)
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def read_body(self, limit: int = MAX_JSON) -> bytes:
        parts, size = [], 0
        while True:
            ev = await self.next_event()
            if isinstance(ev, h11.Data):
                size += len(ev.data)
                if size > limit:
                    raise HttpError(413, f"request body larger than {limit} bytes")
                parts.append(ev.data)
            elif isinstance(ev, h11.EndOfMessage):
                return b"".join(parts)
            else:  # ConnectionClosed / PAUSED: the client went away mid-body
                raise ConnectionResetError("client closed the connection")

    async def watch_hangup(self) -> None:
        """Returns when the peer closes the connection. Pipelined bytes are
        kept for h11 (the next request), and the watch ends: the peer lives."""
        try:
            data = await self.reader.read(READ_SIZE)
        except (ConnectionError, OSError):
            data = b""
        if data:
            self.h11.receive_data(data)
            await asyncio.Future()      # alive: wait until cancelled
        self.closed = True


class Request:
    def __init__(self, conn: Conn, ev: h11.Request):
        self.conn = conn
        self.method = ev.method.decode("ascii", "replace").upper()
        self.target = ev.target.decode("ascii", "replace")
        url = urllib.parse.urlsplit(self.target)
        self.path = [urllib.parse.unquote(p) for p in url.path.split("/") if p]
        self.query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        self.headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in ev.headers}
        self.started = False      # response headers sent

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()

    async def json(self) -> dict:
        body = await self.conn.read_body()
        if not body.strip():
            return {}
        try:
            obj = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise HttpError(400, f"request body is not valid JSON: {e}")
        if not isinstance(obj, dict):
            raise HttpError(400, "request body must be a JSON object")
        return obj

    def q1(self, key: str) -> str | None:
        v = self.query.get(key)
        return v[-1] if v else None

    async def start(self, status: int, content_type: str, length: int | None = None,
                    extra: list | None = None) -> None:
        headers = [(b"content-type", content_type.encode()), (b"server", SERVER_NAME)]
        if length is not None:
            headers.append((b"content-length", str(length).encode()))
        headers += extra or []
        self.started = True
        await self.conn.send(h11.Response(status_code=status, headers=headers,
                                          reason=_reason(status)))

    async def reply(self, status: int, obj: Any, extra: list | None = None) -> None:
        body = (json.dumps(obj) + "\n").encode()
        await self.start(status, "application/json", len(body), extra)
        await self.conn.send(h11.Data(data=body))
        await self.conn.send(h11.EndOfMessage())


# -- argument checks (one line, naming the field) ------------------------------

def _only(obj: dict, allowed: tuple[str, ...], what: str) -> None:
    extra = sorted(set(obj) - set(allowed))
    if extra:
        raise HttpError(400, f"{what}: unknown field(s) {', '.join(extra)}; "
                             f"known: {', '.join(allowed)}")


def _opt(obj: dict, key: str, types, what: str):
    v = obj.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, types)):
        raise TypeError(f"{key} must be {what}")
    return v


def _host_list(obj: dict, key: str) -> list[str] | None:
    v = obj.get(key)
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(h, str) for h in v):
        raise TypeError(f"{key} must be a list of str")
    return v


def _handlers(obj: dict, key: str) -> dict[str, str]:
    v = obj.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(u, str)
                                          for k, u in v.items()):
        raise TypeError(f"{key} must be an object of target -> URL string")
    for t, u in v.items():
        if not u.startswith(("http://", "https://")):
            raise ValueError(f"{key}[{t!r}]: handler must be an http:// or https:// URL, got {u!r}")
    return v


def _signo(v) -> int:
    if isinstance(v, str):
        name = v.upper()
        if name.isdigit():
            return int(name)
        if not name.startswith("SIG"):
            name = "SIG" + name
        try:
            return int(_signal.Signals[name])
        except KeyError:
            raise ValueError(f"unknown signal {v!r}") from None
    return v  # box.signal validates ints (1..64, not bool)


def _stats(box) -> dict:
    res = getattr(box, "_res", None)
    cg = getattr(res, "cgroup", None)
    if cg is None or not hasattr(cg, "stats"):
        return {}
    try:
        return dict(cg.stats())
    except (OSError, ValueError):
        return {}


def _uptime(box) -> float | None:
    if box.state != "running" or not box.pid:
        return None
    try:
        import psutil
        return round(max(0.0, time.time() - psutil.Process(box.pid).create_time()), 3)
    except Exception:  # psutil missing or the process just exited
        return None


def summary(box) -> dict:
    st = _stats(box)
    return {
        "id": box.id, "name": box.name, "state": box.state, "pid": box.pid or None,
        "address": getattr(box, "address", None),
        "uptime_s": _uptime(box),
        "cpu_ns": st.get("cpu_usage_ns"),
        "memory_bytes": st.get("memory_current"),
    }


def _policy(box) -> dict | None:
    """The sandbox's outbound policy as JSON (targets as text; a handler that
    is a URL as its URL, any other as its kind)."""
    pol = getattr(box, "policy", None)
    if pol is None:
        return None

    def hosts(v):
        return None if v is None else [str(t) for t in v]

    def handler(h):
        return h if isinstance(h, str) else f"<{type(h).__name__}>"

    http, https = {}, {}
    for r in getattr(pol, "routes", ()):
        for scheme in getattr(r, "schemes", ("http",)):
            (https if scheme == "https" else http)[str(r.target)] = handler(r.handler)
    return {"allowed_hosts": hosts(getattr(pol, "allowed_hosts", None)),
            "denied_hosts": hosts(getattr(pol, "denied_hosts", ())),
            "http_handlers": http, "https_handlers": https,
            "intercept_https": getattr(pol, "intercept_https", None)}


def details(box) -> dict:
    out = summary(box)
    lim = getattr(box, "_limits", None)
    out["limits"] = {"memory": getattr(lim, "memory", None), "pids": getattr(lim, "pids", None),
                     "cpus": getattr(lim, "cpus", None)}
    out["rootfs"] = getattr(box, "_rootfs", None)
    out["env_keys"] = sorted(getattr(box, "_env", {}) or {})
    out["enable_internet"] = getattr(box, "enable_internet", None)
    out["stats"] = _stats(box)
    policy = _policy(box)
    if policy is not None:
        out["policy"] = policy
    return out


def _exec_status(e: ExecError) -> int:
    # "no such executable / directory" is a missing thing (404); anything
    # else (not executable, bad user...) is a bad argument (400). `step` and
    # `errno` tell them apart precisely.
    return 404 if e.errno in (errno.ENOENT, errno.ENOTDIR) else 400


def error_status(e: BaseException) -> tuple[int, dict]:
    if isinstance(e, HttpError):
        return e.status, {"error": str(e), **e.extra}
    if isinstance(e, h11.RemoteProtocolError):       # e.g. a broken chunked body
        return e.error_status_hint, {"error": f"bad HTTP request: {e}"}
    if isinstance(e, ExecError):
        return _exec_status(e), {"error": str(e), "errno": e.errno, "step": e.step}
    if isinstance(e, SandboxNotRunning):
        return 409, {"error": str(e)}
    if isinstance(e, (TypeError, ValueError)):
        return 400, {"error": str(e)}
    if type(e) is SandboxError:
        # Plain SandboxError is how the Sandbox reports state conflicts
        # ("already running", "was destroyed"); subclasses are runtime failures.
        return 409, {"error": str(e)}
    return 500, {"error": f"{type(e).__name__}: {e}"}


# -- the server ----------------------------------------------------------------

CREATE_FIELDS = ("name", "rootfs", "memory", "pids", "cpus", "env", "entrypoint",
                 "enable_internet", "allowed_hosts", "denied_hosts", "start")
START_FIELDS = ("env", "entrypoint", "enable_internet")
EXEC_FIELDS = ("cmd", "cwd", "env", "user", "stdin", "stderr")
POLICY_FIELDS = ("allowed_hosts", "denied_hosts", "http_handlers", "https_handlers")


class Server:
    def __init__(self, runtime, socket_path: str):
        self.rt = runtime
        self.path = os.path.abspath(socket_path)
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self._ino: tuple[int, int] | None = None
        self._t0 = time.time()
        self._requests = 0

    # -- the socket ----------------------------------------------------------
    def _bind(self) -> socket.socket:
        """A listening socket at `path`, mode 0600, put in place atomically."""
        d = os.path.dirname(self.path)
        os.makedirs(d, mode=0o700, exist_ok=True)
        if os.path.lexists(self.path):
            st = os.lstat(self.path)
            if not stat.S_ISSOCK(st.st_mode):
                raise ServerBusy(f"{self.path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                probe.connect(self.path)
            except (ConnectionRefusedError, FileNotFoundError):
                pass            # stale: nobody listens; the rename below replaces it
            else:
                raise ServerBusy(f"a server is already listening on {self.path}")
            finally:
                probe.close()
        tmp = os.path.join(d, f".{os.path.basename(self.path)}.{os.getpid()}.tmp")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            # umask makes bind() create the inode 0600 from the start; it is
            # process-wide, but nothing else runs yet.
            old = os.umask(0o177)
            try:
                sock.bind(tmp)
            finally:
                os.umask(old)
            os.chmod(tmp, 0o600)
            sock.listen(128)
            os.rename(tmp, self.path)
        except BaseException:
            sock.close()
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        st = os.stat(self.path)
        self._ino = (st.st_dev, st.st_ino)
        sock.setblocking(False)
        return sock

    def _unlink(self) -> None:
        """Removes the socket file if it is still ours (not a successor's)."""
        if self._ino is None:
            return
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._ino = None

    async def start(self) -> None:
        sock = self._bind()
        try:
            self._server = await asyncio.start_unix_server(self._on_conn, sock=sock,
                                                           limit=READ_SIZE)
        except BaseException:
            sock.close()
            self._unlink()
            raise
        log.info("server.listen", socket=self.path)

    async def close(self) -> None:
        """Stop accepting, end open requests, destroy every sandbox, remove the socket."""
        if self._server is not None:
            self._server.close()
        self._unlink()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        log.info("server.stop", socket=self.path)

    # -- connections ---------------------------------------------------------
    async def _on_conn(self, reader, writer) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        conn = Conn(reader, writer)
        try:
            while True:
                try:
                    ev = await conn.next_event()
                except h11.RemoteProtocolError as e:
                    if conn.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                        body = (json.dumps({"error": f"bad HTTP request: {e}"}) + "\n").encode()
                        try:
                            await conn.send(h11.Response(
                                status_code=e.error_status_hint,
                                reason=_reason(e.error_status_hint),
                                headers=[(b"content-type", b"application/json"),
                                         (b"content-length", str(len(body)).encode()),
                                         (b"connection", b"close")]))
                            await conn.send(h11.Data(data=body))
                            await conn.send(h11.EndOfMessage())
                        except Exception:
                            pass
                    break
                if not isinstance(ev, h11.Request):
                    break       # ConnectionClosed (or PAUSED after a close)
                req = Request(conn, ev)
                await self._handle(req)
                if not conn.closed:
                    await self._discard_body(conn)     # e.g. a GET's (empty) end of message
                if conn.closed or conn.h11.our_state is not h11.DONE \
                        or conn.h11.their_state is not h11.DONE:
                    break       # an unread body or a finished client: close
                conn.h11.start_next_cycle()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass                # server shutdown
        except Exception as e:  # never let one connection take the server down
            log.error("server.connection_failed", error=f"{type(e).__name__}: {e}")
        finally:
            self._tasks.discard(task)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError, asyncio.CancelledError):
                pass

    async def _handle(self, req: Request) -> None:
        t0 = time.perf_counter()
        self._requests += 1
        status = 200
        try:
            handler, args = self._route(req)
            status = await handler(req, *args) or 200
        except asyncio.CancelledError:
            raise
        except (ConnectionError, h11.LocalProtocolError):
            status = 499
            req.conn.closed = True
        except Exception as e:
            status, body = error_status(e)
            if status == 500:
                log.error("server.handler_failed", method=req.method, target=req.target,
                          error=f"{type(e).__name__}: {e}")
            if req.started:
                req.conn.closed = True      # cannot report it now: cut the response
            else:
                await self._discard_body(req.conn)
                extra = []
                if isinstance(e, HttpError) and status == 405:
                    extra = [(b"allow", e.extra.pop("allow").encode())]
                    body.pop("allow", None)
                try:
                    await req.reply(status, body, extra)
                except (ConnectionError, h11.LocalProtocolError):
                    req.conn.closed = True
        log.debug("server.request", method=req.method, target=req.target, status=status,
                  ms=round((time.perf_counter() - t0) * 1000, 2))

    @staticmethod
    async def _discard_body(conn: Conn) -> None:
        """Reads an unread request body (bounded) before an early error
        answer, so that a client still sending it does not get EPIPE
        instead of the answer."""
        if conn.h11.their_state is not h11.SEND_BODY or conn.h11.they_are_waiting_for_100_continue:
            return
        try:
            await asyncio.wait_for(conn.read_body(MAX_JSON), 5)
        except (HttpError, ConnectionError, h11.RemoteProtocolError, asyncio.TimeoutError):
            conn.closed = True

    # -- routing -------------------------------------------------------------
    def _route(self, req: Request):
        p, m = req.path, req.method
        table: dict[str, Any]
        args: tuple = ()
        if p == ["stats"]:
            table = {"GET": self.get_stats}
        elif p == ["sandboxes"]:
            table = {"GET": self.list_sandboxes, "POST": self.create}
        elif len(p) == 2 and p[0] == "sandboxes":
            table = {"GET": self.inspect, "DELETE": self.delete}
            args = (p[1],)
        elif len(p) == 3 and p[0] == "sandboxes":
            args = (p[1],)
            table = {
                "start": {"POST": self.start_box},
                "signal": {"POST": self.signal},
                "monitor": {"GET": self.monitor},
                "exec": {"POST": self.exec},
                "policy": {"PUT": self.policy},
            }.get(p[2], {})
        else:
            table = {}
        if not table:
            raise HttpError(404, f"no such endpoint: {req.target}")
        if m not in table:
            allow = ", ".join(sorted(table))
            raise HttpError(405, f"{m} not allowed on {'/' + '/'.join(p)} (allowed: {allow})",
                            allow=allow)
        if args:
            return table[m], (self._box(args[0]),)
        return table[m], ()

    def _box(self, name: str):
        for b in self.rt.sandboxes:
            if b.name == name:
                return b
        raise HttpError(404, f"no such sandbox: {name}")

    # -- endpoints -------------------------------------------------------------
    async def get_stats(self, req: Request):
        boxes = self.rt.sandboxes
        cpu = mem = 0
        for b in boxes:
            st = _stats(b)
            cpu += st.get("cpu_usage_ns") or 0
            mem += st.get("memory_current") or 0
        try:
            import psutil
            rss = psutil.Process().memory_info().rss
        except Exception:
            rss = None
        await req.reply(200, {
            "sandboxes": len(boxes),
            "running": sum(1 for b in boxes if b.state == "running"),
            "cpu_ns": cpu, "memory_bytes": mem,
            "server": {"pid": os.getpid(), "uptime_s": round(time.time() - self._t0, 3),
                       "rss_bytes": rss, "requests": self._requests,
                       "connections": len(self._tasks), "socket": self.path,
                       "state_dir": self.rt.state_dir},
        })

    async def list_sandboxes(self, req: Request):
        await req.reply(200, [summary(b) for b in self.rt.sandboxes])

    async def inspect(self, req: Request, box):
        await req.reply(200, details(box))

    async def create(self, req: Request):
        o = await req.json()
        _only(o, CREATE_FIELDS, "POST /sandboxes")
        for k in ("name", "rootfs"):
            _opt(o, k, str, "a string")
        start = o.get("start", True)
        if not isinstance(start, bool):
            raise TypeError("start must be a bool")
        _host_list(o, "allowed_hosts"), _host_list(o, "denied_hosts")
        box = self.rt.sandbox(o.get("name"), rootfs=o.get("rootfs"), memory=o.get("memory"),
                              pids=o.get("pids"), cpus=o.get("cpus"))
        try:
            hosts = {k: o[k] for k in ("allowed_hosts", "denied_hosts") if o.get(k) is not None}
            if hosts:
                await self._apply_policy(box, hosts)
            if start:
                kw = {k: o[k] for k in START_FIELDS if k in o}
                await box.start(**kw)
        except BaseException:
            await asyncio.shield(box.destroy())
            raise
        log.info("server.create", sandbox=box.name, id=box.id, started=start)
        await req.reply(201, {"id": box.id, "name": box.name, "state": box.state,
                              "pid": box.pid or None},
                        [(b"location", f"/sandboxes/{box.name}".encode())])
        return 201

    async def start_box(self, req: Request, box):
        o = await req.json()
        _only(o, START_FIELDS, "POST /sandboxes/{name}/start")
        if box.state == "running":
            raise HttpError(409, f"sandbox {box.name} is already running")
        await box.start(**o)
        await req.reply(200, {"id": box.id, "name": box.name, "state": box.state,
                              "pid": box.pid or None})

    async def delete(self, req: Request, box):
        await req.conn.read_body()
        msg = req.q1("error")
        await asyncio.shield(box.destroy(msg))
        log.info("server.destroy", sandbox=box.name, error=msg)
        await req.reply(200, {"id": box.id, "name": box.name, "state": box.state})

    async def signal(self, req: Request, box):
        o = await req.json()
        _only(o, ("signal",), "POST /sandboxes/{name}/signal")
        if "signal" not in o:
            raise TypeError("signal is required (a number 1..64 or a name like \"TERM\")")
        signo = _signo(o["signal"])
        box.signal(signo)
        await req.reply(200, {"name": box.name, "signal": signo, "state": box.state})

    async def monitor(self, req: Request, box):
        await req.conn.read_body()
        waiter = asyncio.ensure_future(self._outcome(box))
        hangup = asyncio.ensure_future(req.conn.watch_hangup())
        try:
            await asyncio.wait({waiter, hangup}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hangup.cancel()
            if not waiter.done():
                waiter.cancel()
        if not waiter.done() or waiter.cancelled():
            req.conn.closed = True
            return 499
        await req.reply(200, waiter.result())

    @staticmethod
    async def _outcome(box) -> dict:
        try:
            await box.monitor()
            return {"exit_code": 0, "error": None}
        except ContainerExitError as e:
            return {"exit_code": e.exit_code, "error": str(e)}
        except ContainerError as e:
            return {"exit_code": None, "error": str(e)}

    async def policy(self, req: Request, box):
        o = await req.json()
        _only(o, POLICY_FIELDS, "PUT /sandboxes/{name}/policy")
        applied = await self._apply_policy(box, o)
        await req.reply(200, {"name": box.name, "applied": applied})

    async def _apply_policy(self, box, o: dict) -> list[str]:
        allowed = _host_list(o, "allowed_hosts")
        denied = _host_list(o, "denied_hosts")
        http = _handlers(o, "http_handlers")
        https = _handlers(o, "https_handlers")
        steps = []          # (field, method name, args)
        if "allowed_hosts" in o:
            steps.append(("allowed_hosts", "set_allowed_hosts", [(allowed,)]))
        if "denied_hosts" in o:
            steps.append(("denied_hosts", "set_denied_hosts", [(denied or [],)]))
        if http:
            steps.append(("http_handlers", "intercept_outbound_http", list(http.items())))
        if https:
            steps.append(("https_handlers", "intercept_outbound_https", list(https.items())))
        # All or nothing: check every method exists and every target parses
        # before applying any.
        missing = [m for _, m, _ in steps if not callable(getattr(box, m, None))]
        if missing:
            raise HttpError(501, f"this build cannot apply policy: Sandbox.{missing[0]} "
                                 "is not available")
        try:
            from .proxy.policy import parse_target
        except ImportError:
            parse_target = None
        if parse_target is not None:
            for field, targets in (("allowed_hosts", allowed or ()), ("denied_hosts", denied or ()),
                                   ("http_handlers", http), ("https_handlers", https)):
                for t in targets:
                    try:
                        parse_target(t)
                    except (TypeError, ValueError) as e:
                        raise ValueError(f"{field}: {e}") from None
        applied = []
        for field, meth, calls in steps:
            for args in calls:
                r = getattr(box, meth)(*args)
                if inspect.isawaitable(r):
                    await r
            applied.append(field)
        return applied

    # -- exec ------------------------------------------------------------------
    def _exec_args(self, o: dict) -> dict:
        stdin = o.get("stdin")
        if stdin is not None:
            if not isinstance(stdin, str):
                raise TypeError("stdin must be base64 text or null")
            try:
                stdin = base64.b64decode(stdin, validate=True)
            except ValueError:
                raise ValueError("stdin is not valid base64") from None
        stderr = o.get("stderr", "pipe")
        if stderr not in ("pipe", "combined"):
            raise ValueError("stderr must be \"pipe\" or \"combined\"")
        user = o.get("user")
        if isinstance(user, str) and user.isdigit():
            user = int(user)
        return dict(cmd=o.get("cmd"), stdin=stdin, stderr=stderr, cwd=o.get("cwd"),
                    env=o.get("env"), user=user)

    def _exec_query(self, req: Request) -> dict:
        _only(req.query, EXEC_FIELDS[:-2] + ("stderr",), "exec query")
        env = {}
        for kv in req.query.get("env", []):
            k, sep, v = kv.partition("=")
            if not sep:
                raise ValueError(f"env expects K=V, got {kv!r}")
            env[k] = v
        o = {"cmd": req.query.get("cmd"), "cwd": req.q1("cwd"), "user": req.q1("user"),
             "env": env or None, "stderr": req.q1("stderr") or "pipe"}
        return self._exec_args(o)

    async def exec(self, req: Request, box):
        conn = req.conn
        body_done = asyncio.Event()
        client_gone = asyncio.Event()
        if req.content_type == "application/octet-stream":
            a = self._exec_query(req)
            if conn.h11.they_are_waiting_for_100_continue:
                # Say so before the 200 below: a client that sent
                # "Expect: 100-continue" holds the body back until then.
                await conn.send(h11.InformationalResponse(status_code=100, headers=[]))

            async def body():
                # The request body is the process's stdin, pulled only as fast
                # as the process reads it (feed_stdin drains the pipe).
                try:
                    while True:
                        ev = await conn.next_event()
                        if isinstance(ev, h11.Data):
                            yield ev.data
                        elif isinstance(ev, h11.EndOfMessage):
                            body_done.set()
                            return
                        else:
                            client_gone.set()
                            return
                except (ConnectionError, h11.RemoteProtocolError):
                    client_gone.set()
            a["stdin"] = body()
        else:
            o = await req.json()
            _only(o, EXEC_FIELDS, "POST /sandboxes/{name}/exec")
            a = self._exec_args(o)
            body_done.set()
        if a["cmd"] is None:
            raise TypeError("cmd is required (a non-empty list of str)")
        proc = await box.exec(a["cmd"], stdin=a["stdin"], stdout="pipe", stderr=a["stderr"],
                              cwd=a["cwd"], env=a["env"], user=a["user"])
        log.info("server.exec", sandbox=box.name, cmd=list(a["cmd"]), pid=proc.pid)
        lock = asyncio.Lock()

        async def line(obj: dict) -> None:
            payload = (json.dumps(obj) + "\n").encode()
            async with lock:
                await conn.send(h11.Data(data=payload))

        async def pump(name: str, stream) -> None:
            if stream is None:
                return
            async for chunk in stream:
                await line({"stream": name, "data": base64.b64encode(chunk).decode()})

        async def hangup() -> None:
            await body_done.wait()
            await conn.watch_hangup()
            client_gone.set()

        watcher = asyncio.ensure_future(hangup())
        gone = asyncio.ensure_future(client_gone.wait())
        pumps = asyncio.ensure_future(asyncio.gather(pump("stdout", proc.stdout),
                                                     pump("stderr", proc.stderr)))
        try:
            await req.start(200, "application/x-ndjson")
            await asyncio.wait({pumps, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not pumps.done() or pumps.exception() is not None:
                conn.closed = True          # the client left: the process goes too
                return 499
            code = await proc.exit_code
            await line({"exit_code": code})
            await conn.send(h11.EndOfMessage())
            return 200
        finally:
            for t in (watcher, gone, pumps):
                t.cancel()
            await asyncio.gather(watcher, gone, pumps, return_exceptions=True)
            if not proc.exit_code.done():
                proc.kill(int(_signal.SIGKILL))
                await asyncio.shield(proc.exit_code)
            if not conn.closed and conn.h11.their_state is not h11.DONE:
                conn.closed = True          # stdin was cut short: the body is unread


async def serve(state_dir: str, socket_path: str, resolver: str | None = None,
                ready=None) -> None:
    """Runs until SIGTERM/SIGINT; then destroys every sandbox and removes the socket."""
    from .runtime import Runtime
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    try:
        rt = Runtime(state_dir=state_dir, resolver=resolver)
    except (TypeError, ValueError) as e:
        raise BadArgument(str(e)) from None
    async with rt:
        server = Server(rt, socket_path)
        await server.start()
        for s in (_signal.SIGTERM, _signal.SIGINT):
            loop.add_signal_handler(s, stop.set)
        try:
            if ready is not None:
                ready(server.path)
            await stop.wait()
        finally:
            for s in (_signal.SIGTERM, _signal.SIGINT):
                loop.remove_signal_handler(s)
            await server.close()
        # leaving `async with rt` destroys every sandbox and its kernel objects
