"""Small file-writing helpers shared by the writers of checkpoints, maps, embeddings and exports."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def shared_file_mode() -> int:
    """The mode ``open()`` gives a new file under the current umask (usually 0644).

    Atomic writers create their temporary file with ``mkstemp`` (0600); outputs renamed into place
    from it would stay private to the writer, so they are set to this first.
    """
    return 0o666 & ~_umask()


@contextlib.contextmanager
def staged_directory(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``out_dir``; on success it replaces ``out_dir`` by renames.

    A crash never leaves a half-written directory at ``out_dir`` (the old one stays until the new one
    is complete); on an error the temporary directory is removed. It gets the mode any new directory
    gets (``mkdtemp`` makes 0700, private to the writer).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)  # left over from an interrupted replace
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
