"""Embedding files: a model's image/text embeddings (+ sample keys) with the model's identity.

Formats read: ``.safetensors`` (tensors ``image``/``text``, or a single tensor; metadata from
``save_embeddings``), ``.npz`` (arrays ``image``/``text``/``keys``) and ``.npy`` (one matrix). NumPy
files are read with ``allow_pickle=False``. Files without metadata get their model name from the
caller (or the file name) and no fingerprint.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dualenc.fileio import shared_file_mode
from dualenc.plugins.mapfile import ModelId, read_safetensors, write_safetensors

EMB_FORMAT = "dualenc-embeddings/1"
MODALITIES = ("image", "text")


@dataclass
class EmbeddingSet:
    """Named (N, D) matrices from one model; ``keys`` (optional) name the rows."""

    arrays: dict[str, torch.Tensor]
    model: ModelId
    keys: list[str] | None = None
    source_path: str | None = field(default=None, compare=False)

    def maybe(self, modality: str) -> torch.Tensor | None:
        if modality in self.arrays:
            return self.arrays[modality]
        if len(self.arrays) == 1 and "embeddings" in self.arrays:  # a bare matrix serves any modality
            return self.arrays["embeddings"]
        return None

    def get(self, modality: str) -> torch.Tensor:
        x = self.maybe(modality)
        if x is None:
            raise KeyError(f"{self.source_path or 'embedding set'} has no {modality!r} embeddings "
                           f"(it has: {', '.join(self.arrays) or 'nothing'})")
        return x

    def index(self) -> dict[str, int]:
        if self.keys is None:
            raise ValueError(f"{self.source_path or 'embedding set'} has no sample keys to look rows up by")
        return {k: i for i, k in enumerate(self.keys)}


def save_embeddings(path: str | Path, arrays: dict[str, torch.Tensor], model: ModelId,
                    keys: list[str] | None = None) -> Path:
    """Write a ``.safetensors`` embedding file (atomic), carrying the model's name/dim/fingerprint."""
    rows = {int(v.shape[0]) for v in arrays.values()}
    if keys is not None and rows and rows != {len(keys)}:
        raise ValueError(f"{len(keys)} keys for matrices with {sorted(rows)} rows")
    meta = {"format": EMB_FORMAT, "model": model.name, "dim": str(model.dim or ""),
            "fingerprint": model.fingerprint or ""}
    if keys is not None:
        meta["keys"] = json.dumps(list(keys))
    return write_safetensors(path, {k: v.float() for k, v in arrays.items()}, meta)


def load_embeddings(path: str | Path, model: str | None = None) -> EmbeddingSet:
    """Read an embedding file; ``model`` names the model when the file does not (npy/npz/foreign)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"embedding file {str(p)!r} does not exist")
    keys = None
    fingerprint = None
    name = model
    if p.suffix == ".safetensors":
        arrays, meta = read_safetensors(p)
        if meta.get("format") == EMB_FORMAT:
            name = model or meta.get("model") or None
            fingerprint = meta.get("fingerprint") or None
            keys = json.loads(meta["keys"]) if "keys" in meta else None
        if set(arrays) - set(MODALITIES) and len(arrays) == 1:
            arrays = {"embeddings": next(iter(arrays.values()))}
    elif p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: torch.from_numpy(np.array(z[k])) for k in z.files if k != "keys"}
            keys = [str(k) for k in z["keys"]] if "keys" in z.files else None
        if set(arrays) - set(MODALITIES) and len(arrays) == 1:
            arrays = {"embeddings": next(iter(arrays.values()))}
    elif p.suffix == ".npy":
        arrays = {"embeddings": torch.from_numpy(np.load(p, allow_pickle=False))}
    else:
        raise ValueError(f"{p}: unknown embedding file type {p.suffix!r} (use .safetensors, .npz or .npy)")
    for k, v in arrays.items():
        if v.ndim != 2 or not v.is_floating_point():
            raise ValueError(f"{p}: {k!r} must be a 2-D float matrix, got {tuple(v.shape)} {v.dtype}")
    dims = {int(v.shape[1]) for v in arrays.values()}
    if len(dims) != 1:
        raise ValueError(f"{p}: image and text embeddings have different dims {sorted(dims)}")
    if keys is not None and any(v.shape[0] != len(keys) for v in arrays.values()):
        raise ValueError(f"{p}: {len(keys)} keys but matrices of {[v.shape[0] for v in arrays.values()]} rows")
    mid = ModelId(name or p.stem, dims.pop(), fingerprint)
    return EmbeddingSet(arrays, mid, keys, str(p))


def save_npy_atomic(path: str | Path, x: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npy", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, x, allow_pickle=False)
        os.chmod(tmp, shared_file_mode())  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
