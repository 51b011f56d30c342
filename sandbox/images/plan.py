"""The mount plan of an image sandbox (SPEC §11 "Rootfs").

It is rootfs.dir_plan's plan — a scratch tmpfs with the overlay's upper and
work dirs (discarded with the sandbox's mount namespace), the runtime's
/etc/hosts, hostname and resolv.conf bound read-only over the image's, the
certs, /proc, /dev, /sys — with the image's layers as the overlay's lower
dirs instead of one directory.

The lowerdir option is where images bite: mount(2) copies at most one page of
options, and an image can have a hundred layers. The layers are named by
short links in the store (`<store>/l/<8 hex>`), which fits ~120 layers in a
page; past that, the layers are grouped, each group mounted as a read-only
overlay of its own on the scratch tmpfs, and the sandbox's overlay stacks on
those (overlay-on-overlay: depth 2, the kernel's limit, so groups are never
nested further).
"""
from __future__ import annotations

from .. import rootfs as _rootfs
from .._native_api import AT_DST_IN_ROOT, OP_MKDIR, OP_MOUNT, OP_ROOT, MountOp

PAGE = 4096
_MS_RDONLY, _MS_NOSUID, _MS_NODEV = 1, 2, 4
_PLACEHOLDER = "/sandbox-image-lowerdirs"


def _fits(dirs: list[str], extra: int) -> bool:
    return len("lowerdir=") + len(":".join(dirs)) + extra < PAGE


def _groups(lowers: list[str], budget: int) -> list[list[str]]:
    out: list[list[str]] = [[]]
    for d in lowers:
        if out[-1] and not _fits(out[-1] + [d], budget):
            out.append([])
        out[-1].append(d)
    return out


def lowerdir_ops(scratch: str, lowers: list[str], extra: int) -> tuple[list[MountOp], str]:
    """(ops that mount any groups on the scratch tmpfs, the lowerdir value)."""
    for d in lowers:
        if any(c in d for c in ",:\\\0"):
            raise ValueError(f"layer path {d!r} holds a character overlayfs cannot take")
    if _fits(lowers, extra):
        return [], ":".join(lowers)
    ops: list[MountOp] = []
    tops: list[str] = []
    for i, group in enumerate(_groups(lowers, 16)):
        if len(group) == 1:
            tops.append(group[0])
            continue
        mnt = f"{scratch}/g{i}"
        ops += [MountOp(OP_MKDIR, mnt, mode=0o755),
                MountOp(OP_MOUNT, mnt, src="sandbox-layers", fstype="overlay",
                        flags=_MS_RDONLY | _MS_NOSUID | _MS_NODEV,
                        data="lowerdir=" + ":".join(group))]
        tops.append(mnt)
    if not _fits(tops, extra):
        raise ValueError(f"image has too many layers ({len(lowers)}) for one overlay")
    return ops, ":".join(tops)


def image_plan(root: str, scratch: str, lowers: list[str], etc, certs=None,
               workdir: str | None = None) -> list[MountOp]:
    """lowers: the layer dirs, top first."""
    ops = _rootfs.dir_plan(root, scratch, _PLACEHOLDER, etc, certs)
    for i, op in enumerate(ops):
        if op.kind == OP_MOUNT and op.fstype == "overlay" and isinstance(op.data, str) \
                and op.data.startswith(f"lowerdir={_PLACEHOLDER},"):
            rest = op.data[len(f"lowerdir={_PLACEHOLDER}"):]
            groups, value = lowerdir_ops(scratch, lowers, len(rest))
            op = MountOp(op.kind, op.dst, src=op.src, fstype=op.fstype, flags=op.flags,
                         data=f"lowerdir={value}{rest}", mode=op.mode, at=op.at)
            ops[i:i + 1] = groups + [op]
            break
    else:  # pragma: no cover - dir_plan changed shape
        raise RuntimeError("rootfs.dir_plan has no overlay mount to put the layers in")
    if workdir and workdir != "/":
        # docker makes a missing WorkingDir; here in the sandbox's upper
        # layer, confined to the root, keeping a symlink that stays inside.
        at = ops.index(next(o for o in ops if o.kind == OP_ROOT)) + 1
        parts = [p for p in workdir.split("/") if p]
        mk = [MountOp(OP_MKDIR, "/" + "/".join(parts[:n]), mode=0o755, at=AT_DST_IN_ROOT)
              for n in range(1, len(parts) + 1)]
        ops[at:at] = mk
    return ops
