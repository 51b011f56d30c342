"""`sandbox run` (SPEC §7): one sandbox in the foreground."""
from __future__ import annotations

import asyncio
import errno
import os
import signal
import sys

import click

from .group import Failure, cli, env_pairs

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2, signal.SIGWINCH)


@cli.command(context_settings={"ignore_unknown_options": False})
@click.option("--rootfs", type=click.Path(file_okay=False), help="root filesystem directory")
@click.option("--image", default=None, metavar="REF", help="an OCI image (pulled on first use)")
@click.option("--insecure-registry", "insecure", multiple=True, metavar="HOST:PORT",
              help="a registry spoken to over plain HTTP")
@click.option("--registry-auth", default=None, metavar="PATH", help="Docker-style config.json")
@click.option("--env", "envs", multiple=True, metavar="K=V", help="environment variable")
@click.option("--no-internet", is_flag=True, help="only HTTP(S) through the proxy and DNS")
@click.option("--allow-host", multiple=True, help="allowed host (deny-by-default)")
@click.option("--deny-host", multiple=True, help="denied host")
@click.option("--memory", default=None, help="memory limit, e.g. 256M")
@click.option("--pids", type=int, default=None, help="process limit")
@click.option("--cpus", type=float, default=None, help="CPU limit, e.g. 0.5")
@click.option("--name", default=None, help="sandbox name")
@click.option("--cwd", default=None, help="working directory of CMD")
@click.option("--user", default=None, help="user name or UID for CMD")
@click.option("--resolver", default=None, help="DNS resolver ip[:port]")
@click.option("-i", "--interactive", is_flag=True, help="forward stdin (always on; for docker habits)")
@click.argument("cmd", nargs=-1, required=False)
@click.pass_context
def run(ctx, rootfs, image, insecure, registry_auth, envs, no_internet, allow_host, deny_host,
        memory, pids, cpus, name, cwd, user, resolver, interactive, cmd):
    """Run CMD as the entrypoint of one sandbox in the foreground.

    When stdin is a terminal, CMD gets a terminal of its own (a pty of the
    sandbox, as `docker run -t`), relayed to this one in raw mode."""
    env = env_pairs(envs)
    if not cmd and image is None:
        raise click.UsageError("missing CMD (or --image REF, whose config names one)")
    user_v = int(user) if user is not None and user.isdigit() else user
    code = asyncio.run(_run(ctx.obj, dict(
        rootfs=rootfs, env=env, internet=not no_internet, allow=list(allow_host),
        deny=list(deny_host), memory=memory, pids=pids, cpus=cpus, name=name, cwd=cwd,
        user=user_v, resolver=resolver, cmd=list(cmd) or None, image=image,
        insecure=list(insecure), registry_auth=registry_auth)))
    sys.exit(code)


async def _run(obj, o) -> int:
    from .. import ExecError, Runtime
    loop = asyncio.get_running_loop()
    try:
        rt = Runtime(state_dir=obj["state_dir"], resolver=o["resolver"],
                     insecure_registries=o.get("insecure", ()), registry_auth=o.get("registry_auth"))
    except (TypeError, ValueError) as e:
        raise click.UsageError(str(e))
    box = None
    pending: list[int] = []
    interrupts = 0
    # On a terminal the sandbox gets a pty of its own; it never sees an fd
    # of ours (SPEC §9: TIOCSTI into the operator's shell).
    tty_mode = os.isatty(0)
    relay = None

    def forward(sig):
        # Installed before anything exists, so a signal during start-up is
        # never fatal to the runtime (which would leak what it made): it is
        # held and delivered once the entrypoint runs.
        nonlocal interrupts
        if tty_mode and sig == signal.SIGWINCH:
            # The pty's line discipline signals the sandbox's foreground job.
            if relay is not None:
                relay.resize()
            return
        if sig == signal.SIGINT:
            interrupts += 1
            if interrupts > 1 and box is not None:   # a second Ctrl-C: stop waiting politely
                asyncio.ensure_future(box.destroy())
                return
            if tty_mode:
                # ^C reaches the sandbox as a byte through the raw terminal
                # and its pty signals only its foreground job; a SIGINT sent
                # to the runtime itself (kill) is not passed on: it would hit
                # the entrypoint, whatever job is in the foreground.
                return
        if box is not None and box.running:
            box.signal(int(sig))
        else:
            pending.append(int(sig))

    for s in FORWARDED:
        loop.add_signal_handler(s, forward, s)
    try:
        async with rt:
            try:
                box = rt.sandbox(o["name"], rootfs=o["rootfs"], image=o.get("image"),
                                 memory=o["memory"], pids=o["pids"],
                                 cpus=o["cpus"])
                _apply_hosts(box, o)
            except (TypeError, ValueError) as e:
                raise click.UsageError(str(e))
            # Without a pty, an fd of ours that is a terminal is not handed
            # in either: the sandbox could read the operator's keystrokes or
            # change the terminal's settings through it. Such streams go
            # through a pipe that we copy out.
            stdio, copies = (None, []) if tty_mode else _plain_stdio()
            try:
                try:
                    await box.start(env=o["env"], entrypoint=o["cmd"], enable_internet=o["internet"],
                                    cwd=o["cwd"], user=o["user"], stdio=stdio, console=tty_mode)
                except BaseException:
                    for c in copies:
                        c.close()
                    raise
                for c in copies:
                    c.started()
            except ExecError as e:
                if e.step == "execve" and e.errno in (errno.ENOENT, errno.ENOTDIR):
                    raise Failure(f"{(o['cmd'] or ['entrypoint'])[0]}: command not found", 127)
                if e.step == "execve":
                    raise Failure(f"{(o['cmd'] or ['entrypoint'])[0]}: {e.strerror}", 126)
                raise Failure(str(e))
            except ValueError as e:
                raise click.UsageError(str(e))
            if not tty_mode:
                for sig in pending:
                    box.signal(sig)
                try:
                    return await _wait(box)
                finally:
                    for c in copies:
                        await c.done()
            from ..console import TerminalRelay
            master = os.dup(box.console_fd)   # ours: the sandbox closes its own at release
            try:
                with TerminalRelay(master) as relay:
                    for sig in pending:
                        box.signal(sig)
                    code = await _wait(box)
                    await relay.drain(timeout=5.0)
                    return code
            finally:
                relay = None
                os.close(master)
    finally:
        for s in FORWARDED:
            loop.remove_signal_handler(s)


class _Copy:
    """Copies a pipe the sandbox writes to one of our fds (a terminal)."""

    def __init__(self, dst: int):
        self.dst = dst
        self.r, self.w = os.pipe2(os.O_CLOEXEC)
        self._eof = asyncio.get_running_loop().create_future()

    def started(self) -> None:
        """The child holds the write end now: ours goes, and we read."""
        if self.w >= 0:
            os.close(self.w)
            self.w = -1
        os.set_blocking(self.r, False)
        asyncio.get_running_loop().add_reader(self.r, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.r, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        try:
            os.write(self.dst, data)   # our own terminal: a blocking write is fine
        except OSError:
            pass

    def close(self) -> None:
        for attr in ("w", "r"):
            fd = getattr(self, attr)
            if fd >= 0:
                if attr == "r":
                    asyncio.get_running_loop().remove_reader(fd)
                os.close(fd)
                setattr(self, attr, -1)
        if not self._eof.done():
            self._eof.set_result(None)

    async def done(self) -> None:
        # Every writer died with the sandbox: EOF is due; bounded anyway.
        try:
            await asyncio.wait_for(asyncio.shield(self._eof), 5)
        except asyncio.TimeoutError:
            pass
        self.close()


def _plain_stdio() -> tuple[tuple[int, int, int], list]:
    fds, copies = [0], []
    for fd in (1, 2):
        if os.isatty(fd):
            c = _Copy(fd)
            copies.append(c)
            fds.append(c.w)
        else:
            fds.append(fd)
    return (fds[0], fds[1], fds[2]), copies


async def _wait(box) -> int:
    from .. import ContainerExitError, SandboxError
    try:
        await box.monitor()
        return 0
    except ContainerExitError as e:
        return e.exit_code
    except SandboxError as e:
        raise Failure(str(e))


def _apply_hosts(box, o) -> None:
    if not (o["allow"] or o["deny"]):
        return
    setter = getattr(box, "_set_host_lists", None)
    if setter is None:
        raise Failure("--allow-host/--deny-host need the outbound proxy, which this build lacks")
    setter(allowed=o["allow"] or None, denied=o["deny"])
