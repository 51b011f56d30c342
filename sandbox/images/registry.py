"""A registry as an image source: the Registry HTTP API v2 / OCI distribution
spec, over httpx (an async HTTP client made for this: HTTP/1.1 keep-alive,
TLS with the system's CAs, redirects to blob storage that drop the
Authorization header when they change origin, timeouts on every phase).

HTTPS always, except for hosts listed in `insecure_registries` (plain HTTP,
as docker's daemon.json). Anonymous first; a 401 answers with its challenge:
`Bearer realm=..,service=..,scope=..` fetches a token from the realm (with
the config.json credentials for the host, if any), `Basic` sends them.
Every answer is bounded: a manifest by MAX_MANIFEST, a blob by its
descriptor's size (the store checks the digest), every wait by `timeout`.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import ssl

import httpx

from ..errors import ImageError
from . import manifest as mf
from .reference import DOCKER_HUB, Reference

_CHALLENGE = re.compile(r'(\w+)\s*=\s*"([^"]*)"')
_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io")
MAX_TOKEN = 1 << 20


def load_credentials(path: str | None) -> dict[str, tuple[str, str]]:
    """host -> (user, password) from a Docker-style config.json."""
    if path is None:
        return {}
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(MAX_TOKEN))
    except (OSError, ValueError) as e:
        raise ValueError(f"registry_auth {path!r}: cannot read ({e})") from None
    auths = doc.get("auths") if isinstance(doc, dict) else None
    out: dict[str, tuple[str, str]] = {}
    if not isinstance(auths, dict):
        return out
    for key, v in auths.items():
        if not isinstance(v, dict):
            continue
        user, pw = v.get("username"), v.get("password")
        if isinstance(v.get("auth"), str):
            try:
                user, _, pw = base64.b64decode(v["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                continue
        if isinstance(user, str) and isinstance(pw, str):
            host = key.split("://", 1)[-1].split("/", 1)[0]
            out[host] = (user, pw)
            if key in _HUB_KEYS or host in _HUB_KEYS:
                out[DOCKER_HUB] = (user, pw)
    return out


class RegistrySource:
    def __init__(self, ref: Reference, *, insecure: bool, credentials: tuple[str, str] | None,
                 timeout: float):
        self.ref = ref
        self.creds = credentials
        scheme = "http" if insecure else "https"
        self.base = f"{scheme}://{ref.api_host}/v2/{ref.repo}"
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout), follow_redirects=True, http2=False,
            limits=httpx.Limits(max_connections=8, max_keepalive_connections=8))
        self._auth: str | None = None
        self.requests: list[str] = []        # what was asked (tests and bench count)

    async def aclose(self) -> None:
        await self.client.aclose()

    # -- HTTP with the auth dance ------------------------------------------------
    def _fail(self, why: str, kind: str) -> ImageError:
        return ImageError(self.ref.given, why, kind)

    async def _send(self, url: str, headers: dict, stream: bool) -> httpx.Response:
        for attempt in range(2):
            h = dict(headers)
            if self._auth:
                h["Authorization"] = self._auth
            self.requests.append(url)
            try:
                req = self.client.build_request("GET", url, headers=h)
                r = await self.client.send(req, stream=stream)
            except httpx.TimeoutException:
                raise self._fail(f"registry {self.ref.api_host} did not answer in time", "unreachable") from None
            except httpx.ConnectError as e:
                hint = ""
                if isinstance(e.__context__, ssl.SSLError) or "SSL" in str(e):
                    hint = " (TLS failed; a plain-HTTP registry must be listed in insecure_registries)"
                raise self._fail(f"registry {self.ref.api_host} unreachable: {e}{hint}", "unreachable") from None
            except httpx.HTTPError as e:
                raise self._fail(f"registry {self.ref.api_host}: {type(e).__name__}: {e}", "unreachable") from None
            if r.status_code != 401 or attempt == 1:
                return r
            challenge = r.headers.get("www-authenticate", "")
            await r.aclose()
            await self._authenticate(challenge)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _authenticate(self, challenge: str) -> None:
        scheme = challenge.split(" ", 1)[0].lower()
        params = dict(_CHALLENGE.findall(challenge))
        if scheme == "basic":
            if self.creds is None:
                raise self._fail("registry requires credentials (registry_auth)", "denied")
            token = base64.b64encode(f"{self.creds[0]}:{self.creds[1]}".encode()).decode()
            self._auth = f"Basic {token}"
            return
        if scheme != "bearer" or "realm" not in params:
            raise self._fail(f"registry asks for unsupported auth {challenge[:80]!r}", "denied")
        q = {"service": params.get("service", "")}
        q["scope"] = params.get("scope") or f"repository:{self.ref.repo}:pull"
        auth = httpx.BasicAuth(*self.creds) if self.creds else None
        try:
            r = await self.client.get(params["realm"], params=q, auth=auth)
        except httpx.HTTPError as e:
            raise self._fail(f"token server {params['realm']} unreachable: {e}", "unreachable") from None
        if r.status_code != 200 or len(r.content) > MAX_TOKEN:
            raise self._fail(f"token server refused ({r.status_code})", "denied")
        try:
            doc = r.json()
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise self._fail("token server gave no token", "denied")
        self._auth = f"Bearer {token}"

    def _status(self, r: httpx.Response, what: str) -> None:
        if r.status_code == 200:
            return
        if r.status_code == 404:
            raise self._fail(f"{what} not found (unknown repository, tag or digest)", "not-found")
        if r.status_code in (401, 403):
            raise self._fail(f"registry denied access to {what} ({r.status_code})", "denied")
        raise self._fail(f"registry answered {r.status_code} for {what}", "unreachable")

    async def _bounded(self, r: httpx.Response, limit: int, what: str) -> bytes:
        chunks, n = [], 0
        async for c in r.aiter_bytes():
            n += len(c)
            if n > limit:
                raise self._fail(f"{what} larger than {limit} bytes", "refused")
            chunks.append(c)
        return b"".join(chunks)

    # -- the source interface ------------------------------------------------------
    async def manifest(self) -> tuple[mf.Manifest, bytes]:
        ref = self.ref
        want = ref.digest or ref.tag
        data, ctype = await self._get_manifest(want, ref.digest)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        mt, doc = mf.load(ref.given, data, ctype)
        for _ in range(2):
            if mt not in mf.INDEXES:
                break
            d = mf.pick_platform(ref.given, doc)
            data, ctype = await self._get_manifest(d.digest, d.digest)
            digest = d.digest
            mt, doc = mf.load(ref.given, data, ctype)
        if mt in mf.INDEXES:
            raise self._fail("index nested too deep", "refused")
        return mf.manifest(ref.given, digest, mt, doc), data

    async def _get_manifest(self, want: str, digest: str | None) -> tuple[bytes, str]:
        r = await self._send(f"{self.base}/manifests/{want}", {"Accept": mf.ACCEPT}, stream=True)
        try:
            self._status(r, f"manifest {want}")
            data = await self._bounded(r, mf.MAX_MANIFEST, "manifest")
        finally:
            await r.aclose()
        got = "sha256:" + hashlib.sha256(data).hexdigest()
        if digest is not None and got != digest:
            raise self._fail(f"manifest digest mismatch: asked {digest}, got {got}", "digest")
        sent = r.headers.get("docker-content-digest")
        if digest is None and sent and sent.startswith("sha256:") and sent != got:
            raise self._fail(f"manifest digest mismatch: registry says {sent}, content is {got}",
                             "digest")
        return data, r.headers.get("content-type", "")

    async def fetch(self, desc: mf.Descriptor, sink) -> None:
        """Streams the blob into sink(chunk); the store verifies size and digest."""
        r = await self._send(f"{self.base}/blobs/{desc.digest}", {}, stream=True)
        try:
            self._status(r, f"blob {desc.digest}")
            try:
                async for chunk in r.aiter_raw(1 << 20):
                    sink(chunk)
            except httpx.TimeoutException:
                raise self._fail(f"registry stalled sending blob {desc.digest}", "unreachable") from None
            except httpx.HTTPError as e:
                raise self._fail(f"blob {desc.digest}: {type(e).__name__}: {e}", "unreachable") from None
        finally:
            await r.aclose()
