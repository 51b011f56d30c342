"""Container: the high-level class of `@cloudflare/containers` (SPEC §6, §10 Container).

A `Container` subclass is configuration (class attributes) plus lifecycle hooks around
one `Sandbox` (`self.sandbox`). Its outbound policy is published into the sandbox as a
frozen `Policy` before the sandbox starts, and every setter publishes again at once, so
changes apply to a running container's next request, on open connections too.

Class-level handlers (`outbound`, `outbound_by_host`, `outbound_handlers`) are read from
the class dictionaries (MRO), never through the instance: a plain function stored as a
class attribute would otherwise come back as a bound method and receive `self` in place
of the request. They are called as `handler(request, ctx)`.
"""
from __future__ import annotations

import asyncio
import inspect
import re
import time
from typing import Any, Optional

from .config import check_port, check_signal
from .errors import SandboxError, SandboxNotRunning
from .log import get_logger
from .proxy.handlers import as_handler
from .proxy.models import Request, Response
from .proxy.policy import Route, Target, parse_target

__all__ = ["Container"]

log = get_logger("sandbox.container")

_HTTP = frozenset({"http"})
# How often start_and_wait_for_ports looks at the sandbox's sockets, at first and at most.
_PORT_POLL_FIRST, _PORT_POLL_MAX = 0.002, 0.05
_TCP_LISTEN = "0A"
_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*", re.I)


def _class_value(cls: type, name: str, default: Any = None) -> Any:
    """A class attribute as stored, not bound: `staticmethod`/`classmethod` unwrapped,
    a plain function left a plain function."""
    for klass in cls.__mro__:
        if name in vars(klass):
            value = vars(klass)[name]
            if isinstance(value, staticmethod):
                return value.__func__
            if isinstance(value, classmethod):
                return value.__get__(None, cls)
            return value
    return default


def _seconds(value: Any, what: str) -> Optional[float]:
    """`None`, a number of seconds, or a string like "90s", "10m", "1h", "500ms"."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{what} must be a number of seconds or None")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION.fullmatch(value)
        if not m:
            raise ValueError(f"bad duration for {what}: {value!r}")
        scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[(m.group(2) or "s").lower()]
        seconds = float(m.group(1)) * scale
    else:
        raise TypeError(f"{what} must be a number of seconds or None")
    if not seconds > 0:
        raise ValueError(f"{what} must be > 0: {value!r}")
    return seconds


def _host_list(hosts: Any, what: str) -> list[str]:
    if isinstance(hosts, (str, bytes)) or not hasattr(hosts, "__iter__"):
        raise TypeError(f"{what} must be a list of hosts")
    out = []
    for h in hosts:
        _target(h, what)
        out.append(h)
    return out


def _target(host: Any, what: str) -> Target:
    if not isinstance(host, str):
        raise TypeError(f"{what}: a host must be a str, not {type(host).__name__}")
    return parse_target(host)   # ValueError when malformed


def _listening_ports(pid: int) -> set[int]:
    """Ports with a LISTEN socket in the network namespace of `pid` (IPv4 and IPv6)."""
    ports: set[int] = set()
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                next(f, None)   # header
                for line in f:
                    fields = line.split()
                    if len(fields) > 3 and fields[3] == _TCP_LISTEN:
                        ports.add(int(fields[1].rpartition(":")[2], 16))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return ports


class Container:
    # -- configuration (SPEC §6); subclasses override ---------------------------------
    entrypoint: Optional[list[str]] = None
    image: Optional[str] = None        # SPEC §11: an image reference; None: the default rootfs
    default_port: Optional[int] = None
    env_vars: dict[str, str] = {}
    enable_internet: bool = True
    allowed_hosts: Optional[list[str]] = None
    denied_hosts: list[str] = []
    intercept_https: bool = False
    sleep_after: Any = None
    outbound: Any = None
    outbound_by_host: dict[str, Any] = {}
    outbound_handlers: dict[str, Any] = {}

    def __init__(self, runtime, name: Optional[str] = None, **sandbox_options: Any) -> None:
        cls = type(self)
        self.runtime = runtime
        if self.image is not None and "image" not in sandbox_options and "rootfs" not in sandbox_options:
            sandbox_options = {**sandbox_options, "image": self.image}
        self._sandbox_options = sandbox_options   # rootfs, image, memory, pids, cpus
        # Validate the class configuration once, here: a malformed target is a
        # ValueError when the container is made, not a silent no-match later.
        self._sleep_after = _seconds(self.sleep_after, "sleep_after")
        if self.default_port is not None:
            check_port(self.default_port)
        by_host = _class_value(cls, "outbound_by_host") or {}
        if not isinstance(by_host, dict):
            raise TypeError("outbound_by_host must be a dict of host -> handler")
        self._class_routes = tuple(
            Route(_target(host, "outbound_by_host"), self._tracked(handler), _HTTP)
            for host, handler in by_host.items())
        catch_all = _class_value(cls, "outbound")
        self._class_catch_all = self._tracked(catch_all) if catch_all is not None else None
        handlers = _class_value(cls, "outbound_handlers") or {}
        if not isinstance(handlers, dict):
            raise TypeError("outbound_handlers must be a dict of name -> handler")
        for handler in handlers.values():
            as_handler(handler)
        # Instance state: each list set on the instance replaces the class list.
        allowed = self.allowed_hosts
        self._allowed: Optional[list[str]] = None if allowed is None else _host_list(allowed, "allowed_hosts")
        self._denied: list[str] = _host_list(self.denied_hosts or [], "denied_hosts")
        self._overrides: dict[Target, tuple[str, Any]] = {}   # set_outbound_by_host(s)
        self._own_routes: tuple[Route, ...] = ()               # what we last published
        self._catch_all_name: Optional[str] = None
        self._catch_all: Any = None
        # Lifecycle.
        self._lock = asyncio.Lock()
        self._watcher: Optional[asyncio.Task] = None
        self._stop_reason: Optional[str] = None
        self._timer: Optional[asyncio.TimerHandle] = None
        self._idle_stop: Optional[asyncio.Task] = None
        self._last_activity = 0.0
        self._net_seen: Optional[tuple[int, ...]] = None
        self._busy = 0          # handler calls in flight
        self._execs: set = set()
        self.sandbox = runtime.sandbox(name, **sandbox_options)
        self.name = self.sandbox.name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.sandbox.state}>"

    # -- hooks (override) ------------------------------------------------------------
    async def on_start(self) -> None:
        pass

    async def on_stop(self, exit_code: int, reason: str) -> None:
        pass

    async def on_error(self, error: BaseException) -> None:
        log.error("container.error", container=self.name, error=repr(error))

    @property
    def running(self) -> bool:
        return self.sandbox.running

    # -- policy -------------------------------------------------------------------------
    def _tracked(self, handler: Any) -> Any:
        """The handler, called as `handler(request, ctx)`, marking the container active
        (sleep_after) while it runs."""
        fn = as_handler(handler)   # TypeError/ValueError at registration

        async def tracked(request, ctx):
            self._busy += 1
            self._touch()
            try:
                result = fn(request, ctx)
                if inspect.isawaitable(result):
                    result = await result
                return result
            finally:
                self._busy -= 1
                self._touch()
        tracked.__qualname__ = getattr(fn, "__qualname__", "handler")
        tracked.handler = handler   # type: ignore[attr-defined]
        return tracked

    def _publish_routes(self) -> None:
        """Instance per-host overrides go into the sandbox's `routes`, next to whatever
        was registered on the sandbox directly (intercept_outbound_http)."""
        box = self.sandbox
        ours = tuple(Route(t, h, _HTTP) for t, (_, h) in self._overrides.items())
        own = set(map(id, self._own_routes))
        keep = tuple(r for r in box.policy.routes
                     if id(r) not in own and not (r.target in self._overrides and "http" in r.schemes))
        box._publish(routes=keep + ours)
        self._own_routes = ours

    def _publish_all(self) -> None:
        box = self.sandbox
        box._publish(class_routes=self._class_routes, class_catch_all=self._class_catch_all,
                     intercept_https=bool(self.intercept_https))
        self._publish_lists()
        self._publish_routes()
        if self._catch_all is not None:
            box._publish(catch_all=self._catch_all)

    def _publish_lists(self) -> None:
        self.sandbox._set_host_lists(self._allowed, self._denied)

    def _named(self, name: Any) -> Any:
        if not isinstance(name, str):
            raise TypeError(f"handler name must be a str, not {type(name).__name__}")
        handlers = _class_value(type(self), "outbound_handlers") or {}
        if name not in handlers:
            raise ValueError(f"no outbound handler named {name!r} in outbound_handlers")
        return handlers[name]

    def set_outbound_by_host(self, host: str, handler_name: str) -> None:
        """Requests to `host` go to `outbound_handlers[handler_name]` (ValueError for an
        unknown name); beats the class `outbound_by_host` for that host."""
        t = _target(host, "outbound_by_host")
        self._overrides[t] = (handler_name, self._tracked(self._named(handler_name)))
        self._publish_routes()

    def set_outbound_by_hosts(self, mapping: dict) -> None:
        """Replaces every instance per-host handler at once (as Cloudflare's
        setOutboundByHosts); the class `outbound_by_host` stays underneath."""
        if not isinstance(mapping, dict):
            raise TypeError("set_outbound_by_hosts takes a dict of host -> handler name")
        new = {_target(host, "outbound_by_host"): (name, self._tracked(self._named(name)))
               for host, name in mapping.items()}
        self._overrides = new
        self._publish_routes()

    def remove_outbound_by_host(self, host: str) -> None:
        t = _target(host, "outbound_by_host")
        if self._overrides.pop(t, None) is not None:
            self._publish_routes()

    def set_outbound_handler(self, name: Optional[str]) -> None:
        """The instance catch-all, by name in `outbound_handlers`; None removes it."""
        if name is None:
            self._catch_all_name = self._catch_all = None
        else:
            self._catch_all = self._tracked(self._named(name))
            self._catch_all_name = name
        self.sandbox._publish(catch_all=self._catch_all)

    def set_allowed_hosts(self, hosts: Optional[list[str]]) -> None:
        self._allowed = None if hosts is None else _host_list(hosts, "allowed_hosts")
        self._publish_lists()

    def set_denied_hosts(self, hosts: list[str]) -> None:
        self._denied = _host_list(hosts or [], "denied_hosts")
        self._publish_lists()

    def allow_host(self, host: str) -> None:
        t = _target(host, "allowed_hosts")
        current = self._allowed or []
        if all(parse_target(h) != t for h in current):
            self._allowed = [*current, host]
            self._publish_lists()
        elif self._allowed is None:
            self._allowed = current
            self._publish_lists()

    def deny_host(self, host: str) -> None:
        t = _target(host, "denied_hosts")
        if all(parse_target(h) != t for h in self._denied):
            self._denied = [*self._denied, host]
            self._publish_lists()

    def remove_allowed_host(self, host: str) -> None:
        t = _target(host, "allowed_hosts")
        if self._allowed is not None:
            self._allowed = [h for h in self._allowed if parse_target(h) != t]
            self._publish_lists()

    def remove_denied_host(self, host: str) -> None:
        t = _target(host, "denied_hosts")
        self._denied = [h for h in self._denied if parse_target(h) != t]
        self._publish_lists()

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Start the container (no-op when it runs): policy first, then the sandbox,
        then `on_start`."""
        async with self._lock:
            await self._start_locked()

    async def _start_locked(self) -> None:
        if self.sandbox.running:
            return
        if self._watcher is not None and not self._watcher.done():
            await asyncio.shield(self._watcher)   # the previous run's on_stop first
        if self.sandbox._destroying:
            # destroy() freed the name: a new sandbox under it, as Cloudflare starts a
            # fresh container after a destroy.
            self.sandbox = self.runtime.sandbox(self.name, **self._sandbox_options)
            self._own_routes = ()
        self._publish_all()   # before the start: the first request already sees it
        self._stop_reason = None
        box = self.sandbox
        try:
            await box.start(env=dict(self.env_vars or {}), entrypoint=self.entrypoint,
                            enable_internet=bool(self.enable_internet))
        except BaseException as e:
            if isinstance(e, Exception):
                await self._report(e)
            raise
        outcome = box._outcome_future()
        self._watcher = asyncio.ensure_future(self._watch(box, outcome))
        self._touch()
        self._net_seen = self._net_counters()
        self._arm()
        try:
            await self.on_start()
        except Exception as e:
            await self._report(e)
            raise

    async def start_and_wait_for_ports(self, ports: Any = None, timeout: float = 30.0) -> None:
        """Start, then wait until every port has a LISTEN socket in the sandbox's netns
        (`default_port` when `ports` is None). TimeoutError after `timeout` seconds."""
        if ports is None:
            ports = [] if self.default_port is None else [self.default_port]
        elif isinstance(ports, int):
            ports = [ports]
        ports = list(ports)
        for p in ports:
            check_port(p)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError("timeout must be a positive number of seconds")
        async with asyncio.timeout(timeout):
            await self.start()
            await self._wait_listening(set(ports))

    async def _wait_listening(self, ports: set[int]) -> None:
        # The kernel has no notification for "a socket entered LISTEN" that we could
        # wait on (sock_diag multicasts only socket destruction; /proc/net cannot be
        # watched with inotify), so this is a bounded loop of short waits, reading the
        # sandbox's own /proc/<pid>/net/tcp{,6}, ended by the caller's timeout.
        delay = _PORT_POLL_FIRST
        box = self.sandbox
        while True:
            if not box.running:
                raise SandboxNotRunning(f"container {self.name} stopped before listening on {sorted(ports)}")
            # Off the loop: the sandbox decides how many sockets this lists
            # (20k listeners: 140 ms of parsing), and must not stall us.
            missing = ports - await asyncio.to_thread(_listening_ports, box.pid)
            if not missing:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, _PORT_POLL_MAX)

    async def stop(self, signal: int = 15, *, timeout: Optional[float] = None) -> None:
        """Send `signal` to the entrypoint and wait for the exit (and `on_stop`).
        With `timeout`, SIGKILL after that many seconds."""
        await self._stop(check_signal(signal), "signal", timeout)

    async def _stop(self, signo: int, reason: str, timeout: Optional[float]) -> None:
        watcher = self._watcher
        if not self.sandbox.running or watcher is None:
            return
        if self._stop_reason is None:
            self._stop_reason = reason
        self.sandbox.signal(signo)
        if watcher is asyncio.current_task():
            return   # stop() from on_stop: the exit is being handled already
        try:
            await asyncio.wait_for(asyncio.shield(watcher), timeout)
        except TimeoutError:
            self.sandbox.signal(9)
            await asyncio.shield(watcher)

    async def destroy(self) -> None:
        """Kill everything and remove the sandbox; `on_stop(..., "destroyed")` runs
        before this returns. A later start() makes a fresh sandbox."""
        self._disarm()
        box = self.sandbox
        await box.destroy()
        watcher = self._watcher
        if watcher is not None and watcher is not asyncio.current_task():
            await asyncio.shield(watcher)
        # Release this sandbox's synthetic DNS names.
        box._publish(routes=(), class_routes=())
        self._own_routes = ()

    async def _watch(self, box, outcome: asyncio.Future) -> None:
        code, destroyed, _msg = await asyncio.shield(outcome)
        self._disarm()
        reason = "destroyed" if destroyed else (self._stop_reason or "exit")
        log.info("container.stop", container=self.name, exit_code=code, reason=reason)
        try:
            await self.on_stop(code, reason)
        except Exception as e:
            await self._report(e)

    async def _report(self, error: BaseException) -> None:
        try:
            await self.on_error(error)
        except Exception as e:   # an on_error that fails is only logged
            log.error("container.on_error_failed", container=self.name, error=repr(e))

    # -- sleep_after ----------------------------------------------------------------------
    def _touch(self) -> None:
        self._last_activity = time.monotonic()

    def _net_counters(self) -> Optional[tuple[int, ...]]:
        """Packets through the sandbox's veth: every proxied request (handler, egress or
        denied) crosses it, so a change means outbound activity."""
        res = self.sandbox._res
        if res is None or res.net is None:
            return None
        out = []
        for stat in ("rx_packets", "tx_packets"):
            try:
                with open(f"/sys/class/net/{res.net.ifname}/statistics/{stat}") as f:
                    out.append(int(f.read()))
            except OSError:
                return None
        return tuple(out)

    def _arm(self) -> None:
        if self._sleep_after is None or self._timer is not None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, self._last_activity + self._sleep_after - time.monotonic())
        self._timer = loop.call_later(delay, self._on_timer)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if not self.sandbox.running or self._stop_reason is not None:
            return
        seen = self._net_counters()
        if seen != self._net_seen:
            self._net_seen = seen
            self._touch()
        if self._busy or any(not p.exit_code.done() for p in self._execs):
            self._touch()
        if time.monotonic() < self._last_activity + self._sleep_after:
            self._arm()
            return
        self._idle_stop = asyncio.ensure_future(self._sleep())

    async def _sleep(self) -> None:
        log.info("container.sleep_after", container=self.name, idle=self._sleep_after)
        try:
            await self._stop(15, "sleep_after", None)
        except Exception as e:
            await self._report(e)

    # -- traffic in ---------------------------------------------------------------------------
    async def exec(self, cmd, **kwargs: Any):
        """As `Sandbox.exec`; a running exec keeps the container awake."""
        self._touch()
        proc = await self.sandbox.exec(cmd, **kwargs)
        self._execs.add(proc)

        def done(_fut, proc=proc):
            self._execs.discard(proc)
            self._touch()
        proc.exit_code.add_done_callback(done)
        return proc

    async def fetch(self, request_or_url: Any = "/", *, method: str = "GET", headers=None,
                    body=None) -> Response:
        """A request to `default_port` inside the container, starting it if needed."""
        if self.default_port is None:
            raise SandboxError(f"{type(self).__name__} has no default_port to fetch from")
        self._touch()
        if not self.sandbox.running:
            await self.start_and_wait_for_ports()
        port = self.sandbox.get_tcp_port(self.default_port)
        self._busy += 1
        try:
            if isinstance(request_or_url, Request):
                r = request_or_url
                if method != "GET" or headers is not None or body is not None:
                    raise TypeError("pass method/headers/body in the Request, not next to it")
                return await port.fetch(r.url, method=r.method, headers=r.headers, body=r.body)
            if not isinstance(request_or_url, str):
                raise TypeError(f"fetch() takes a Request or a URL str, not {type(request_or_url).__name__}")
            return await port.fetch(request_or_url, method=method, headers=headers, body=body)
        finally:
            self._busy -= 1
            self._touch()
