"""One error type for problems the user caused (a missing file, an unknown name, a bad value).

Every command prints such an error as one or two lines naming the problem and the fix, exits 2 and
shows no traceback (``--debug`` or ``DUALENC_DEBUG=1`` shows it). Library code raises ``UserError``
(or a subclass) wherever the fix is in the user's hands; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Callable


class UserError(Exception):
    """A problem with what the user gave; the message says what is wrong and how to fix it."""


class ConfigError(UserError, ValueError):
    """A bad value in a config or on the command line (still a ``ValueError`` for existing callers)."""


class IncompleteFileError(UserError, ValueError):
    """A file that was cut short (e.g. a checkpoint written by a killed run)."""


# Besides UserError, errors that are the user's by their nature: a path given that is not there.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, FileExistsError, NotADirectoryError,
                                                IsADirectoryError, PermissionError)
DEBUG_ENV = "DUALENC_DEBUG"


def debug_wanted() -> bool:
    """Whether tracebacks of user errors are wanted (``DUALENC_DEBUG=1``, which ``--debug`` sets)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def pop_debug(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug``, and whether tracebacks are wanted (``--debug`` or ``DUALENC_DEBUG=1``).

    ``--debug`` also sets ``DUALENC_DEBUG=1``, so nested commands with their own handlers see it.
    """
    if "--debug" in argv:
        os.environ[DEBUG_ENV] = "1"
    return [a for a in argv if a != "--debug"], debug_wanted()


def message(err: BaseException) -> str:
    """The error's text; a KeyError's own quotes are dropped, and so is the worker's traceback torch
    puts into the text of an error it re-raises from a DataLoader worker."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        found = list(re.finditer(rf"^(?:[\w.]+\.)?{type(err).__name__}: ", text, re.MULTILINE))
        if found:
            text = text[found[-1].end():].strip()
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    return text


def run_guarded(prog: str, fn: Callable[[], int], debug: bool,
                extra: tuple[type[BaseException], ...] = ()) -> int:
    """``fn()``; a user error (``USER_ERRORS`` + ``extra``) prints one line on stderr and gives exit code 2.

    With ``debug`` the error propagates with its traceback.
    """
    try:
        return fn()
    except USER_ERRORS + extra as e:
        if debug:
            raise
        print(f"{prog}: error: {message(e)}", file=sys.stderr)  # --help says how to see the traceback
        return 2
