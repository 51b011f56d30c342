"""Container (SPEC §6, §10 Container): class configuration, the precedence order of
SPEC §5 with every level, live setters, hooks and their reasons, readiness, fetch,
sleep_after. Fake upstreams only (see test_outbound)."""
from __future__ import annotations

import asyncio
import json
import secrets
import time

import pytest

import sandbox
from sandbox import Container, Request, Response

from helpers import run
from test_outbound import CF_CA_FILE, Inside, Upstream, inside_once, runtime, text

pytestmark = pytest.mark.timeout(60)


def who(name):
    """A handler that says its name; a plain function, as a class attribute."""
    async def handler(request, ctx):
        assert isinstance(request, Request) and isinstance(ctx.sandbox_id, str)
        return Response(name)
    return handler


class Recorder(Container):
    """Records hook calls in `events`."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.events = []
        self.stopped = asyncio.Event()

    async def on_start(self):
        self.events.append(("start",))

    async def on_stop(self, exit_code, reason):
        self.events.append(("stop", exit_code, reason))
        self.stopped.set()

    async def on_error(self, error):
        self.events.append(("error", repr(error)))


@run
async def test_class_handlers_are_never_bound_and_on_start_execs(tmp_path):
    seen = []

    async def kv(request, ctx):          # plain functions stored on the class
        seen.append(("kv", type(request).__name__, ctx.sandbox_id))
        return Response("kv:" + request.url.rsplit("/", 1)[1])

    async def catch_all(request, ctx):
        seen.append(("all", type(request).__name__, ctx.sandbox_id))
        return Response("caught")

    class Web(Recorder):
        env_vars = {"MODE": "test"}
        enable_internet = False

        async def on_start(self):
            await super().on_start()
            out = await (await self.exec(["sh", "-c", "echo $MODE > /tmp/prepared"])).output()
            assert out.exit_code == 0

    Web.outbound = catch_all
    Web.outbound_by_host = {"my.kv": kv}

    async with runtime(tmp_path) as rt:
        web = Web(rt, "web")
        assert web.sandbox.name == "web" and web.sandbox.state == "created"
        await web.start()
        assert web.events == [("start",)]
        out = await (await web.exec(["cat", "/tmp/prepared"])).output()
        assert out.stdout == b"test\n"
        async with Inside(web) as c:
            assert (await c.get("my.kv", "/k1"))["body"] == "kv:k1"
            assert (await c.get("10.215.0.9", "/"))["body"] == "caught"
        assert seen == [("kv", "Request", web.sandbox.id), ("all", "Request", web.sandbox.id)]
        await web.destroy()
        assert web.events[-1] == ("stop", 137, "destroyed")


@run
async def test_precedence_each_level_beats_the_next(tmp_path):
    """denied > allowed > instance by-host > class by-host > instance catch-all >
    class catch-all > egress (allowed or internet) > 'no internet'."""

    class P(Container):
        enable_internet = False
        outbound_handlers = {"inst_host": who("inst_host"), "inst_all": who("inst_all")}

    P.outbound_by_host = {"h.test": who("class_host"), "both.test": who("class_host")}
    P.outbound = who("class_all")

    async with Upstream(tmp_path) as up, runtime(tmp_path, up) as rt:
        p = P(rt)
        await p.start()

        async def say(host):
            r = await inside_once(p, up.ip, headers={"Host": host})
            return "upstream" if r["status"] == 200 and "upstream" in r["body"] else r["body"]

        # 6. class catch-all beats egress/no-internet.
        assert await say("other.test") == "class_all"
        # 4. class by-host beats class catch-all.
        assert await say("h.test") == "class_host"
        # 5. instance catch-all beats class catch-all, not class by-host.
        p.set_outbound_handler("inst_all")
        assert await say("other.test") == "inst_all"
        assert await say("h.test") == "class_host"
        # 3. instance by-host beats class by-host.
        p.set_outbound_by_host("h.test", "inst_host")
        assert await say("h.test") == "inst_host"
        assert await say("both.test") == "class_host"
        # 2. allowed_hosts beats every handler: handlers are not implicitly allowed.
        p.set_allowed_hosts(["both.test", "free.test"])
        assert await say("h.test") == "denied by allowed_hosts: h.test"
        assert await say("both.test") == "class_host"
        # 1. denied beats allowed.
        p.deny_host("both.test")
        assert await say("both.test") == "denied by denied_hosts: both.test"
        # 7. no handler at all: egress when allowed, else 'no internet'.
        p.set_outbound_handler(None)
        P_outbound = P.outbound
        p.sandbox._publish(class_catch_all=None)
        assert await say("free.test") == "upstream"
        p.set_allowed_hosts(None)
        assert await say("nowhere.test") == "denied by no internet: nowhere.test"
        p.sandbox.set_internet(True)
        assert await say("nowhere.test") == "upstream"
        assert P.outbound is P_outbound
        assert [q["headers"]["host"] for q in up.requests] == ["free.test", "nowhere.test"]
        await p.destroy()


@run
async def test_live_setters_on_a_running_container(tmp_path):
    class C(Container):
        enable_internet = False
        outbound_handlers = {"a": who("a"), "b": who("b")}

    C.outbound_by_host = {"svc.test": who("class")}

    async with runtime(tmp_path) as rt:
        c = C(rt)
        with pytest.raises(ValueError):
            c.set_outbound_by_host("x.test", "nope")
        with pytest.raises(ValueError):
            c.set_outbound_by_host("bad host", "a")
        with pytest.raises(ValueError):
            c.set_outbound_handler("nope")
        with pytest.raises(ValueError):
            c.allow_host("[::1")
        await c.start()
        async with Inside(c) as cl:
            r0 = await cl.get("svc.test")
            c.set_outbound_by_host("svc.test", "a")          # same keep-alive connection
            r1 = await cl.get("svc.test")
            c.set_outbound_by_hosts({"svc.test": "b", "new.test": "a"})
            r2 = await cl.get("svc.test")
            r3 = await cl.get("new.test", new=True)         # the name resolves now
            c.remove_outbound_by_host("svc.test")           # the class handler again
            r4 = await cl.get("svc.test")
            c.set_outbound_by_hosts({})
        assert [r["body"] for r in (r0, r1, r2, r3, r4)] == ["class", "a", "b", "a", "class"]
        assert r0["lport"] == r1["lport"] == r2["lport"] == r4["lport"]
        # allow/deny lists, live.
        c.allow_host("svc.test")
        assert (await inside_once(c, "svc.test"))["body"] == "class"
        c.remove_allowed_host("svc.test")
        assert (await inside_once(c, "svc.test"))["body"] == "denied by allowed_hosts: svc.test"
        c.set_allowed_hosts(None)
        c.deny_host("svc.test")
        assert (await inside_once(c, "svc.test"))["status"] == 403
        c.remove_denied_host("svc.test")
        c.set_denied_hosts([])
        assert (await inside_once(c, "svc.test"))["body"] == "class"
        await c.destroy()


@run
async def test_credential_injection_with_named_handler(tmp_path):
    """outboundHandlers + setOutboundByHost: the orchestrator decides at run time which
    hosts get credentials; the secret stays outside."""
    secret = "tok_" + secrets.token_hex(12)

    async with Upstream(tmp_path) as up, runtime(tmp_path, up) as rt:
        async def github(request, ctx):
            headers = request.headers.copy()
            headers["Authorization"] = f"token {secret}"
            path = request.url.split("/", 3)[3]
            return await sandbox.fetch(Request(request.method, f"http://{up.ip}/{path}", headers,
                                               await request.read()))

        class Agent(Container):
            enable_internet = False
            allowed_hosts = ["api.github.test"]
            outbound_handlers = {"github": github}

        a = Agent(rt)
        await a.start()
        # No handler yet: allowed, egress to the real place (no DNS answer for it
        # here, so straight to the upstream's IP with the Host header).
        r = await inside_once(a, up.ip, "/user", headers={"Host": "api.github.test"})
        assert json.loads(r["body"])["authorized"] is False
        a.set_outbound_by_host("api.github.test", "github")
        r = await inside_once(a, "api.github.test", "/user")
        assert json.loads(r["body"]) | {"seen_headers": None} == {
            "upstream": True, "method": "GET", "path": "/user", "host": "api.github.test", "body": "",
            "authorized": True, "seen_headers": None}
        assert up.requests[-1]["headers"]["authorization"] == f"token {secret}"
        out = await (await a.exec(["sh", "-c", f"cat /proc/[0-9]*/environ | grep -c {secret};"
                                               f"grep -rsl {secret} /etc /tmp /root /workspace; true"])).output()
        assert out.stdout.split() == [b"0"]
        await a.destroy()


@run
async def test_intercept_https_class_attribute(tmp_path):
    class S(Container):
        intercept_https = True
        enable_internet = False

    S.outbound_by_host = {"api.test": who("https-handled")}
    async with runtime(tmp_path) as rt:
        s = S(rt)
        await s.start()
        r = await inside_once(s, "api.test", "/", tls=True, cafile=CF_CA_FILE)
        assert (r["status"], r["body"]) == (200, "https-handled")
        await s.destroy()


# -- lifecycle ---------------------------------------------------------------------------
@run
async def test_on_stop_reasons_exit_signal_destroyed(tmp_path):
    class Exits(Recorder):
        entrypoint = ["sh", "-c", "sleep 0.2; exit 3"]

    class Sleeps(Recorder):
        entrypoint = ["sleep", "1000"]

    async with runtime(tmp_path) as rt:
        e = Exits(rt)
        await e.start()
        await asyncio.wait_for(e.stopped.wait(), 10)
        assert e.events == [("start",), ("stop", 3, "exit")]

        s = Sleeps(rt)
        await s.start()
        await s.stop()               # waits for the exit and on_stop
        assert s.events == [("start",), ("stop", 143, "signal")]
        assert not s.running
        await s.stop()               # not running: nothing happens
        # A restart after a stop is a new run, with its own hooks.
        await s.start()
        await s.destroy()
        assert s.events[-2:] == [("start",), ("stop", 137, "destroyed")]
        # After destroy, start() makes a fresh sandbox under the same name.
        await s.start()
        assert s.running and s.sandbox.state == "running"
        await s.stop(9)
        assert s.events[-1] == ("stop", 137, "signal")
        with pytest.raises(ValueError):
            await s.stop(0)


@run
async def test_entrypoint_exit_code_zero(tmp_path):
    class Once(Recorder):
        entrypoint = ["true"]

    async with runtime(tmp_path) as rt:
        o = Once(rt)
        await o.start()
        await asyncio.wait_for(o.stopped.wait(), 10)
        assert o.events == [("start",), ("stop", 0, "exit")]


@run
async def test_start_failure_calls_on_error(tmp_path):
    class Broken(Recorder):
        entrypoint = ["/no/such/binary"]

    async with runtime(tmp_path) as rt:
        b = Broken(rt)
        with pytest.raises(sandbox.ExecError):
            await b.start()
        assert b.events and b.events[0][0] == "error"


@run
async def test_sleep_after_stops_idle_and_activity_resets_it(tmp_path):
    class Idle(Recorder):
        sleep_after = 0.6
        enable_internet = False

    Idle.outbound_by_host = {"svc.test": who("svc")}
    async with runtime(tmp_path) as rt:
        i = Idle(rt)
        t0 = time.monotonic()
        await i.start()
        # Activity for ~1.5 s (2.5 x sleep_after): proxied requests and execs.
        async with Inside(i) as c:
            for _ in range(6):
                assert (await c.get("svc.test"))["body"] == "svc"
                await asyncio.sleep(0.25)
        assert i.running, i.events
        last = time.monotonic()
        await asyncio.wait_for(i.stopped.wait(), 10)
        idle = time.monotonic() - last
        assert i.events[-1] == ("stop", 143, "sleep_after")
        assert 0.5 <= idle < 3.0, idle
        assert time.monotonic() - t0 > 1.5
        # A long exec keeps it awake.
        await i.start()
        proc = await i.exec(["sleep", "1.2"])
        await asyncio.sleep(0.9)
        assert i.running
        await proc.exit_code
        await asyncio.wait_for(i.stopped.wait(), 10)


@run
async def test_start_and_wait_for_ports_and_fetch(tmp_path):
    class Web(Recorder):
        entrypoint = ["python3", "-c", "import time, http.server as h; time.sleep(0.3); "
                      "h.HTTPServer(('127.0.0.1', 8080), h.SimpleHTTPRequestHandler).serve_forever()"]
        default_port = 8080

    class NeverListens(Container):
        entrypoint = ["sleep", "100"]
        default_port = 8081

    async with runtime(tmp_path) as rt:
        w = Web(rt)
        # fetch starts the container and waits for its port.
        r = await w.fetch("/etc/hostname")
        assert r.status == 200 and (await r.text()).strip() == w.sandbox.name
        assert w.events == [("start",)]
        r = await w.fetch(Request("GET", "http://anything/etc/passwd"))
        assert b"root:x:0:0" in await r.read()
        await w.stop()
        await w.start_and_wait_for_ports(8080, timeout=20)
        r = await w.fetch("http://localhost/")
        assert r.status == 200
        await w.destroy()

        n = NeverListens(rt)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            await n.start_and_wait_for_ports(timeout=0.5)
        assert time.monotonic() - t0 < 2
        assert n.running
        with pytest.raises(ValueError):
            await n.start_and_wait_for_ports([0])
        await n.destroy()

        class NoPort(Container):
            pass
        with pytest.raises(sandbox.SandboxError):
            await NoPort(rt).fetch("/")


@run
async def test_bad_class_configuration_is_refused(tmp_path):
    class BadTarget(Container):
        pass
    BadTarget.outbound_by_host = {"[2001:db8::1": who("x")}

    class BadHandler(Container):
        outbound = 42

    class BadSleep(Container):
        sleep_after = -1

    async with runtime(tmp_path) as rt:
        with pytest.raises(ValueError):
            BadTarget(rt)
        with pytest.raises(TypeError):
            BadHandler(rt)
        with pytest.raises(ValueError):
            BadSleep(rt)
        for name in list(rt._sandboxes):
            await rt._sandboxes[name].destroy()
