"""Closed-form orthogonal Procrustes between two models' spaces, shared by both modalities.

Following "Canonicalizing Multimodal Contrastive Representation Learning": centre both sides, take the
SVD of the cross-covariance of paired *image* anchors, ``Q = U V^T`` (semi-orthogonal when the dims
differ). Text is mapped with the same ``Q`` but its own pair of means:
``map(x) = (x - mu_source[m]) Q^T + mu_target[m]`` for modality ``m``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch

from dualenc.plugins.checks import as_matrix, check_anchor_count, check_paired
from dualenc.plugins.mapfile import MapMeta, ModelId
from dualenc.plugins.maps import EmbeddingMap, Modality


def procrustes_q(xc: torch.Tensor, yc: torch.Tensor, use_scipy: bool | None = None) -> torch.Tensor:
    """Orthogonal ``Q`` (dim_y, dim_x) minimizing ``||xc Q^T - yc||_F`` for centred, paired rows.

    ``use_scipy``: None uses ``scipy.linalg.orthogonal_procrustes`` when the dims match and scipy is
    installed, else ``torch.linalg.svd``; both give the same Q.
    """
    same = xc.shape[1] == yc.shape[1]
    if use_scipy is None:
        try:
            import scipy.linalg  # noqa: F401
        except ImportError:
            use_scipy = False
        else:
            use_scipy = same
    if use_scipy:
        if not same:
            raise ValueError("scipy.linalg.orthogonal_procrustes needs equal dims; use the torch path")
        from scipy.linalg import orthogonal_procrustes

        r, _ = orthogonal_procrustes(xc.numpy(), yc.numpy())  # xc @ r ~ yc, so Q = r^T
        return torch.from_numpy(r.T.copy()).to(xc.dtype)
    u, _, vh = torch.linalg.svd(yc.T @ xc, full_matrices=False)  # cross-covariance (dim_y, dim_x)
    return u @ vh


class OrthogonalMap(EmbeddingMap):
    """``Q`` plus per-modality source/target means. ``inverse()`` maps back with ``Q^T``."""

    kind: ClassVar[str] = "procrustes"

    def __init__(self, q: torch.Tensor, means: dict[str, torch.Tensor], meta: MapMeta) -> None:
        super().__init__(meta)
        self.q = q
        self.means = means  # "image_source", "image_target", and optionally "text_source", "text_target"

    def _apply(self, x: torch.Tensor, modality: Modality) -> torch.Tensor:
        if f"{modality}_source" not in self.means:
            raise ValueError(f"this map has no {modality} means: fit it with source_{modality}/target_{modality} "
                             f"embeddings (each modality is centred with its own means)")
        q = self.q.to(x.device, x.dtype)
        mu_s = self.means[f"{modality}_source"].to(x.device, x.dtype)
        mu_t = self.means[f"{modality}_target"].to(x.device, x.dtype)
        return (x - mu_s) @ q.T + mu_t

    def inverse(self) -> "OrthogonalMap":
        means = {}
        for m in ("image", "text"):
            if f"{m}_source" in self.means:
                means[f"{m}_source"], means[f"{m}_target"] = self.means[f"{m}_target"], self.means[f"{m}_source"]
        meta = MapMeta(kind=self.kind, source=self.meta.target or self.meta.source, target=self.meta.source,
                       anchors=self.meta.anchors, fit_date=self.meta.fit_date,
                       extra=dict(self.meta.extra, inverted=not self.meta.extra.get("inverted", False)))
        return OrthogonalMap(self.q.T.contiguous(), means, meta)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"Q": self.q, **{f"mean_{k}": v for k, v in self.means.items()}}

    @classmethod
    def from_tensors(cls, meta: MapMeta, tensors: dict[str, torch.Tensor]) -> "OrthogonalMap":
        means = {k[len("mean_"):]: v for k, v in tensors.items() if k.startswith("mean_")}
        return cls(tensors["Q"], means, meta)

    @classmethod
    def fit_embeddings(cls, source: Any, target: Any, **kwargs: Any) -> "OrthogonalMap":
        """CLI entry: ``source``/``target`` are ``EmbeddingSet``s with paired image rows (and text)."""
        return fit_procrustes(source.get("image"), target.get("image"), source_text=source.arrays.get("text"),
                              target_text=target.arrays.get("text"), source=source.model, target=target.model, **kwargs)


def _model_id(given: ModelId | str | None, default: str, dim: int) -> ModelId:
    if given is None:
        return ModelId(default, dim)
    if isinstance(given, str):
        return ModelId(given, dim)
    if given.dim is not None and given.dim != dim:
        raise ValueError(f"model {given.name!r} says {given.dim}-dim embeddings but the anchors are {dim}-dim")
    return ModelId(given.name, dim, given.fingerprint)


def modality_means(x: torch.Tensor, y: torch.Tensor, source_text: Any, target_text: Any,
           dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Per-modality means: each modality is centred on its own (text only when both sides are given)."""
    means = {"image_source": x.mean(0), "image_target": y.mean(0)}
    if (source_text is None) != (target_text is None):
        raise ValueError("give both source_text and target_text (for the text means), or neither")
    if source_text is not None:
        xt = as_matrix(source_text, "source text embeddings", dtype)
        yt = as_matrix(target_text, "target text embeddings", dtype)
        if xt.shape[1] != x.shape[1] or yt.shape[1] != y.shape[1]:
            raise ValueError(f"text dims ({xt.shape[1]}, {yt.shape[1]}) differ from image dims "
                             f"({x.shape[1]}, {y.shape[1]}): text and images must come from the same two models")
        means["text_source"], means["text_target"] = xt.mean(0), yt.mean(0)
    return means


def fit_procrustes(
    source_image: torch.Tensor,
    target_image: torch.Tensor,
    *,
    source_text: torch.Tensor | None = None,
    target_text: torch.Tensor | None = None,
    source: ModelId | str | None = None,
    target: ModelId | str | None = None,
    on_few_anchors: Literal["warn", "error"] = "warn",
    use_scipy: bool | None = None,
    dtype: torch.dtype = torch.float64,
) -> OrthogonalMap:
    """Fit ``Q`` on paired image anchors (row i of each side is the same image).

    ``source_text``/``target_text`` (the same anchors' captions, or any texts embedded by both models)
    only supply the text means. Fewer anchors than ``dim + 1`` warn (``on_few_anchors='error'``
    refuses): the fit is then exact on the anchors' span and an arbitrary orthogonal completion elsewhere.
    """
    x = as_matrix(source_image, "source image anchors", dtype)
    y = as_matrix(target_image, "target image anchors", dtype)
    check_paired(x, y, "source image anchors", "target image anchors")
    check_anchor_count(x.shape[0], max(x.shape[1], y.shape[1]), "Procrustes fit", on_few_anchors)
    means = modality_means(x, y, source_text, target_text, dtype)
    xc, yc = x - means["image_source"], y - means["image_target"]
    q = procrustes_q(xc, yc, use_scipy)
    resid = float((xc @ q.T - yc).norm() / yc.norm().clamp_min(1e-30))
    meta = MapMeta(kind=OrthogonalMap.kind, source=_model_id(source, "source", x.shape[1]),
                   target=_model_id(target, "target", y.shape[1]), anchors=x.shape[0],
                   extra={"method": "procrustes", "relative_residual": resid, "modalities": sorted(
                       {k.split("_")[0] for k in means})})
    return OrthogonalMap(q, means, meta)
