"""Checkpoint, map and lock files: atomic writes, incomplete checkpoints named, 0644 outputs, one run per folder."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dualenc.checkpoint import AtomicCheckpointIO, check_checkpoint, load_checkpoint_file
from dualenc.errors import IncompleteFileError, UserError
from dualenc.runlock import LOCK_NAME, RunDirInUse, RunLock


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def ckpts(tmp_path: Path) -> Path:
    """An intact older checkpoint and a newer ``last.ckpt`` next to it."""
    torch.save({"state_dict": {"w": torch.ones(3)}, "global_step": 2}, tmp_path / "epoch=0-step=2.ckpt")
    torch.save({"state_dict": {"w": torch.ones(3)}, "global_step": 4}, tmp_path / "last.ckpt")
    return tmp_path


def test_empty_checkpoint_is_named_with_an_earlier_one(ckpts: Path) -> None:
    # Before: torch.load raised a bare EOFError ("Ran out of input").
    last = ckpts / "last.ckpt"
    last.write_bytes(b"")
    with pytest.raises(IncompleteFileError) as err:
        load_checkpoint_file(last)
    msg = str(err.value)
    assert str(last) in msg and "empty" in msg and "incomplete" in msg
    assert f"--ckpt_path {ckpts / 'epoch=0-step=2.ckpt'}" in msg
    assert "\n" not in msg


def test_truncated_checkpoint_is_named_with_an_earlier_one(ckpts: Path) -> None:
    # Before: torch's "PytorchStreamReader failed reading zip archive: failed finding central directory".
    last = ckpts / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    with pytest.raises(IncompleteFileError, match=r"last\.ckpt is truncated.*incomplete.*epoch=0-step=2\.ckpt"):
        AtomicCheckpointIO().load_checkpoint(last)
    assert check_checkpoint(ckpts / "epoch=0-step=2.ckpt") is None  # the intact one passes


def test_incomplete_checkpoint_without_an_earlier_one(tmp_path: Path) -> None:
    (tmp_path / "last.ckpt").write_bytes(b"PK\x03\x04 cut")
    with pytest.raises(IncompleteFileError, match="no intact checkpoint is beside it"):
        check_checkpoint(tmp_path / "last.ckpt")


def test_atomic_save_keeps_the_old_file_when_a_save_dies(tmp_path: Path, monkeypatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    renames: list[tuple[str, str]] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renames.append((str(a), str(b))), real_replace(a, b)))
    io.save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 2}
    (src, dst), = renames
    assert Path(src).parent == Path(dst).parent == path.parent  # a rename in one folder: atomic

    def dies(obj, f):  # a save cut off half way (a kill, a full disk)
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(OSError, match="No space"):
        io.save_checkpoint({"step": 3}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 2}  # the previous last.ckpt is intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temp file left


def test_checkpoints_and_maps_are_0644(tmp_path: Path, umask_022) -> None:
    # Before: checkpoints (fsspec's mkstemp in /tmp, then a copy) and maps/.npy embeddings (mkstemp
    # beside them) were 0600, unreadable to the rest of a team.
    from dualenc.plugins.embeddings import save_npy_atomic
    from dualenc.plugins.mapfile import write_safetensors

    AtomicCheckpointIO().save_checkpoint({"x": 1}, tmp_path / "a.ckpt")
    write_safetensors(tmp_path / "map.safetensors", {"q": torch.eye(2)}, {"format": "x"})
    import numpy as np

    save_npy_atomic(tmp_path / "e.npy", np.zeros((2, 2), dtype=np.float32))
    for name in ("a.ckpt", "map.safetensors", "e.npy"):
        assert _mode(tmp_path / name) == 0o644, name


def test_fitted_map_file_is_0644(tmp_path: Path, umask_022) -> None:
    """The real fit -> save path of `dualenc align fit`."""
    from dualenc.plugins.embeddings import EmbeddingSet
    from dualenc.plugins.mapfile import ModelId
    from dualenc.plugins.procrustes import OrthogonalMap

    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 8, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    src = EmbeddingSet({"image": a}, ModelId("a", 8, None))
    tgt = EmbeddingSet({"image": a @ q}, ModelId("b", 8, None))
    OrthogonalMap.fit_embeddings(src, tgt, on_few_anchors="warn").save(tmp_path / "a2b.safetensors")
    assert _mode(tmp_path / "a2b.safetensors") == 0o644


# -- one run per output folder ---------------------------------------------------------------------

def test_lock_refuses_a_live_run_and_takes_over_a_dead_one(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / LOCK_NAME
        lock.write_text(f'{{"pid": {holder.pid}, "host": "{socket.gethostname()}", "started": "then"}}')
        with pytest.raises(RunDirInUse, match=rf"in use by another run \(pid {holder.pid}.*default_root_dir"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    # The holder died without cleaning up (a crash): its lock is stale and taken over.
    with RunLock(tmp_path) as mine:
        assert mine.held and f'"pid": {os.getpid()}' in (tmp_path / LOCK_NAME).read_text()
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_of_another_host_says_how_to_clear_it(tmp_path: Path) -> None:
    (tmp_path / LOCK_NAME).write_text('{"pid": 1, "host": "some-other-node", "started": "then"}')
    with pytest.raises(UserError, match=rf"some-other-node.*if that run is dead, delete {tmp_path / LOCK_NAME}"):
        RunLock(tmp_path).acquire()


def test_second_lock_in_use_and_released(tmp_path: Path) -> None:
    first = RunLock(tmp_path).acquire()
    code = ("import sys; from dualenc.runlock import RunLock, RunDirInUse\n"
            "try: RunLock(sys.argv[1]).acquire()\nexcept RunDirInUse as e: print(e); sys.exit(3)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and f"pid {os.getpid()}" in proc.stdout
    first.release()
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
