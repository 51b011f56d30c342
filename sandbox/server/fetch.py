"""`POST /sandboxes/{name}/fetch` of `sandbox serve`, streamed (docs/api.md).

The answer keeps its documented shape — one JSON object `{"status", "headers", "body"}`
with the body in base64 — but is produced as it arrives: the head is written once the
server inside answered, then the body is base64-encoded chunk by chunk (3-byte aligned,
so the pieces concatenate to one valid base64 string) into a chunked HTTP response.
The daemon holds at most one chunk of it, whatever the body's size: a sandbox's output
volume is hostile input (SPEC §9) and must not grow the daemon (issue 8, finding 11:
a 400 MiB body made a 2.6 GB daemon).

What is still buffered is bounded: the request (JSON, at most `MAX_JSON`), the response
head (h11's 16 KiB limit), and one body chunk. A client that hangs up ends the fetch.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json

import h11

from ..proxy.client import ClientConnection
from ..proxy.models import Request
from .http import HttpError
from .http import Request as ApiRequest
from .views import check_fields

__all__ = ["port_fetch"]

FIELDS = ("port", "method", "path", "headers", "body")


def _request(o: dict, port: int) -> Request:
    path = o.get("path", "/")
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError("path must be a str starting with '/'")
    headers = o.get("headers") or {}
    if not isinstance(headers, dict):
        raise TypeError("headers must be an object")
    body = None
    if o.get("body"):
        if not isinstance(o["body"], str):
            raise TypeError("body must be base64 text or null")
        try:
            body = base64.b64decode(o["body"], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("body is not valid base64") from None
    return Request(str(o.get("method", "GET")), f"http://127.0.0.1:{port}{path}", headers, body)


async def port_fetch(req: ApiRequest, box) -> int:
    o = await req.json()            # bounded by MAX_JSON
    check_fields(o, FIELDS, "POST /sandboxes/{name}/fetch")
    port = o.get("port")
    tcp = box.get_tcp_port(port)    # ValueError (400) for a bad port
    request = _request(o, port)
    conn = req.conn
    work = asyncio.ensure_future(_relay(req, tcp, request, port, box.name))
    gone = asyncio.ensure_future(conn.watch_hangup())
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            conn.closed = True      # the client left: so does the fetch
            return 499
        return work.result()
    finally:
        for t in (work, gone):
            t.cancel()
        await asyncio.gather(work, gone, return_exceptions=True)


async def _relay(req: ApiRequest, tcp, request: Request, port: int, name: str) -> int:
    try:
        reader, writer = await tcp.connect()
    except ConnectionRefusedError:
        raise HttpError(502, f"nothing listens on port {port} inside {name}") from None
    upstream = ClientConnection(reader, writer)
    try:
        resp = await upstream.send(request)
        head = json.dumps({"status": resp.status, "headers": dict(resp.headers.raw_items())})
        await req.start(200, "application/json")       # no length: chunked
        await req.conn.send(h11.Data(data=(head[:-1] + ', "body": "').encode()))
        carry = b""
        async for chunk in resp.body:
            data = carry + chunk if carry else chunk
            cut = len(data) - len(data) % 3
            if cut:
                await req.conn.send(h11.Data(data=base64.b64encode(data[:cut])))
            carry = data[cut:]
        await req.conn.send(h11.Data(data=base64.b64encode(carry) + b'"}\n'))
        await req.conn.send(h11.EndOfMessage())
        return 200
    finally:
        await upstream.aclose()
