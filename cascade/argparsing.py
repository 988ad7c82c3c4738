"""The command-line parser of `cascade`, `tracker` and `peer`: a usage error is one line on stderr.

Kept apart from :mod:`peer.cascade_command` so a command can use it without importing
the `cascade` command's own modules.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

EXIT_USAGE = 2  # argparse's own status for a bad command line


class OneLineErrorParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (the usage stays in ``--help``).

    Subparsers made with ``add_subparsers`` are of this class too.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
