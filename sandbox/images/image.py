"""An image as the runtime keeps it: `Image` (what rt.pull/rt.images return)
and `ImageConfig`, the defaults a sandbox takes from it (SPEC §11 "Config").

The config JSON comes from the image's author: every field is checked here,
once, into frozen values (a list of str without NUL, env names without '='),
and a config that does not fit is refused (ImageError), never half-applied.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..errors import ImageError
from ..users import Identity, resolve

MAX_CONFIG = 8 << 20


@dataclass(frozen=True)
class ImageConfig:
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    env: tuple[tuple[str, str], ...] = ()
    working_dir: str | None = None
    user: str | None = None

    @property
    def command(self) -> list[str] | None:
        """Entrypoint + Cmd, as docker runs them; None: the sandbox idles."""
        argv = list(self.entrypoint or ()) + list(self.cmd or ())
        return argv or None

    @property
    def environment(self) -> dict[str, str]:
        return dict(self.env)

    def to_json(self) -> dict:
        return {"Entrypoint": list(self.entrypoint) if self.entrypoint is not None else None,
                "Cmd": list(self.cmd) if self.cmd is not None else None,
                "Env": [f"{k}={v}" for k, v in self.env],
                "WorkingDir": self.working_dir or "", "User": self.user or ""}

    @classmethod
    def from_json(cls, ref: str, obj) -> "ImageConfig":
        """The `config` object of an OCI/Docker image config (may be null)."""
        if obj is None:
            return cls()
        if not isinstance(obj, dict):
            raise _refused(ref, "config is not an object")

        def argv(key):
            v = obj.get(key)
            if v is None:
                return None
            if isinstance(v, str):        # docker accepts a bare string here
                v = [v]
            if not isinstance(v, list) or not all(isinstance(a, str) and "\0" not in a for a in v):
                raise _refused(ref, f"config {key} is not a list of strings")
            return tuple(v)

        env = []
        raw = obj.get("Env") or []
        if not isinstance(raw, list):
            raise _refused(ref, "config Env is not a list")
        for e in raw:
            if not isinstance(e, str) or "\0" in e:
                raise _refused(ref, "config Env holds a non-string or NUL")
            k, sep, v = e.partition("=")
            if not k or not sep:
                raise _refused(ref, f"config Env entry {e[:80]!r} is not NAME=VALUE")
            env.append((k, v))
        wd = obj.get("WorkingDir") or None
        user = obj.get("User") or None
        for key, v in (("WorkingDir", wd), ("User", user)):
            if v is not None and (not isinstance(v, str) or "\0" in v):
                raise _refused(ref, f"config {key} is not a string")
        if wd is not None and not wd.startswith("/"):
            wd = "/" + wd
        return cls(argv("Entrypoint"), argv("Cmd"), tuple(env), wd, user)


@dataclass(frozen=True)
class Image:
    """A pulled image. `ref`: the name it is filed under; `digest`: its
    manifest's digest (a docker-archive has none: its config's); `id`: the
    config digest; `layers`: diff-ids, bottom first; `size`: bytes unpacked."""
    ref: str
    digest: str
    id: str
    layers: tuple[str, ...]
    size: int
    config: ImageConfig = field(default_factory=ImageConfig)
    created: float = 0.0

    def __repr__(self) -> str:
        return f"<Image {self.ref} {self.digest[:19]} layers={len(self.layers)}>"


def _refused(ref: str, why: str) -> ImageError:
    return ImageError(ref, f"bad image config: {why}", "refused")


def parse_config(ref: str, data: bytes) -> tuple[ImageConfig, tuple[str, ...], dict]:
    """(defaults, diff_ids, platform) from a verified config blob."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise _refused(ref, "not JSON") from None
    if not isinstance(doc, dict):
        raise _refused(ref, "not an object")
    rootfs = doc.get("rootfs")
    if not isinstance(rootfs, dict) or not isinstance(rootfs.get("diff_ids"), list):
        raise _refused(ref, "no rootfs.diff_ids")
    diff_ids = rootfs["diff_ids"]
    from .manifest import check_digest
    for d in diff_ids:
        check_digest(ref, d, "diff_id")
    platform = {"os": doc.get("os"), "architecture": doc.get("architecture")}
    return ImageConfig.from_json(ref, doc.get("config")), tuple(diff_ids), platform


def resolve_user(user: str | int | None, passwd: str, group: str) -> Identity:
    """`user=` as images write it: a name or UID, optionally `:group` (a name
    or GID), looked up in the image's own passwd/group (SPEC §11)."""
    if not isinstance(user, str) or ":" not in user:
        return resolve(user, passwd, group)
    u, _, g = user.partition(":")
    ident = resolve(u or 0, passwd, group)
    if g.isascii() and g.isdigit() and len(g) <= 10:
        gid = int(g)
    else:
        gid = None
        for line in group.splitlines():
            f = line.split(":")
            if len(f) >= 3 and f[0] == g and f[2].isascii() and f[2].isdigit() and len(f[2]) <= 10:
                gid = int(f[2])
                break
        if gid is None:
            raise ValueError(f"unknown group {g!r} (not in the image's /etc/group)")
    if gid > (1 << 32) - 2:
        raise ValueError(f"group id {gid} out of range")
    # An explicit group replaces the supplementary ones (docker's `-u uid:gid`).
    return Identity(ident.uid, gid, (), ident.home)
