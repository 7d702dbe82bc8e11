"""Fitted maps on disk: safetensors + string metadata (which models, dims, anchors, date), written atomically.

The metadata is what lets a map refuse to be applied to embeddings of the wrong model: every map
records the name, dimension and (when known) weight fingerprint of its source and target models.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dualenc.fileio import shared_file_mode

MAP_FORMAT = "dualenc-map/1"


class MapMismatchError(ValueError):
    """A map was given embeddings (or a model) other than the ones it was fitted for."""


@dataclass(frozen=True)
class ModelId:
    """Who made some embeddings: a readable name, the embedding size, and a weight fingerprint if known."""

    name: str
    dim: int | None = None
    fingerprint: str | None = None


def fingerprint_module(module: nn.Module) -> str:
    """A short hash of a module's weights (names, shapes, dtypes, values): two trainings never collide."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def fingerprint_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


@dataclass
class MapMeta:
    """Everything a map file says about itself besides its tensors."""

    kind: str  # registry name of the map class (procrustes, whitening, vec2vec, ...)
    source: ModelId
    target: ModelId | None  # None for single-space maps (whitening)
    anchors: int  # how many embeddings (pairs, for paired fits) the map was fitted on
    fit_date: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific, JSON-serializable

    def to_strings(self) -> dict[str, str]:
        out = {"format": MAP_FORMAT, "kind": self.kind, "anchors": str(self.anchors), "fit_date": self.fit_date,
               "extra": json.dumps(self.extra, sort_keys=True)}
        for side, mid in (("source", self.source), ("target", self.target)):
            if mid is not None:
                out[side] = mid.name
                out[f"{side}_dim"] = "" if mid.dim is None else str(mid.dim)
                out[f"{side}_fingerprint"] = mid.fingerprint or ""
        return out

    @classmethod
    def from_strings(cls, meta: dict[str, str], path: str = "map") -> "MapMeta":
        if meta.get("format") != MAP_FORMAT:
            raise ValueError(f"{path}: not a dualenc map (format {meta.get('format')!r}, expected {MAP_FORMAT!r})")

        def mid(side: str) -> ModelId | None:
            if side not in meta:
                return None
            dim = meta.get(f"{side}_dim") or None
            return ModelId(meta[side], int(dim) if dim else None, meta.get(f"{side}_fingerprint") or None)

        source = mid("source")
        if source is None:
            raise ValueError(f"{path}: map metadata has no source model")
        return cls(kind=meta["kind"], source=source, target=mid("target"), anchors=int(meta["anchors"]),
                   fit_date=meta["fit_date"], extra=json.loads(meta.get("extra") or "{}"))


def check_model(expected: ModelId, given: ModelId | str | None, role: str) -> None:
    """Raise ``MapMismatchError`` unless ``given`` can be the model ``expected`` names.

    Fingerprints decide when both sides have one; otherwise names; dimensions always when known.
    """
    if given is None:
        return
    if isinstance(given, str):
        given = ModelId(given)
    if expected.dim is not None and given.dim is not None and expected.dim != given.dim:
        raise MapMismatchError(f"this map's {role} is {expected.name!r} with {expected.dim}-dim embeddings, "
                               f"but it was given {given.name!r} with {given.dim}-dim embeddings")
    if expected.fingerprint and given.fingerprint:
        if expected.fingerprint != given.fingerprint:
            raise MapMismatchError(f"this map was fitted for {role} {expected.name!r} (weights {expected.fingerprint}) "
                                   f"but is applied to {given.name!r} (weights {given.fingerprint}): a different "
                                   "model; fit a map for this model instead")
        return
    if expected.name != given.name:
        raise MapMismatchError(f"this map was fitted for {role} {expected.name!r}, not {given.name!r} (no weight "
                               "fingerprint to compare, so the names must match)")


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write via a temporary file in the same folder and ``os.replace``: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, shared_file_mode())  # mkstemp makes 0600; maps are shared like any output
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def save_map(path: str | Path, meta: MapMeta, tensors: dict[str, torch.Tensor]) -> Path:
    return write_safetensors(path, tensors, meta.to_strings())


def read_map(path: str | Path) -> tuple[MapMeta, dict[str, torch.Tensor]]:
    tensors, strings = read_safetensors(path)
    return MapMeta.from_strings(strings, str(path)), tensors


def replace_meta(meta: MapMeta, **changes: Any) -> MapMeta:
    return dataclasses.replace(meta, **changes)
