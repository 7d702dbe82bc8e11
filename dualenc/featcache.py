"""A locked tower's features, computed once per distinct input and reused (LiT training).

A locked tower maps the same pixels (or token ids) to the same features, so its forward pass is
wasted work after the first epoch. The cache is addressed by the content of what the tower sees (a
digest of each input row: a normalized image, or token ids with their mask), under a fingerprint of
the tower's weights and code: a hit is the same computation by construction, whatever the sample
keys, sources or ranks. With random augmentation every view is new and nothing hits (correct, only
not faster): train LiT with ``augment: false`` to profit, which is the trade-off the cache makes.

The table lives in memory and is saved per rank as safetensors (``<dir>/<fingerprint>/rank<R>``,
atomically) at the end of each training epoch, so later runs with the same tower start warm.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from dualenc.fileio import shared_file_mode

DIGEST = 16  # bytes of blake2b per image: collisions are out of reach (2^-64 for 4 billion images)


def tower_fingerprint(tower: nn.Module) -> str:
    """A digest of the tower's class, buffers and parameters (names, dtypes, shapes and values)."""
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{type(tower).__module__}.{type(tower).__qualname__}".encode())
    for name, t in sorted(tower.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def image_digests(*inputs: torch.Tensor) -> list[bytes]:
    """One content digest per row of a batch (the exact bytes, dtypes and shapes of all ``inputs``)."""
    cpus = [x.detach().cpu().contiguous() for x in inputs]
    head = "|".join(f"{x.dtype}:{tuple(x.shape[1:])}" for x in cpus).encode()
    out = []
    for i in range(cpus[0].shape[0]):
        h = hashlib.blake2b(head, digest_size=DIGEST)
        for x in cpus:
            h.update(x[i].reshape(-1).view(torch.uint8).numpy().tobytes())
        out.append(h.digest())
    return out


class FeatureCache:
    """Input digest -> pooled features of one locked tower.

    Args:
        directory: where tables are saved and found again (``None``: memory only).
        fingerprint: the tower's (``tower_fingerprint``); tables of other towers are never read.
    """

    def __init__(self, directory: str | os.PathLike | None, fingerprint: str) -> None:
        self.fingerprint = fingerprint
        self.folder = Path(directory) / fingerprint if directory is not None else None
        self.table: dict[bytes, torch.Tensor] = {}
        self.hits = self.misses = 0
        self._saved = 0
        if self.folder is not None and self.folder.is_dir():
            for f in sorted(self.folder.glob("rank*.safetensors")):
                self._load(f)
            self._saved = len(self.table)

    def _load(self, path: Path) -> None:
        from safetensors.torch import load_file

        t = load_file(str(path))
        for d, row in zip(t["digests"], t["features"]):
            self.table[d.numpy().tobytes()] = row

    @torch.no_grad()
    def features(self, tower: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        """``tower(*inputs)`` in eval mode, computing only the rows not seen before."""
        keys = image_digests(*inputs)
        missing = [i for i, k in enumerate(keys) if k not in self.table]
        if missing:
            was_training = tower.training
            tower.eval()  # no dropout / drop-path: the cached value must be the deterministic one
            fresh = tower(*(x[missing] for x in inputs)).float().cpu()
            tower.train(was_training)
            for i, row in zip(missing, fresh):
                self.table[keys[i]] = row
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        return torch.stack([self.table[k] for k in keys]).to(inputs[0].device)

    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def save(self, rank: int = 0) -> Path | None:
        """Write the table (this rank's) atomically if it grew since the last save or load."""
        if self.folder is None or len(self.table) == self._saved:
            return None
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        digests = torch.frombuffer(bytearray(b"".join(self.table)), dtype=torch.uint8).view(-1, DIGEST)
        tensors = {"digests": digests, "features": torch.stack(list(self.table.values()))}
        out = self.folder / f"rank{rank}.safetensors"
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=self.folder)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"fingerprint": self.fingerprint})
            os.chmod(tmp, shared_file_mode())
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._saved = len(self.table)
        return out
