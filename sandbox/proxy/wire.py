"""What the proxy rewrites in a sandbox's request before anyone sees it.

- Header names the runtime owns (`X-Sandbox-Id`, `X-Original-Url`) are removed in every
  spelling a server might read as the same header: case-insensitively and with `_` for
  `-` (CGI-style servers, nginx with `underscores_in_headers`, WSGI's `HTTP_X_SANDBOX_ID`
  all map `X_Sandbox_Id` onto `X-Sandbox-Id`). Only the runtime then adds the real ones.
- The path is normalised once (RFC 3986 §5.2.4 dot segments, `//` collapsed, `%2e` read
  as the `.` it is equivalent to — RFC 3986 §6.2.2.2, since `.` is unreserved), so a
  handler, a URL handler and the upstream all see the path the runtime saw: no
  `/allowed/../admin` that means one thing to a prefix check and another to a server.
  Other escapes (`%2f` included) are left as they are: they are data, not separators.
"""

from __future__ import annotations

import re
from typing import Union

from .models import Headers

__all__ = ["RUNTIME_HEADERS", "header_key", "strip_runtime_headers", "normalize_path"]

RUNTIME_HEADERS = frozenset({"x-sandbox-id", "x-original-url"})
_DOT = re.compile("%2e", re.IGNORECASE)


def header_key(name: str) -> str:
    """The spelling-insensitive identity of a header name."""
    return name.lower().replace("_", "-")


def strip_runtime_headers(headers: Union[Headers, list[tuple[str, str]]]) -> list[tuple[str, str]]:
    """The (name, value) pairs without any header that could be taken for one the
    runtime owns."""
    pairs = headers.raw_items() if isinstance(headers, Headers) else headers
    return [(n, v) for n, v in pairs if header_key(n) not in RUNTIME_HEADERS]


def normalize_path(path: str) -> str:
    """`/a/./b/../c//d` -> `/a/c/d`; never climbs above `/`; keeps a trailing `/`."""
    if not path.startswith("/"):
        raise ValueError(f"path must start with '/': {path!r}")
    if "." not in path and "//" not in path and "%" not in path:
        return path  # the common case, untouched
    segments = _DOT.sub(".", path).split("/")[1:]
    out: list[str] = []
    for seg in segments:
        if seg == "..":
            if out:
                out.pop()
        elif seg not in (".", ""):
            out.append(seg)
    trailing = segments[-1] in ("", ".", "..") and bool(out)
    return "/" + "/".join(out) + ("/" if trailing else "")
