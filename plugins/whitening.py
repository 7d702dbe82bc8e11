"""BERT-whitening: ``x' = (x - mu) W`` with ``W = U Lambda^(-1/2)`` from the SVD of the covariance.

Makes one model's embeddings isotropic (zero mean, identity covariance); keeping the top ``k``
directions also reduces the dimension. A single-space map: it has a source model but no target.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from dualenc.plugins.checks import as_matrix
from dualenc.plugins.mapfile import MapMeta, ModelId
from dualenc.plugins.maps import EmbeddingMap, Modality


class Whitening(EmbeddingMap):
    kind: ClassVar[str] = "whitening"

    def __init__(self, mean: torch.Tensor, w: torch.Tensor, meta: MapMeta) -> None:
        super().__init__(meta)
        self.mean = mean  # (d,)
        self.w = w  # (d, k)

    @property
    def out_dim(self) -> int:
        return int(self.w.shape[1])

    def _apply(self, x: torch.Tensor, modality: Modality) -> torch.Tensor:
        # One transform for any modality: it was fitted on whatever embeddings it was given.
        return (x - self.mean.to(x.device, x.dtype)) @ self.w.to(x.device, x.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "W": self.w}

    @classmethod
    def from_tensors(cls, meta: MapMeta, tensors: dict[str, torch.Tensor]) -> "Whitening":
        return cls(tensors["mean"], tensors["W"], meta)

    @classmethod
    def fit_embeddings(cls, source: Any, target: Any = None, modality: str = "image", **kwargs: Any) -> "Whitening":
        """CLI entry: whiten the ``modality`` embeddings of an ``EmbeddingSet``."""
        if target is not None:
            raise ValueError("whitening is fitted on one model's embeddings; give no target")
        return fit_whitening(source.get(modality), source=source.model, **kwargs)


def fit_whitening(x: torch.Tensor, k: int | None = None, *, source: ModelId | str | None = None,
                  rel_eps: float = 1e-10, dtype: torch.dtype = torch.float64) -> Whitening:
    """Fit on (n, d) embeddings. ``k`` keeps the top-k directions (default all ``d``).

    Centred data spans at most ``n - 1`` directions; asking for more (too few samples for the
    dimension) raises rather than dividing by near-zero eigenvalues.
    """
    x = as_matrix(x, "embeddings to whiten", dtype)
    n, d = x.shape
    k = d if k is None else k
    if not 1 <= k <= d:
        raise ValueError(f"k must be in [1, {d}], got {k}")
    if n - 1 < k:
        raise ValueError(f"whitening {k} directions needs more than {k} embeddings; got {n} (centred, they span at "
                         f"most {n - 1} directions). Pass k <= {max(1, n - 1)} or use more embeddings")
    mu = x.mean(0)
    cov = (x - mu).T @ (x - mu) / (n - 1)
    u, s, _ = torch.linalg.svd(cov)  # symmetric PSD: U holds the eigenvectors, s the eigenvalues (descending)
    if s[k - 1] <= rel_eps * s[0]:
        raise ValueError(f"the embeddings are degenerate: eigenvalue {k} of the covariance is {float(s[k - 1]):.3g} "
                         f"(top {float(s[0]):.3g}); whiten fewer directions (k < {k})")
    w = u[:, :k] / s[:k].sqrt()
    name = source if isinstance(source, str) else (source.name if source else "source")
    fp = source.fingerprint if isinstance(source, ModelId) else None
    meta = MapMeta(kind=Whitening.kind, source=ModelId(name, d, fp), target=ModelId(f"{name}+whitened{k}", k, None),
                   anchors=n, extra={"method": "bert-whitening", "k": k})
    return Whitening(mu, w, meta)
