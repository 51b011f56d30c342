"""The image endpoints of `sandbox serve` (docs/api.md "Images"): pull, list,
remove, prune. Handlers of api.py's route table; an ImageError becomes
the status its kind says (bad reference 400, unknown 404, in use 409,
registry trouble 502, a refused or mismatching image 422)."""
from __future__ import annotations

import contextlib

from ..errors import ImageError
from .http import HttpError, Request
from .views import check_fields

STATUS = {"bad-reference": 400, "not-found": 404, "in-use": 409, "unreachable": 502,
          "denied": 502, "digest": 422, "refused": 422}


@contextlib.contextmanager
def image_errors():
    try:
        yield
    except ImageError as e:
        raise HttpError(STATUS.get(e.kind, 500), str(e), kind=e.kind, ref=e.ref) from None


def view(img) -> dict:
    return {"ref": img.ref, "digest": img.digest, "id": img.id, "layers": list(img.layers),
            "size": img.size, "created": img.created, "config": img.config.to_json()}


async def list_images(rt, req: Request):
    await req.conn.read_body()
    await req.reply(200, [view(i) for i in rt.images()])


async def pull_image(rt, req: Request):
    o = await req.json()
    check_fields(o, ("ref",), "POST /images")
    ref = o.get("ref")
    if not isinstance(ref, str):
        raise TypeError("ref must be a string")
    with image_errors():
        img = await rt.pull(ref)
    await req.reply(200, view(img))


async def remove_image(rt, req: Request, ref: str):
    await req.conn.read_body()
    with image_errors():
        removed = await rt.remove_image(ref)
    await req.reply(200, {"removed": removed})


async def prune_images(rt, req: Request):
    await req.conn.read_body()
    with image_errors():
        removed = await rt.prune_images()
    await req.reply(200, {"removed": removed})
