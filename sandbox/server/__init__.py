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

Parts: `http` (h11 plumbing: `Conn`, `Request`, `HttpError`),
`views` (argument checks, JSON views, error statuses) and `api`
(routing and the endpoint handlers, mixed into `Server`).  This module is the
daemon: the socket, the connection loop, and `serve`.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal as _signal
import socket
import stat
import time

import h11

from ..log import get_logger
# Re-exported: these names were all defined here before the split, and
# `sandbox.server.<name>` keeps working.
from .api import (CREATE_FIELDS, EXEC_FIELDS, POLICY_FIELDS,  # noqa: F401
                         START_FIELDS, Endpoints)
from .http import (MAX_JSON, READ_SIZE, SERVER_NAME, Conn, HttpError,  # noqa: F401
                          Request, reason_phrase)
from .views import details, error_status, summary  # noqa: F401

log = get_logger("sandbox.server")
CLOSE_TIMEOUT = 5.0     # seconds a closing connection may take to flush what it holds


class BadArgument(Exception):
    """A bad `serve` argument (the CLI reports it as a usage error)."""


class ServerBusy(Exception):
    """Another live server already listens on the socket."""


# -- the server ----------------------------------------------------------------

class Server(Endpoints):
    """The daemon: socket, connections and dispatch; the handlers come from `Endpoints`."""

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
                                reason=reason_phrase(e.error_status_hint),
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
                # A client that stopped reading would keep a graceful close (and the
                # shutdown waiting for it) pending forever: bounded, then aborted.
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await writer.wait_closed()
            except TimeoutError:
                writer.transport.abort()
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


async def serve(state_dir: str, socket_path: str, resolver: str | None = None,
                ready=None, **runtime_options) -> None:
    """Runs until SIGTERM/SIGINT; then destroys every sandbox and removes the socket."""
    from ..runtime import Runtime
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    try:
        rt = Runtime(state_dir=state_dir, resolver=resolver, **runtime_options)
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
