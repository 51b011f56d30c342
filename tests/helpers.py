import asyncio
import functools

import sandbox


def run(coro_fn):
    """Runs an async test body in a fresh event loop (closed after)."""
    @functools.wraps(coro_fn)
    def wrapper(*a, **kw):
        return asyncio.run(coro_fn(*a, **kw))
    return wrapper


class running:
    """`async with running() as (rt, box)`: a runtime with one started sandbox."""

    def __init__(self, **start):
        self.start = start

    async def __aenter__(self):
        self.rt = sandbox.Runtime()
        await self.rt.__aenter__()
        try:
            self.box = self.rt.sandbox()
            await self.box.start(**self.start)
        except BaseException:
            await self.rt.__aexit__(None, None, None)
            raise
        return self.rt, self.box

    async def __aexit__(self, *exc):
        await self.rt.__aexit__(*exc)
