"""Manifests, indexes and descriptors (OCI image-spec and Docker v2 schema 2).

Everything here comes from a registry or a file: checked into small frozen
values (a digest is sha256:<64 hex>, a size an int >= 0), and anything else
is an ImageError naming what was wrong. Media types are read from the
document itself, falling back to the transport's Content-Type.
"""
from __future__ import annotations

import json
import platform
import re
from dataclasses import dataclass

from ..errors import ImageError

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEXES = (OCI_INDEX, DOCKER_LIST)
MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPT = ", ".join(MANIFESTS + INDEXES)
MAX_MANIFEST = 4 << 20
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
         "s390x": "s390x", "riscv64": "riscv64", "i686": "386"}
HOST_ARCH = _ARCH.get(platform.machine(), platform.machine())


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: tuple[str, str] | None = None
    annotations: tuple[tuple[str, str], ...] = ()

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]


@dataclass(frozen=True)
class Manifest:
    digest: str
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


def check_digest(ref: str, d, what: str) -> str:
    if not isinstance(d, str) or not _DIGEST.fullmatch(d):
        raise ImageError(ref, f"bad {what} digest {str(d)[:80]!r} (only sha256 is supported)",
                         "refused")
    return d


def descriptor(ref: str, obj, what: str) -> Descriptor:
    if not isinstance(obj, dict):
        raise ImageError(ref, f"{what} is not a descriptor object", "refused")
    mt = obj.get("mediaType", "")
    size = obj.get("size")
    if not isinstance(mt, str) or isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ImageError(ref, f"{what}: bad mediaType or size", "refused")
    plat = obj.get("platform")
    p = None
    if isinstance(plat, dict):
        p = (str(plat.get("os", "")), str(plat.get("architecture", "")))
    ann = obj.get("annotations")
    anns = tuple((str(k), str(v)) for k, v in ann.items()) if isinstance(ann, dict) else ()
    return Descriptor(mt, check_digest(ref, obj.get("digest"), what), size, p, anns)


def load(ref: str, data: bytes, content_type: str = "") -> tuple[str, dict]:
    """(media type, document) of a manifest or index."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ImageError(ref, "manifest is not JSON", "refused") from None
    if not isinstance(doc, dict):
        raise ImageError(ref, "manifest is not a JSON object", "refused")
    mt = doc.get("mediaType") or content_type.split(";")[0].strip()
    if not mt:
        # An OCI index or manifest may omit mediaType: tell them by shape.
        mt = OCI_INDEX if "manifests" in doc else OCI_MANIFEST if "layers" in doc else ""
    if doc.get("schemaVersion") == 1 or mt.startswith("application/vnd.docker.distribution.manifest.v1"):
        raise ImageError(ref, "Docker schema 1 manifests are not supported", "refused")
    if mt not in INDEXES + MANIFESTS:
        raise ImageError(ref, f"unsupported manifest media type {mt!r}", "refused")
    return mt, doc


def pick_platform(ref: str, doc: dict) -> Descriptor:
    """linux/<host arch> from an index (SPEC §11: the host's platform)."""
    entries = doc.get("manifests")
    if not isinstance(entries, list):
        raise ImageError(ref, "index has no manifests list", "refused")
    descs = [descriptor(ref, m, "index entry") for m in entries[:1024]]
    for d in descs:
        if d.platform == ("linux", HOST_ARCH):
            return d
    # An index without platforms (an OCI layout of one image) names its manifest plainly.
    plain = [d for d in descs if d.platform is None and d.media_type in MANIFESTS + INDEXES + ("",)]
    if len(plain) == 1:
        return plain[0]
    raise ImageError(ref, f"no linux/{HOST_ARCH} image in the index", "not-found")


def manifest(ref: str, digest: str, mt: str, doc: dict) -> Manifest:
    cfg = descriptor(ref, doc.get("config"), "config")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise ImageError(ref, "manifest has no layers list", "refused")
    descs = tuple(descriptor(ref, layer, "layer") for layer in layers)
    for d in descs:
        if d.media_type and "tar" not in d.media_type:
            raise ImageError(ref, f"unsupported layer media type {d.media_type!r}", "refused")
    return Manifest(digest, mt, cfg, descs)
