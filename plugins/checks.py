"""Input checks shared by the fitters: shapes, NaNs, anchor counts. Each failure says what to fix."""

from __future__ import annotations

import warnings
from typing import Any, Literal

import numpy as np
import torch


class FewAnchorsWarning(UserWarning):
    """Fewer anchors than the map has degrees of freedom: part of the map is not determined by data."""


def as_matrix(x: Any, name: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A 2-D floating tensor (CPU, ``dtype``) from a tensor or array; rejects NaN/inf rows by index."""
    if isinstance(x, np.ndarray):
        if x.dtype == object:
            raise TypeError(f"{name}: object arrays are not embeddings")
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor or numpy array, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (count, dim) matrix of embeddings, got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name}: empty embedding matrix {tuple(x.shape)}")
    x = x.detach().to("cpu", dtype)
    check_finite(x, name)
    return x


def check_finite(x: torch.Tensor, name: str) -> None:
    bad = ~torch.isfinite(x)
    if bad.any():
        rows = torch.nonzero(bad.reshape(bad.shape[0], -1).any(dim=1)).flatten()
        shown = ", ".join(str(int(i)) for i in rows[:8]) + (" ..." if len(rows) > 8 else "")
        raise ValueError(f"{name}: {len(rows)} of {x.shape[0]} embeddings contain NaN or inf (rows {shown}); "
                         "drop or re-embed them before fitting or applying a map")


def check_paired(a: torch.Tensor, b: torch.Tensor, a_name: str, b_name: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"anchor counts differ: {a_name} has {a.shape[0]} rows, {b_name} has {b.shape[0]}; "
                         "paired anchors must be the same items in the same order")


def check_anchor_count(n: int, dim: int, what: str, on_few: Literal["warn", "error"] = "warn",
                       minimum: int = 2) -> bool:
    """Refuse fewer than ``minimum`` anchors; with fewer than ``dim + 1`` warn (or raise) that the fit is
    only determined on the anchors' span. Returns whether the count was enough."""
    if on_few not in ("warn", "error"):
        raise ValueError(f"on_few_anchors must be 'warn' or 'error', got {on_few!r}")
    if n < minimum:
        raise ValueError(f"{what}: {n} anchor(s) given, at least {minimum} are needed")
    if n > dim:
        return True
    msg = (f"{what}: {n} anchors for {dim} dimensions; after centering they span at most {n - 1} directions, "
           f"so the map is only determined on that subspace (the rest is an arbitrary orthogonal completion). "
           f"Use more than {dim} anchors for a fully determined fit")
    if on_few == "error":
        raise ValueError(msg + " (or pass on_few_anchors='warn' to accept the partial fit)")
    warnings.warn(msg, FewAnchorsWarning, stacklevel=3)
    return False
