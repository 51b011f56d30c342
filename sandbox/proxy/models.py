"""`Request`, `Response` and `Headers`: the objects handlers see (SPEC §10).

They are exported as `sandbox.Request` / `sandbox.Response`. Bodies are streams so that
the proxy can relay a 100 MB upload or download chunk by chunk; `read()` is the
convenience that buffers (and caches, so `read()` then `json()` works).
"""

from __future__ import annotations

import inspect
import json as _json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping, MutableMapping
from typing import Any, Union
from urllib.parse import urlsplit

__all__ = ["Headers", "Request", "Response", "BodyLike", "HeadersLike"]

HeadersLike = Union["Headers", Mapping[str, str], Iterable[tuple[str, str]], None]
BodyLike = Union[bytes, bytearray, memoryview, str, AsyncIterable[bytes], None]

# RFC 9110 token characters: what a method or header name may be made of.
_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _check_token(value: str, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if not value or not set(value) <= _TOKEN:
        raise ValueError(f"{what} is not a valid HTTP token: {value!r}")
    return value


def _check_value(value: object, name: str) -> str:
    if isinstance(value, (bytes, bytearray)):
        # Header values on the wire are bytes; latin-1 maps them 1:1 and back.
        value = bytes(value).decode("latin-1")
    if not isinstance(value, str):
        raise TypeError(f"header {name!r} value must be str or bytes, not {type(value).__name__}")
    # CR/LF/NUL would let a handler smuggle extra headers or a second response.
    if any(c in value for c in "\r\n\0"):
        raise ValueError(f"header {name!r} value holds CR, LF or NUL")
    return value


class Headers(MutableMapping[str, str]):
    """Case-insensitive multi-mapping that keeps order and the original name casing.

    `h[name]` joins repeated values with ", " (what RFC 9110 allows for most fields;
    use `get_all` for `Set-Cookie`). Assignment replaces every value of that name;
    `add` appends one more.
    """

    __slots__ = ("_items",)

    def __init__(self, headers: HeadersLike = None) -> None:
        self._items: list[tuple[str, str]] = []
        if headers is None:
            return
        if isinstance(headers, Headers):
            self._items = list(headers._items)
            return
        pairs: Iterable[Any] = headers.items() if isinstance(headers, Mapping) else headers
        if isinstance(pairs, (str, bytes)):
            raise TypeError("headers must be a mapping or an iterable of (name, value) pairs")
        for pair in pairs:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError("headers must be a mapping or an iterable of (name, value) pairs")
            self.add(pair[0], pair[1])

    @staticmethod
    def _name(name: object) -> str:
        if isinstance(name, (bytes, bytearray)):
            name = bytes(name).decode("latin-1")
        return _check_token(name, "header name")  # type: ignore[arg-type]

    def add(self, name: str, value: str) -> None:
        name = self._name(name)
        self._items.append((name, _check_value(value, name)))

    def get_all(self, name: str) -> list[str]:
        key = name.lower()
        return [v for n, v in self._items if n.lower() == key]

    def raw_items(self) -> list[tuple[str, str]]:
        """Every (name, value) pair in order, repeated names included."""
        return list(self._items)

    def copy(self) -> Headers:
        return Headers(self)

    def __getitem__(self, name: str) -> str:
        values = self.get_all(name)
        if not values:
            raise KeyError(name)
        return ", ".join(values)

    def __setitem__(self, name: str, value: str) -> None:
        name = self._name(name)
        value = _check_value(value, name)
        key = name.lower()
        out: list[tuple[str, str]] = []
        placed = False
        for n, v in self._items:
            if n.lower() == key:
                if not placed:  # keep the position of the first occurrence
                    out.append((name, value))
                    placed = True
            else:
                out.append((n, v))
        if not placed:
            out.append((name, value))
        self._items = out

    def __delitem__(self, name: str) -> None:
        key = name.lower()
        kept = [(n, v) for n, v in self._items if n.lower() != key]
        if len(kept) == len(self._items):
            raise KeyError(name)
        self._items = kept

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        key = name.lower()
        return any(n.lower() == key for n, _ in self._items)

    def __iter__(self) -> Iterator[str]:
        seen: set[str] = set()
        for n, _ in self._items:
            if n.lower() not in seen:
                seen.add(n.lower())
                yield n

    def __len__(self) -> int:
        return len({n.lower() for n, _ in self._items})

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Headers):
            return sorted((n.lower(), v) for n, v in self._items) == sorted(
                (n.lower(), v) for n, v in other._items
            )
        if isinstance(other, Mapping):
            return self == Headers(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


class _Body:
    """A body that is either bytes (replayable) or a one-shot async stream.

    `read()` buffers the rest of a stream and caches it, after which the body behaves
    like bytes again; iterating a stream twice (or reading it after a partial
    iteration) is a `TypeError`, as with a consumed `fetch` body.
    """

    __slots__ = ("_data", "_stream", "_started")

    def __init__(self, body: BodyLike) -> None:
        self._data: bytes | None = None
        self._stream: AsyncIterable[bytes] | None = None
        self._started = False
        if body is None:
            self._data = b""
        elif isinstance(body, str):
            self._data = body.encode("utf-8")
        elif isinstance(body, (bytes, bytearray, memoryview)):
            self._data = bytes(body)
        elif isinstance(body, AsyncIterable):
            self._stream = body
        else:
            raise TypeError(f"body must be bytes, str or an async iterable of bytes, not {type(body).__name__}")

    @property
    def known_length(self) -> int | None:
        return len(self._data) if self._data is not None else None

    async def _iterate(self) -> AsyncIterator[bytes]:
        if self._data is not None:
            if self._data:
                yield self._data
            return
        if self._started:
            raise TypeError("body stream already consumed")
        self._started = True
        stream = self._stream
        assert stream is not None
        try:
            async for chunk in stream:
                if isinstance(chunk, (bytearray, memoryview)):
                    chunk = bytes(chunk)
                if not isinstance(chunk, bytes):
                    raise TypeError(f"body stream yielded {type(chunk).__name__}, not bytes")
                if chunk:
                    yield chunk
        finally:
            # Abandoned early (the peer went away): close the source now, not at GC,
            # so an upstream connection behind it is released at once.
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                result = aclose()
                if inspect.isawaitable(result):
                    await result

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def read(self) -> bytes:
        if self._data is None:
            self._data = b"".join([c async for c in self._iterate()])
            self._stream = None
        return self._data


class _Message:
    __slots__ = ("headers", "_body")

    def __init__(self, headers: HeadersLike, body: BodyLike) -> None:
        self.headers = Headers(headers)
        self._body = _Body(body)
        if isinstance(body, str) and "content-type" not in self.headers:
            # What fetch()/Response() do in JS for a string body.
            self.headers["Content-Type"] = "text/plain;charset=UTF-8"

    @property
    def body(self) -> AsyncIterator[bytes]:
        """The body as an async iterator of bytes chunks (one pass for a stream)."""
        return aiter(self._body)

    @property
    def body_length(self) -> int | None:
        """Length when the body is held in memory; None for a stream."""
        return self._body.known_length

    async def read(self) -> bytes:
        return await self._body.read()

    async def text(self) -> str:
        return (await self.read()).decode("utf-8", errors="replace")

    async def json(self) -> Any:
        return _json.loads(await self.read())


class Request(_Message):
    """An HTTP request with an absolute `url`."""

    __slots__ = ("method", "url")

    def __init__(self, method: str, url: str, headers: HeadersLike = None, body: BodyLike = None) -> None:
        self.method = _check_token(method, "method").upper()
        if not isinstance(url, str):
            raise TypeError(f"url must be a str, not {type(url).__name__}")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be absolute http(s)://host/...: {url!r}")
        if any(c in url for c in "\r\n\0 "):
            raise ValueError(f"url holds whitespace or NUL: {url!r}")
        self.url = url
        super().__init__(headers, body)

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.url}>"


class Response(_Message):
    """An HTTP response; `body` may be bytes, str or an async iterable of bytes."""

    __slots__ = ("status",)

    def __init__(self, body: BodyLike = b"", status: int = 200, headers: HeadersLike = None) -> None:
        if isinstance(status, bool) or not isinstance(status, int):
            raise TypeError(f"status must be an int, not {type(status).__name__}")
        if not 200 <= status <= 599:
            # 1xx are interim responses the proxy handles itself; a handler cannot send one.
            raise ValueError(f"status must be in 200..599: {status}")
        self.status = status
        super().__init__(headers, body)

    def __repr__(self) -> str:
        return f"<Response {self.status}>"
