"""Handler forms (SPEC §3) reduced to one calling convention: `await fn(request, ctx)`.

A handler is an object with `async fetch(request)`, an async callable
`handler(request, ctx)`, or a URL string `"http://host:port"` to which the request is
forwarded with `X-Sandbox-Id` and `X-Original-Url`.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from .client import fetch
from .models import Headers, Request, Response
from .wire import normalize_path, strip_runtime_headers

__all__ = ["Context", "HandlerFn", "UrlHandler", "as_handler", "call_handler"]


@dataclass(frozen=True)
class Context:
    """Passed to `handler(request, ctx)`: which sandbox the request came from."""

    sandbox_id: str


HandlerFn = Callable[[Request, Context], Awaitable[Response]]


class UrlHandler:
    """Forwards to an orchestrator written in any language, over plain HTTP(S)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"handler URL must be http(s)://host[:port]: {url!r}")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError(f"handler URL takes no query, fragment or credentials: {url!r}")
        try:
            parts.port
        except ValueError:
            raise ValueError(f"bad port in handler URL {url!r}") from None
        self.url = url
        self._base = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        self._netloc = parts.netloc

    async def __call__(self, request: Request, ctx: Context) -> Response:
        original = urlsplit(request.url)
        # Normalised (the proxy already did; a direct caller may not have): the
        # orchestrator sees the path the runtime decided on, never `/a/../b`.
        target = normalize_path(original.path or "/") + (f"?{original.query}" if original.query else "")
        # Every spelling of the headers the runtime owns goes (X_Sandbox_Id, x-sandbox-id,
        # ...): the sandbox must not forge its id or its URL; then the real ones are added.
        headers = Headers(strip_runtime_headers(request.headers))
        headers["Host"] = self._netloc
        headers["X-Sandbox-Id"] = ctx.sandbox_id
        headers["X-Original-Url"] = request.url
        body = await request.read() if request.body_length is not None else request.body
        return await fetch(Request(request.method, self._base + target, headers, body))

    def __repr__(self) -> str:
        return f"UrlHandler({self.url!r})"


def as_handler(handler: object) -> HandlerFn:
    """Normalize any accepted handler form; TypeError/ValueError at registration time."""
    if isinstance(handler, UrlHandler):
        return handler
    if isinstance(handler, str):
        return UrlHandler(handler)
    fetch_method = getattr(handler, "fetch", None)
    if fetch_method is not None and callable(fetch_method) and not inspect.isroutine(handler):
        async def call_fetch(request: Request, ctx: Context) -> Response:
            return await fetch_method(request)
        call_fetch.__qualname__ = f"{type(handler).__name__}.fetch"
        return call_fetch
    if callable(handler):
        return handler  # type: ignore[return-value]
    raise TypeError(f"handler must have async fetch(request), be an async callable "
                    f"(request, ctx) or a URL str, not {type(handler).__name__}")


async def call_handler(handler: object, request: Request, ctx: Context) -> Response:
    """Call a handler of any form and check it answered with a `Response`."""
    result = as_handler(handler)(request, ctx)
    if inspect.isawaitable(result):
        result = await result
    if not isinstance(result, Response):
        raise TypeError(f"handler returned {type(result).__name__}, not Response")
    return result
