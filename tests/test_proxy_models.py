"""Request / Response / Headers (SPEC §10 "Request and Response")."""

import asyncio
import contextlib

import pytest

from sandbox.proxy.models import Headers, Request, Response

pytestmark = pytest.mark.timeout(30)


def run(coro):
    return asyncio.run(coro)


async def agen(*chunks):
    for c in chunks:
        yield c


def test_headers_case_insensitive_multi_ordered():
    h = Headers([("Content-Type", "text/plain"), ("Set-Cookie", "a=1"), ("set-cookie", "b=2")])
    assert h["content-type"] == "text/plain"
    assert h["SET-COOKIE"] == "a=1, b=2"
    assert h.get_all("Set-Cookie") == ["a=1", "b=2"]
    assert list(h) == ["Content-Type", "Set-Cookie"]
    assert len(h) == 2
    assert "CONTENT-TYPE" in h and "x" not in h and 1 not in h
    h["set-cookie"] = "c=3"
    assert h.raw_items() == [("Content-Type", "text/plain"), ("set-cookie", "c=3")]
    h.add("X-A", "1")
    del h["content-type"]
    assert h.raw_items() == [("set-cookie", "c=3"), ("X-A", "1")]
    with pytest.raises(KeyError):
        del h["nope"]
    with pytest.raises(KeyError):
        h["nope"]
    assert h.get("nope") is None
    assert Headers({"A": "1"}) == Headers([("a", "1")]) == {"a": "1"}
    assert Headers(Headers({"A": "1"})).raw_items() == [("A", "1")]


@pytest.mark.parametrize("bad, exc", [
    ([("Bad Name", "v")], ValueError), ([("", "v")], ValueError), ([("X", "a\r\nB: c")], ValueError),
    ([("X", 1)], TypeError), ("ab", TypeError), ([("only-one",)], TypeError), ([("X", "a\0")], ValueError),
])
def test_headers_validation(bad, exc):
    with pytest.raises(exc):
        Headers(bad)


def test_request_basics():
    async def main():
        r = Request("post", "http://example.com/a?b=1", {"X": "1"}, '{"k": [1]}')
        assert r.method == "POST" and r.url == "http://example.com/a?b=1"
        assert r.headers["content-type"].startswith("text/plain")
        assert await r.json() == {"k": [1]}
        assert await r.text() == '{"k": [1]}'
        assert [c async for c in r.body] == [b'{"k": [1]}']
        assert [c async for c in r.body] == [b'{"k": [1]}']  # bytes bodies replay
        r2 = Request("GET", "https://[::1]:8443/")
        assert await r2.read() == b"" and r2.body_length == 0
    run(main())


def test_streaming_body_one_pass_and_read_caches():
    async def main():
        r = Request("PUT", "http://h/", body=agen(b"a", b"", bytearray(b"b")))
        assert r.body_length is None
        assert [c async for c in r.body] == [b"a", b"b"]
        with pytest.raises(TypeError):
            [c async for c in r.body]
        r = Request("PUT", "http://h/", body=agen(b"x", b"y"))
        assert await r.read() == b"xy"
        assert await r.read() == b"xy"
        assert [c async for c in r.body] == [b"xy"]
        bad = Response(agen("str"))
        with pytest.raises(TypeError):
            await bad.read()
    run(main())


@pytest.mark.parametrize("args, exc", [
    (("GET", "/relative"), ValueError), (("GET", "ftp://h/"), ValueError), (("GET", "http:///x"), ValueError),
    (("G T", "http://h/"), ValueError), ((1, "http://h/"), TypeError), (("GET", b"http://h/"), TypeError),
    (("GET", "http://h/a b"), ValueError), (("GET", "http://h/", None, 5), TypeError),
])
def test_request_validation(args, exc):
    with pytest.raises(exc):
        Request(*args)


def test_response():
    async def main():
        r = Response()
        assert (r.status, await r.read()) == (200, b"")
        r = Response("hé", status=404, headers={"X": "y"})
        assert (r.status, await r.text(), r.headers["x"]) == (404, "hé", "y")
        r = Response(agen(b"[1,", b"2]"))
        assert await r.json() == [1, 2]
        for bad, exc in [("200", TypeError), (True, TypeError), (99, ValueError), (600, ValueError), (101, ValueError)]:
            with pytest.raises(exc):
                Response(status=bad)
        with pytest.raises(TypeError):
            Response(123)
    run(main())


def test_abandoned_stream_is_closed_at_once():
    closed = []

    async def source():
        try:
            for i in range(10):
                yield b"x%d" % i
        finally:
            closed.append(True)

    async def main():
        r = Response(source())
        async with contextlib.aclosing(r.body) as body:
            async for chunk in body:
                assert chunk == b"x0"
                break
        assert closed == [True]
    run(main())
