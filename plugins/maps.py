"""The common shape of a fitted embedding map, and loading any map file with one call."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from dualenc.plugins.mapfile import MapMeta, MapMismatchError, ModelId, check_model, read_map, save_map

Modality = Literal["image", "text"]


class EmbeddingMap:
    """A map from one model's embedding space to another's (or to a transformed copy of the same).

    Subclasses set ``kind`` (their registry name), implement ``_apply`` and ``tensors``/``from_tensors``.
    ``apply`` checks the input's dimension (and, given ``source``, the model) before mapping.
    """

    kind: ClassVar[str]

    def __init__(self, meta: MapMeta) -> None:
        self.meta = meta

    # -- subclass API --------------------------------------------------------------------------------
    def _apply(self, x: torch.Tensor, modality: Modality) -> torch.Tensor:
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def from_tensors(cls, meta: MapMeta, tensors: dict[str, torch.Tensor]) -> "EmbeddingMap":
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------------
    @property
    def source_dim(self) -> int:
        assert self.meta.source.dim is not None
        return self.meta.source.dim

    def check(self, source: ModelId | str | None = None, target: ModelId | str | None = None) -> None:
        """Raise ``MapMismatchError`` if ``source``/``target`` are not the models this map was fitted for."""
        check_model(self.meta.source, source, "source")
        if self.meta.target is not None:
            check_model(self.meta.target, target, "target")

    @torch.no_grad()
    def apply(self, x: torch.Tensor, modality: Modality = "image", *, source: ModelId | str | None = None,
              normalize: bool = False) -> torch.Tensor:
        """Map (N, source_dim) embeddings of ``modality``; ``normalize`` L2-normalizes the result."""
        if modality not in ("image", "text"):
            raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
        self.check(source=source)
        if x.ndim != 2 or x.shape[-1] != self.source_dim:
            raise MapMismatchError(f"this {self.kind} map takes {self.source_dim}-dim embeddings from "
                                   f"{self.meta.source.name!r}; got shape {tuple(x.shape)} "
                                   "(embeddings of another model?)")
        if not torch.isfinite(x).all():
            raise ValueError("input embeddings contain NaN or inf")
        y = self._apply(x, modality)
        return torch.nn.functional.normalize(y, dim=-1) if normalize else y

    def apply_image(self, x: torch.Tensor, **kw: Any) -> torch.Tensor:
        return self.apply(x, "image", **kw)

    def apply_text(self, x: torch.Tensor, **kw: Any) -> torch.Tensor:
        return self.apply(x, "text", **kw)

    def save(self, path: str | Path) -> Path:
        return save_map(path, self.meta, self.tensors())


def load_map(path: str | Path, *, source: ModelId | str | None = None,
             target: ModelId | str | None = None) -> EmbeddingMap:
    """Load any map file; given ``source``/``target``, check they are the models it was fitted for."""
    from dualenc.plugins.registry import PLUGINS

    meta, tensors = read_map(path)
    cls = PLUGINS.get(meta.kind)
    if not hasattr(cls, "from_tensors"):
        raise TypeError(f"{path}: plugin {meta.kind!r} ({cls!r}) cannot load map files")
    m = cls.from_tensors(meta, tensors)
    m.check(source=source, target=target)
    return m


__all__ = ["EmbeddingMap", "MapMismatchError", "Modality", "load_map"]
