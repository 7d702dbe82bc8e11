"""Small file-writing helpers shared by the writers of checkpoints, maps, embeddings and exports."""

from __future__ import annotations

import contextlib
import json
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
        if out_dir.exists():
            # Move the old one aside first, and back if the swap fails: never neither in place.
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)  # left over from an interrupted replace
            os.replace(out_dir, old)
            try:
                os.replace(tmp, out_dir)
            except OSError:
                os.replace(old, out_dir)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in ``path`` durable; not possible on every platform, so best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: str | os.PathLike, obj: object, *, indent: int = 2, sort_keys: bool = True) -> Path:
    """Write ``obj`` as JSON via a temporary file + ``os.replace``: readers never see half a file.

    The temporary name is unique (``mkstemp``), so two writers never share it; the file gets the
    mode a plain ``open()`` would give it. Missing parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent, sort_keys=sort_keys)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, shared_file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path
