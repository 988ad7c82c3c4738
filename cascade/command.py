"""The one command boundary of ``cascade``, ``peer`` and ``tracker``: parse, run, one line, one exit code.

Every command builds its parser on :class:`OneLineErrorParser` and runs
through :func:`run_command`, the single place where a project error becomes
one line on stderr (``WHERE: error: MESSAGE``) and an exit code. No user ever
sees a traceback for a :class:`~cascade.errors.CascadeError`.

Exit codes, the same for the three commands (README "Exit codes"):

====  =====================================================================
0     success; a server (``tracker run``, ``peer seed``, ``peer fetch --seed``)
      stopped by SIGINT or SIGTERM is a success too
1     the operation failed: a fetch that did not complete, ``cascade verify``
      that found missing or corrupt data, a server that could not start, a
      file that cannot be read or written, a tracker that refused or cannot
      be reached
2     bad usage: an unknown option, a command-line value that is invalid
      (:class:`~cascade.errors.UsageError`)
130   a one-shot command interrupted by Ctrl-C (SIGINT), as a shell reports it
====  =====================================================================

Pure: argparse and ``print``; the commands' own I/O stays in ``peer/`` and ``tracker/``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from cascade.errors import CascadeError, Interrupted, UsageError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2  # argparse's own status for a bad command line
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell shows for a command killed by Ctrl-C


class OneLineErrorParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (the usage stays in ``--help``).

    Subparsers made with ``add_subparsers`` are of this class too.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def exit_code(exc: CascadeError) -> int:
    """The exit code for a project error that ended a command: 2 for bad usage, else 1."""
    return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_FAILED


def error_line(where: str, exc: BaseException | str) -> str:
    """``WHERE: error: MESSAGE``, on one line whatever the message holds."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    return f"{where}: error: {message}"


def run_command(
    prog: str,
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    run: Callable[[argparse.Namespace], int],
    *,
    name_subcommand: bool = True,
    interrupted: int = EXIT_INTERRUPTED,
) -> int:
    """Parse ``argv``, call ``run(args)`` and turn what escapes it into one line and an exit code.

    The line names ``prog`` and, with ``name_subcommand``, ``args.command``
    (``peer fetch: error: ...``). ``interrupted`` is the code for a Ctrl-C or
    SIGTERM that reaches here: 130 for a one-shot command (with the line
    ``PROG: interrupted``), 0 for a server (stopping it is how it ends).
    ``--help`` and ``--version`` exit 0 and a bad command line 2, as argparse
    does. An ``OSError`` no layer translated is still one line and 1. Returns
    the exit code; what is neither escapes (a bug, with its traceback).
    """
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version or a usage error, already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    where = f"{prog} {args.command}" if name_subcommand else prog
    try:
        return run(args)
    except (KeyboardInterrupt, Interrupted):
        if interrupted != EXIT_OK:
            print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return interrupted
    except CascadeError as exc:
        print(error_line(where, exc), file=sys.stderr, flush=True)
        return exit_code(exc)
    except OSError as exc:
        file = f"{exc.filename}: " if exc.filename else ""
        print(error_line(where, f"{file}{exc.strerror or exc}"), file=sys.stderr, flush=True)
        return EXIT_FAILED
