"""Small file-writing helpers shared by the writers of checkpoints, maps and embeddings."""

from __future__ import annotations

import os


def shared_file_mode() -> int:
    """The mode ``open()`` gives a new file under the current umask (usually 0644).

    Atomic writers create their temporary file with ``mkstemp`` (0600); outputs renamed into place
    from it would stay private to the writer, so they are set to this first.
    """
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
