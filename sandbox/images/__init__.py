"""OCI/Docker images (SPEC §11): references, registry and file sources, the
content-addressed store, hostile-layer unpacking, image config defaults.

`ImageService` is what a Runtime holds: the store plus the runtime's
registry options, and the calls Runtime and Sandbox make."""
from __future__ import annotations

import os

from ..errors import ImageError
from .image import Image, ImageConfig, resolve_user
from .reference import Reference, parse
from .store import DEFAULT_MAX_LAYER, ImageStore

__all__ = ["Image", "ImageConfig", "ImageError", "ImageService", "Reference", "parse",
           "resolve_user", "DEFAULT_MAX_LAYER", "check_options"]


def check_options(insecure_registries, registry_auth, max_layer_bytes, image_store):
    """Runtime(...) image options, validated at construction (ValueError/TypeError)."""
    if isinstance(insecure_registries, str) or not hasattr(insecure_registries, "__iter__"):
        raise TypeError("insecure_registries must be a list of 'host[:port]'")
    hosts = []
    for h in insecure_registries:
        if not isinstance(h, str) or not h or "/" in h or any(c.isspace() for c in h):
            raise ValueError(f"insecure_registries: bad host {h!r} (want 'host[:port]')")
        hosts.append(h)
    if registry_auth is not None and not isinstance(registry_auth, (str, os.PathLike)):
        raise TypeError("registry_auth must be a path to a config.json")
    if isinstance(max_layer_bytes, bool) or not isinstance(max_layer_bytes, int) or max_layer_bytes <= 0:
        raise ValueError("max_layer_bytes must be a positive int")
    if image_store is not None and not isinstance(image_store, (str, os.PathLike)):
        raise TypeError("image_store must be a path")
    for p in (image_store,):
        if p is not None and any(c in os.fspath(p) for c in ",:\\\0"):
            raise ValueError(f"image_store {p!r} holds a character overlayfs cannot take")
    return frozenset(hosts)


class ImageService:
    def __init__(self, root: str, insecure: frozenset, registry_auth, max_layer_bytes: int):
        from .registry import load_credentials
        creds = load_credentials(os.fspath(registry_auth) if registry_auth is not None else None)
        self.store = ImageStore(os.path.abspath(os.fspath(root)), insecure=insecure,
                                credentials=creds, max_layer_bytes=max_layer_bytes)

    async def pull(self, ref, progress=None) -> Image:
        return await self.store.pull(ref, progress)

    async def get_or_pull(self, ref: Reference) -> Image:
        """The stored image, else a pull (SPEC §11: pulled on first use)."""
        self.store.ensure()
        img = self.store.get(ref)
        return img if img is not None else await self.store.pull(ref)

    def images(self) -> list[Image]:
        out = []
        recs = self.store.records()
        for name, digest in sorted(self.store.refs().items()):
            rec = recs.get(digest)
            if rec is not None:
                out.append(self.store.image(rec, name))
        return out

    async def remove(self, ref) -> list[str]:
        from .maint import remove
        return await remove(self.store, ref)

    async def prune(self) -> list[str]:
        from .maint import prune
        return await prune(self.store)

    async def lease(self, image: Image, ref: str):
        from .maint import lease
        self.store.ensure()
        return await lease(self.store, image.digest, ref)

    def collect_debris(self) -> list[str]:
        from .maint import collect_debris
        return collect_debris(self.store.root) if os.path.isdir(self.store.root) else []
