"""Checkpoint files: written atomically beside their final name, and checked before they are loaded.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file lives in
the system temp folder; committing it is a copy across file systems (not atomic: a kill during it
leaves half a ``last.ckpt``) and the copy keeps mkstemp's 0600 mode. ``AtomicCheckpointIO`` writes
a temporary file in the checkpoint's own folder, fsyncs it and renames it into place.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from dualenc.errors import IncompleteFileError
from dualenc.fileio import shared_file_mode


def _is_local(path: str | os.PathLike) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to a temporary file in ``path``'s folder, fsync, then rename onto ``path``."""
    path = Path(str(path).removeprefix("file://"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, shared_file_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def earlier_checkpoints(path: str | os.PathLike) -> list[Path]:
    """Intact ``*.ckpt`` files beside ``path`` (not ``path`` itself), newest first."""
    path = Path(path)
    others = [p for p in path.parent.glob("*.ckpt") if p.resolve() != path.resolve() and p.is_file()]
    return sorted((p for p in others if incomplete_reason(p) is None), key=lambda p: p.stat().st_mtime, reverse=True)


def incomplete_reason(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a whole torch checkpoint (``None`` if it is), without loading its tensors.

    torch writes a zip archive whose central directory comes last, so a file cut short at any point
    lacks it; opening the archive reads only that directory.
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    try:
        with zipfile.ZipFile(path) as z:
            z.infolist()
    except (zipfile.BadZipFile, OSError, EOFError):
        return f"is truncated or not a torch checkpoint ({size} bytes, no complete zip archive)"
    return None


def check_checkpoint(path: str | os.PathLike) -> None:
    """Raise ``IncompleteFileError`` naming ``path`` and an earlier intact checkpoint if it is not whole."""
    if not _is_local(path):
        return
    path = Path(str(path).removeprefix("file://"))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; check --ckpt_path")
    reason = incomplete_reason(path)
    if reason is None:
        return
    earlier = earlier_checkpoints(path)
    hint = (f"resume from the newest intact one beside it: --ckpt_path {earlier[0]}" if earlier
            else "no intact checkpoint is beside it; start without --ckpt_path")
    raise IncompleteFileError(f"checkpoint {path} {reason}: it is incomplete (a run killed while saving?); {hint}")


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` after ``check_checkpoint``."""
    check_checkpoint(path)
    return torch.load(path, map_location=map_location, weights_only=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes local checkpoints atomically (see the module docstring) and
    names an incomplete checkpoint, with an earlier one to use, instead of torch's zip or EOF error."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        save_atomic(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Callable | None = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        check_checkpoint(path)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
