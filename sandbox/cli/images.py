"""`sandbox pull`, `sandbox images`, `sandbox rmi` (SPEC §11).

They use the image store of --state-dir (`<state-dir>/images`) directly: no
sandbox is made, so no Runtime is opened (no network, no cgroups). Its commands
register on the group of group.py.
"""
from __future__ import annotations

import asyncio
import os
import sys
import time

import click

from .group import Failure, cli


def _runtime(insecure=(), registry_auth=None):
    from .. import Runtime
    obj = click.get_current_context().find_root().obj or {}
    try:
        return Runtime(state_dir=obj.get("state_dir") or "/run/sandbox",
                       insecure_registries=list(insecure), registry_auth=registry_auth)
    except (TypeError, ValueError) as e:
        raise click.UsageError(str(e))


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


class Progress:
    """One terminal line per pull, rewritten at most 10 times a second: per
    layer, bytes so far of its size and its rate (bytes/s)."""

    def __init__(self, out=sys.stderr):
        self.out = out
        self.layers: dict[str, tuple[str, int, int, float]] = {}
        self._last = 0.0
        self.enabled = out.isatty()

    def __call__(self, phase, digest, done, total, secs) -> None:
        if not self.enabled:
            return
        self.layers[digest] = (phase, done, total, secs)
        now = time.monotonic()
        if now - self._last < 0.1:
            return
        self._last = now
        parts = []
        for d, (ph, n, t, s) in self.layers.items():
            if ph == "download":
                rate = f" {_size(n / s)}/s" if s > 0 else ""
                parts.append(f"{d[7:19]} {_size(n)}/{_size(t)}{rate}")
            else:
                parts.append(f"{d[7:19]} unpacking {_size(n)}")
        line = "  ".join(parts)
        self.out.write("\r\x1b[K" + line[:400])
        self.out.flush()

    def finish(self) -> None:
        if self.enabled and self.layers:
            self.out.write("\r\x1b[K")
            self.out.flush()


def _image_error(e) -> Failure:
    return Failure(f"{e}", 2 if getattr(e, "kind", "") == "bad-reference" else 125)


@cli.command("pull")
@click.option("--insecure-registry", "insecure", multiple=True, metavar="HOST:PORT",
              help="a registry spoken to over plain HTTP")
@click.option("--registry-auth", default=None, metavar="PATH", help="Docker-style config.json")
@click.argument("ref")
def pull_command(insecure, registry_auth, ref):
    """Pull REF into the image store: HOST[:PORT]/REPO[:TAG|@DIGEST],
    oci-layout:DIR[:TAG] or docker-archive:FILE."""
    from ..errors import ImageError
    if os.geteuid() != 0:
        raise Failure("sandbox pull must run as root")
    rt = _runtime(insecure, registry_auth)
    progress = Progress()
    t0 = time.monotonic()
    try:
        img = asyncio.run(rt.pull(ref, progress=progress))
    except ImageError as e:
        raise _image_error(e)
    finally:
        progress.finish()
    click.echo(f"{img.ref} {img.digest} ({len(img.layers)} layers, {_size(img.size)}, "
               f"{time.monotonic() - t0:.2f}s)")


@cli.command("images")
@click.option("--digests", is_flag=True, help="full digests")
def images_command(digests):
    """List the stored images (one line per name)."""
    rt = _runtime()
    rows = [("REFERENCE", "DIGEST", "LAYERS", "SIZE")]
    for img in rt.images():
        rows.append((img.ref, img.digest if digests else img.digest[7:19], str(len(img.layers)),
                     _size(img.size)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


@cli.command("rmi")
@click.option("--prune", is_flag=True, help="also drop every image no sandbox uses")
@click.argument("refs", nargs=-1)
def rmi_command(prune, refs):
    """Remove images by name (or digest); the layers go with the last name."""
    from ..errors import ImageError
    if not refs and not prune:
        raise click.UsageError("name an image (or --prune)")
    rt = _runtime()

    async def main():
        for ref in refs:
            for name in await rt.remove_image(ref):
                click.echo(f"removed {name}")
        if prune:
            for name in await rt.prune_images():
                click.echo(f"removed {name}")
    try:
        asyncio.run(main())
    except ImageError as e:
        raise _image_error(e)
