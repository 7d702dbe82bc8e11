"""One error type for problems the user caused (a missing file, an unknown name, a bad value).

Every command prints such an error as one or two lines naming the problem and the fix, exits 2 and
shows no traceback (``--debug`` or ``DUALENC_DEBUG=1`` shows it). Library code raises ``UserError``
(or a subclass) wherever the fix is in the user's hands; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with what the user gave; the message says what is wrong and how to fix it."""
