"""The `sandbox` binary (SPEC §7, §10 "CLI"): the click group (group.py) and
one module per command family, each registering on the group."""
from __future__ import annotations

import sys

import click

from . import gc, images, run, serve  # noqa: F401  (register their commands)
from .group import Failure, cli

__all__ = ["cli", "main", "Failure"]


def main(argv=None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="sandbox", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.Abort:
        sys.exit(130)
    except click.UsageError as e:
        msg = e.format_message().replace("\n", " ")
        print(f"sandbox: error: {msg}", file=sys.stderr)
        sys.exit(2)
    except click.ClickException as e:
        print(f"sandbox: error: {e.format_message()}", file=sys.stderr)
        sys.exit(2)
    except Failure as e:
        if debug:
            import traceback
            traceback.print_exc()
        print(f"sandbox: {e}", file=sys.stderr)
        sys.exit(e.code)
    except SystemExit:
        raise
    except BaseException as e:  # a runtime failure: one line, no traceback
        if debug:
            import traceback
            traceback.print_exc()
        msg = str(e).replace("\n", " ") or type(e).__name__
        print(f"sandbox: {type(e).__name__}: {msg}", file=sys.stderr)
        sys.exit(125)


if __name__ == "__main__":
    main()
