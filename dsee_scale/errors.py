"""User-facing errors: one clear line, exit code 2, never a traceback.

Anything the user can fix (a config key, a path, a checkpoint) raises `UserError`.
`cli_main` turns it into `error: <message>` on stderr and exit code 2.
A run that starts but cannot go on (`RunStopped`, e.g. a diverged loss) is one line and exit 3.
"""

from __future__ import annotations

import functools
import os
import sys


class UserError(Exception):
    """A problem with the user's input (config, data, checkpoint, CLI)."""


class ConfigError(UserError):
    """A bad experiment / DSEE config value: names the key and what is allowed."""


class RunStopped(Exception):
    """A run that started but cannot go on (e.g. non-finite loss K steps in a row)."""


def cli_main(main):
    """Decorate a launcher's main(): UserError -> one line on stderr, exit 2; RunStopped -> exit 3."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (UserError, RunStopped) as e:
            msg = " ".join(str(e).split())  # one line, whatever the message held
            print(f"error: {msg}", file=sys.stderr)
            if isinstance(e, UserError):
                sys.exit(2)
            # RunStopped: the process group is down and the files are written; leave as after a
            # finished run, without the teardown that C++ threads can abort
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(3)

    return wrapper
