"""The `sandbox` click group and what every command shares (SPEC §7, §10 "CLI").

Commands live in their own modules (run, serve and its clients, gc, images)
and register on `cli`; `sandbox/cli/__init__.py` imports them all, so nothing
here imports a command module (no import cycle).
"""
from __future__ import annotations

import click

from ..log import configure


class Failure(Exception):
    """A runtime failure reported as one line with an exit code."""

    def __init__(self, msg: str, code: int = 125):
        super().__init__(msg)
        self.code = code


def env_pairs(values) -> dict[str, str]:
    env = {}
    for v in values:
        if "=" not in v or v.startswith("="):
            raise click.BadParameter(f"--env expects K=V, got {v!r}")
        k, val = v.split("=", 1)
        env[k] = val
    return env


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--state-dir", default="/run/sandbox", show_default=True, help="runtime state directory")
@click.option("--log-format", type=click.Choice(["console", "json"]), default=None,
              help="log format (default: console on a TTY, JSON otherwise)")
@click.option("--debug", is_flag=True, help="debug logs and tracebacks")
@click.pass_context
def cli(ctx, state_dir, log_format, debug):
    """A low-level Linux sandbox runtime."""
    ctx.obj = {"state_dir": state_dir, "debug": debug}
    configure(log_format or "auto", debug=debug)
