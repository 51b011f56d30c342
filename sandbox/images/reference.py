"""Image references (SPEC §11): what `image="..."` may name.

  registry        HOST[:PORT]/REPO[:TAG|@sha256:HEX]   (Docker Hub short forms too:
                  "busybox" is docker.io/library/busybox:latest, as docker reads it)
  oci-layout      oci-layout:DIR[:TAG]   (skopeo's "oci:DIR[:TAG]" too)
  docker-archive  docker-archive:FILE    (`docker save`)

Parsed once, at the edge (rt.sandbox / rt.pull), into a frozen Reference; a
reference that does not parse is an ImageError naming it, before anything
else happens. The grammar is the distribution spec's (reference.go).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..errors import ImageError

REGISTRY, OCI_LAYOUT, DOCKER_ARCHIVE = "registry", "oci-layout", "docker-archive"
DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_HOST = re.compile(r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)"
                   r"(?:\.(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?))*(?::[0-9]{1,5})?"
                   r"|\[[0-9a-fA-F:.]+\](?::[0-9]{1,5})?")
MAX_REF = 4096


@dataclass(frozen=True)
class Reference:
    kind: str
    given: str                    # as the caller wrote it (for error messages)
    host: str = ""                # registry: "host[:port]" as written ("docker.io" for the Hub)
    repo: str = ""
    tag: str | None = None
    digest: str | None = None
    path: str = ""                # oci-layout dir / docker-archive file (absolute)

    @property
    def name(self) -> str:
        """The canonical name the store files the image under."""
        if self.kind == REGISTRY:
            base = f"{self.host}/{self.repo}"
            if self.digest is not None:
                return f"{base}@{self.digest}"
            return f"{base}:{self.tag}"
        if self.kind == OCI_LAYOUT:
            return f"oci-layout:{self.path}" + (f":{self.tag}" if self.tag else "")
        return f"docker-archive:{self.path}"

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.host == DOCKER_HUB else self.host

    def __str__(self) -> str:
        return self.name


def _bad(ref: str, why: str) -> ImageError:
    return ImageError(ref, f"bad reference: {why}", "bad-reference")


def parse(ref) -> Reference:
    if isinstance(ref, Reference):
        return ref
    if not isinstance(ref, str):
        raise TypeError(f"image must be a str reference, got {type(ref).__name__}")
    if not ref or len(ref) > MAX_REF or "\0" in ref or ref != ref.strip():
        raise _bad(ref, "empty, too long, or holds NUL or surrounding blanks")
    for prefix in ("oci-layout:", "oci:"):
        if ref.startswith(prefix):
            return _layout(ref, ref[len(prefix):])
    if ref.startswith("docker-archive:"):
        path = ref[len("docker-archive:"):]
        if not path:
            raise _bad(ref, "docker-archive: needs a file")
        return Reference(DOCKER_ARCHIVE, ref, path=os.path.abspath(path))
    if ref.startswith("docker://"):
        ref_body = ref[len("docker://"):]
    else:
        ref_body = ref
    return _registry(ref, ref_body)


def _layout(given: str, rest: str) -> Reference:
    if not rest:
        raise _bad(given, "oci-layout: needs a directory")
    path, tag = rest, None
    head, sep, tail = rest.rpartition(":")
    # DIR:TAG when what follows the last ':' is a tag and the whole is not an
    # existing directory (a directory name may hold ':').
    if sep and head and "/" not in tail and _TAG.fullmatch(tail) and not os.path.isdir(rest):
        path, tag = head, tail
    return Reference(OCI_LAYOUT, given, path=os.path.abspath(path), tag=tag)


def _registry(given: str, body: str) -> Reference:
    digest = None
    if "@" in body:
        body, digest = body.split("@", 1)
        if not _DIGEST.fullmatch(digest):
            raise _bad(given, f"digest {digest!r} is not sha256:<64 hex>")
    tag = None
    slash = body.rfind("/")
    colon = body.rfind(":")
    if colon > slash:
        body, tag = body[:colon], body[colon + 1:]
        if not _TAG.fullmatch(tag):
            raise _bad(given, f"tag {tag!r} is not valid")
    first, sep, rest = body.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        host, repo = first, rest
        if not _HOST.fullmatch(host):
            raise _bad(given, f"registry host {host!r} is not valid")
        if host.rpartition(":")[2].isdigit() and not 0 < int(host.rpartition(":")[2]) < 65536:
            raise _bad(given, f"port of {host!r} is out of range")
    else:
        host, repo = DOCKER_HUB, body
        if "/" not in repo:
            repo = f"library/{repo}"
    if not _REPO.fullmatch(repo) or len(repo) > 255:
        raise _bad(given, f"repository {repo!r} is not valid (lowercase [a-z0-9._-] components)")
    if tag is None and digest is None:
        tag = "latest"
    return Reference(REGISTRY, given, host=host, repo=repo, tag=tag, digest=digest)
