"""Reach-in to a sandbox's TCP ports without exposing anything on the host:
the socket is created by a short-lived thread inside the sandbox's netns (a
socket's netns is fixed at creation) and then used from the event loop."""
from __future__ import annotations

import asyncio
import socket

from .errors import SandboxNotRunning
from .proxy.client import ClientConnection
from .proxy.models import Request, Response

BUFFER_LIMIT = 1 << 20   # a fetched body larger than this is streamed, not buffered


class TcpPort:
    def __init__(self, box, port: int):
        self._box = box
        self.port = port

    def _socket(self) -> socket.socket:
        res = self._box._res
        if res is None or res.net is None or not self._box.running:
            raise SandboxNotRunning(f"sandbox {self._box.name} is not running")
        return res.net.ns.run_in(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC))

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock = self._socket()
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
            return await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise

    async def fetch(self, url: str = "/", method: str = "GET", headers=None, body=None) -> Response:
        if isinstance(url, Request):
            request = url
        else:
            if url.startswith("/"):
                url = f"http://127.0.0.1:{self.port}{url}"
            request = Request(method, url, headers=headers, body=body)
        reader, writer = await self.connect()
        conn = ClientConnection(reader, writer)
        try:
            resp = await conn.send(request)
            # The body is the sandbox's output (hostile volume, SPEC §9): a small one is
            # read whole (and the connection closed), a larger one is streamed — the
            # runtime never holds more than BUFFER_LIMIT of it unless the caller reads it.
            body = aiter(resp.body)
            parts, size = [], 0
            async for chunk in body:
                parts.append(chunk)
                size += len(chunk)
                if size > BUFFER_LIMIT:
                    break
            else:
                await conn.aclose()
                return Response(b"".join(parts), status=resp.status, headers=resp.headers)
        except BaseException:
            await conn.aclose()
            raise
        return Response(_rest(parts, body, conn), status=resp.status, headers=resp.headers)


async def _rest(head: list[bytes], body, conn: ClientConnection):
    try:
        for chunk in head:
            yield chunk
        async for chunk in body:
            yield chunk
    finally:
        await conn.aclose()
