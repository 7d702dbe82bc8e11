"""Planted test data: two "models" whose spaces differ by a known (semi-)orthogonal map and shifts.

Used by the tests, and usable by a study to check a pipeline before running it on real models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def random_orthogonal(rows: int, cols: int, generator: torch.Generator,
                      dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A (rows, cols) matrix with orthonormal columns (rows >= cols) or rows (rows < cols)."""
    a = torch.randn(max(rows, cols), min(rows, cols), generator=generator, dtype=dtype)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r))  # Haar-distributed, not biased by QR's sign convention
    return q if rows >= cols else q.T


@dataclass
class Planted:
    q: torch.Tensor  # (d_target, d_source), the true map
    source_image: torch.Tensor
    source_text: torch.Tensor
    target_image: torch.Tensor
    target_text: torch.Tensor
    shifts: dict[str, torch.Tensor]


def planted_pair(n: int = 64, d_source: int = 8, d_target: int | None = None, seed: int = 0, noise: float = 0.0,
                 dtype: torch.dtype = torch.float64) -> Planted:
    """``target_m = source_m Q^T + shift_m`` for m in image/text, with different shifts per modality
    (and the text cloud offset from the image cloud in the source too), plus optional noise.

    With ``d_target > d_source`` the target lives in a subspace: the true ``Q`` is semi-orthogonal.
    """
    d_target = d_target or d_source
    g = torch.Generator().manual_seed(seed)
    q = random_orthogonal(d_target, d_source, g, dtype)
    scale = torch.linspace(2.0, 0.5, d_source, dtype=dtype)  # anisotropic: realistic and well-posed
    img = torch.randn(n, d_source, generator=g, dtype=dtype) * scale + 0.3
    txt = torch.randn(n, d_source, generator=g, dtype=dtype) * scale - 0.7
    shifts = {m: torch.randn(d_target, generator=g, dtype=dtype) for m in ("image", "text")}
    ti = img @ q.T + shifts["image"] + noise * torch.randn(n, d_target, generator=g, dtype=dtype)
    tt = txt @ q.T + shifts["text"] + noise * torch.randn(n, d_target, generator=g, dtype=dtype)
    return Planted(q, img, txt, ti, tt, shifts)


def gaussian_mixture(n: int, d: int, clusters: int = 12, seed: int = 0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Samples of a fixed (by ``seed``) anisotropic, unevenly weighted mixture: an asymmetric
    distribution, so an unpaired method can tell a rotation of it apart from itself."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, d, generator=g) * torch.linspace(2.0, 0.3, d)
    weights = torch.linspace(1, 3, clusters)
    spread = torch.linspace(0.1, 0.6, d)
    gs = generator or g
    c = torch.multinomial(weights / weights.sum(), n, replacement=True, generator=gs)
    return centers[c] + torch.randn(n, d, generator=gs) * spread
