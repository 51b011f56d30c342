"""`sandbox gc` (SPEC §7): remove what dead runtimes left behind.

Only the group is imported at the top; everything else is imported when
the command runs.
"""
from __future__ import annotations

import os

import click

from .group import cli


@cli.command("gc")
@click.pass_context
def gc_command(ctx):
    """Remove the kernel objects and state of runtimes that died.

    Scans /run/sandbox and --state-dir. Safe to run at any time: a live
    runtime's objects are never touched. Prints one line per removed object.
    """
    from .. import gc as _gc
    from .group import Failure

    if os.geteuid() != 0:
        raise Failure("sandbox gc must run as root")
    obj = ctx.obj or {}
    dirs = [_gc.DEFAULT_STATE_DIR]
    if obj.get("state_dir"):
        dirs.append(obj["state_dir"])
    report = _gc.collect(dirs)
    for removed in report.removed:
        click.echo(f"{removed.verb} {removed}")
    for problem in report.problems:
        click.echo(f"sandbox gc: skipped unreadable record {problem}", err=True)
    if report.errors:
        more = f" (and {len(report.errors) - 1} more)" if len(report.errors) > 1 else ""
        raise Failure(f"gc: {report.errors[0]}{more}")
    if not report.removed:
        click.echo("nothing to collect")
