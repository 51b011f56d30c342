"""The endpoints of `sandbox serve` (docs/api.md): routing and handlers.

`Endpoints` is a mixin of `server.Server`: it holds the handlers, the daemon
holds the socket and the connection loop.  A handler takes a `Request` (and
the sandbox named in the path), answers through it, and returns the status it
sent when that is not 200 (for the request log); raising maps to a JSON error
through `views.error_status`.
"""
from __future__ import annotations

import asyncio
import base64
import inspect
import json
import os
import signal as _signal
import time
from typing import Any

import h11

from ..errors import ContainerError, ContainerExitError
from ..log import get_logger
from .http import HttpError, Request
from .views import handler_map, host_list, check_fields, opt_field, parse_signal, box_stats, details, summary

# Same logger as the daemon: the events ("server.create", ...) are unchanged.
log = get_logger("sandbox.server")

CREATE_FIELDS = ("name", "rootfs", "image", "memory", "pids", "cpus", "log_limit", "env", "entrypoint",
                 "enable_internet", "allowed_hosts", "denied_hosts", "start")
START_FIELDS = ("env", "entrypoint", "enable_internet")
EXEC_FIELDS = ("cmd", "cwd", "env", "user", "stdin", "stderr")
POLICY_FIELDS = ("allowed_hosts", "denied_hosts", "http_handlers", "https_handlers",
                 "catch_all_handler", "intercept_https", "enable_internet")


class Endpoints:
    """Route table and handlers.  The class it is mixed into provides `rt` (the
    Runtime) and, for `GET /stats`, `path`, `_t0`, `_requests` and `_tasks`."""

    # -- routing -------------------------------------------------------------
    def _route(self, req: Request):
        p, m = req.path, req.method
        table: dict[str, Any]
        args: tuple = ()
        if p == ["stats"]:
            table = {"GET": self.get_stats}
        elif p and p[0] == "images" and len(p) <= 2:
            # docs/api.md "Images" (sandbox/server/images.py); a ref is one
            # URL-encoded segment: /images/127.0.0.1%3A5000%2Fteam%2Fapp%3A1
            from . import images as si
            rt = self.rt
            if len(p) == 1:
                table = {"GET": lambda r: si.list_images(rt, r), "POST": lambda r: si.pull_image(rt, r)}
            elif p[1] == "prune":
                table = {"POST": lambda r: si.prune_images(rt, r)}
            else:
                table = {"DELETE": lambda r, ref=p[1]: si.remove_image(rt, r, ref)}
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
                "fetch": {"POST": self.port_fetch},
                "logs": {"GET": self.logs},
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
            st = box_stats(b)
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
        check_fields(o, CREATE_FIELDS, "POST /sandboxes")
        for k in ("name", "rootfs", "image"):
            opt_field(o, k, str, "a string")
        start = o.get("start", True)
        if not isinstance(start, bool):
            raise TypeError("start must be a bool")
        host_list(o, "allowed_hosts"), host_list(o, "denied_hosts")
        from .images import image_errors
        with image_errors():
            return await self._create(req, o, start)

    async def _create(self, req: Request, o: dict, start: bool):
        box = self.rt.sandbox(o.get("name"), rootfs=o.get("rootfs"), image=o.get("image"),
                              memory=o.get("memory"),
                              log_limit=o.get("log_limit"),
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
        check_fields(o, START_FIELDS, "POST /sandboxes/{name}/start")
        if box.state == "running":
            raise HttpError(409, f"sandbox {box.name} is already running")
        from .images import image_errors
        with image_errors():
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
        check_fields(o, ("signal",), "POST /sandboxes/{name}/signal")
        if "signal" not in o:
            raise TypeError("signal is required (a number 1..64 or a name like \"TERM\")")
        signo = parse_signal(o["signal"])
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

    async def port_fetch(self, req: Request, box):
        """An HTTP request to a port inside the sandbox (SPEC §3 get_tcp_port):
        {port, method?, path?, headers?, body?: base64} -> {status, headers, body: base64},
        streamed (server/fetch.py): the daemon never holds the whole body."""
        from .fetch import port_fetch
        return await port_fetch(req, box)

    async def policy(self, req: Request, box):
        o = await req.json()
        check_fields(o, POLICY_FIELDS, "PUT /sandboxes/{name}/policy")
        applied = await self._apply_policy(box, o)
        await req.reply(200, {"name": box.name, "applied": applied})

    async def _apply_policy(self, box, o: dict) -> list[str]:
        allowed = host_list(o, "allowed_hosts")
        denied = host_list(o, "denied_hosts")
        http = handler_map(o, "http_handlers")
        https = handler_map(o, "https_handlers")
        steps = []          # (field, method name, args)
        if "allowed_hosts" in o:
            steps.append(("allowed_hosts", "set_allowed_hosts", [(allowed,)]))
        if "denied_hosts" in o:
            steps.append(("denied_hosts", "set_denied_hosts", [(denied or [],)]))
        if http:
            steps.append(("http_handlers", "intercept_outbound_http", list(http.items())))
        if https:
            steps.append(("https_handlers", "intercept_outbound_https", list(https.items())))
        for field in ("intercept_https", "enable_internet"):
            if field in o and not isinstance(o[field], bool):
                raise TypeError(f"{field} must be true or false")
        catch_all = o.get("catch_all_handler")
        if "catch_all_handler" in o and not (isinstance(catch_all, str) and
                                             catch_all.startswith(("http://", "https://"))):
            raise ValueError("catch_all_handler must be an http(s):// URL")
        if "catch_all_handler" in o:
            steps.append(("catch_all_handler", "intercept_all_outbound_http", [(catch_all,)]))
        if "intercept_https" in o:
            steps.append(("intercept_https", "set_intercept_https", [(o["intercept_https"],)]))
        if "enable_internet" in o:
            steps.append(("enable_internet", "set_internet", [(o["enable_internet"],)]))
        # All or nothing: check every method exists and every target parses
        # before applying any.
        missing = [m for _, m, _ in steps if not callable(getattr(box, m, None))]
        if missing:
            raise HttpError(501, f"this build cannot apply policy: Sandbox.{missing[0]} "
                                 "is not available")
        try:
            from ..proxy.policy import parse_target
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
        check_fields(req.query, EXEC_FIELDS[:-2] + ("stderr",), "exec query")
        env = {}
        for kv in req.query.get("env", []):
            k, sep, v = kv.partition("=")
            if not sep:
                raise ValueError(f"env expects K=V, got {kv!r}")
            env[k] = v
        o = {"cmd": req.query.get("cmd"), "cwd": req.q1("cwd"), "user": req.q1("user"),
             "env": env or None, "stderr": req.q1("stderr") or "pipe"}
        return self._exec_args(o)

    async def logs(self, req: Request, box):
        """The entrypoint's log ring as NDJSON lines like exec's
        ({"stream", "data" base64}); `?follow=1` streams until the sandbox
        stops; the last line counts what the ring dropped."""
        check_fields(req.query, ("follow",), "logs query")
        follow = req.q1("follow") in ("1", "true", "yes")
        conn = req.conn
        await req.start(200, "application/x-ndjson")

        async def pump() -> None:
            async for stream, data in box.logs(follow=follow):
                payload = json.dumps({"stream": stream, "data": base64.b64encode(data).decode()})
                await conn.send(h11.Data(data=(payload + "\n").encode()))

        pumping = asyncio.ensure_future(pump())
        gone = asyncio.ensure_future(conn.watch_hangup())
        try:
            await asyncio.wait({pumping, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not pumping.done() or pumping.exception() is not None:
                conn.closed = True
                return 499
            await conn.send(h11.Data(data=(json.dumps({"dropped": box.log_dropped}) + "\n").encode()))
            await conn.send(h11.EndOfMessage())
            return 200
        finally:
            for t in (pumping, gone):
                t.cancel()
            await asyncio.gather(pumping, gone, return_exceptions=True)

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
            check_fields(o, EXEC_FIELDS, "POST /sandboxes/{name}/exec")
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
