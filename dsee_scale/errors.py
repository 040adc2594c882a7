"""User-facing errors: one clear line, exit code 2, never a traceback.

Anything the user can fix (a config key, a path, a checkpoint) raises `UserError`.
`cli_main` turns it into `error: <message>` on stderr and exit code 2.
"""
from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """A problem with the user's input (config, data, checkpoint, CLI)."""


class ConfigError(UserError):
    """A bad experiment / DSEE config value: names the key and what is allowed."""


def cli_main(main):
    """Decorate a launcher's main(): UserError -> one line on stderr, exit 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            msg = " ".join(str(e).split())  # one line, whatever the message held
            print(f"error: {msg}", file=sys.stderr)
            sys.exit(2)

    return wrapper
