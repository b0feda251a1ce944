"""The ``eptlab`` command. ``main(argv) -> int`` is the one place that turns errors into a
message and an exit status: 2 for bad arguments, 3 where this processor has no usable RTM (an
experiment that needs it reports itself unavailable), 1 for other eptlab errors."""

from __future__ import annotations

import sys

import typer

from ..errors import RTM_UNAVAILABLE_STATUS, EptlabError, RtmUnavailable
from .app import app


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        result = app(args, prog_name="eptlab", standalone_mode=False)
    except typer.TyperException as exc:  # usage errors: bad option, bad value, missing one
        if type(exc).__name__ == "NoArgsIsHelpError":
            print(exc.format_message(), file=sys.stderr)
            return 0
        ctx = getattr(exc, "ctx", None)
        command = ctx.command_path if ctx is not None else "eptlab"
        print(f"{command}: error: {exc.format_message()}", file=sys.stderr)
        return int(exc.exit_code)
    except typer.Abort:
        print("eptlab: aborted", file=sys.stderr)
        return 130
    except typer.Exit as exc:
        return int(exc.exit_code)
    except RtmUnavailable as exc:
        print(f"eptlab: unavailable: {exc}", file=sys.stderr)
        return RTM_UNAVAILABLE_STATUS
    except EptlabError as exc:
        print(f"eptlab: error: {exc}", file=sys.stderr)
        return 1
    return int(result) if isinstance(result, int) else 0


def run() -> None:
    """Console-script entry point."""
    raise SystemExit(main())


__all__ = ["app", "main", "run", "typer"]
