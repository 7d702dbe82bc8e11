"""Dual-encoder losses as pure functions of features, logit scale and bias.

Features are expected L2-normalized; ``logit_scale`` is the multiplier itself (already
exponentiated). For multi-process training pass the globally gathered features as
``all_image_features`` / ``all_text_features`` and this rank's row ``offset`` into them (see
:func:`dualenc.distributed.gather_features`): each rank then scores only its local rows against
the global batch (local_B x global_N logits), and the mean of the per-rank losses equals the
single-process loss on the concatenated batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from dualenc.registry import Registry

__all__ = ["LossSpec", "LOSSES", "get_loss", "contrastive_loss", "sigmoid_loss"]


def _columns(local: Tensor, everyone: Tensor | None, offset: int, name: str) -> Tensor:
    """The column-side features: the global batch if given, else the local one."""
    if everyone is None:
        if offset != 0:
            raise ValueError(f"offset={offset} given without {name}")
        return local
    n_local, n_all = local.shape[0], everyone.shape[0]
    if not 0 <= offset <= n_all - n_local:
        raise ValueError(
            f"local rows [{offset}, {offset + n_local}) do not fit in {name} of {n_all} rows"
        )
    if everyone.shape[1:] != local.shape[1:]:
        raise ValueError(f"{name} has shape {tuple(everyone.shape)}, local {tuple(local.shape)}")
    return everyone


def _logits(rows: Tensor, cols: Tensor, logit_scale: Tensor, logit_bias: Tensor | None) -> Tensor:
    logits = logit_scale * (rows @ cols.T)
    return logits if logit_bias is None else logits + logit_bias


def contrastive_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor | None = None,
    *,
    label_smoothing: float = 0.0,
    all_image_features: Tensor | None = None,
    all_text_features: Tensor | None = None,
    offset: int = 0,
) -> Tensor:
    """CLIP/ALIGN symmetric softmax loss: (CE(image->text) + CE(text->image)) / 2.

    Local image rows are classified among all texts and local text rows among all images; the
    target for local row ``i`` is global column ``offset + i``. Mean over local rows.
    ``logit_bias`` is accepted for interface symmetry; softmax is shift-invariant, so it has no
    effect on the value and gets zero gradient.
    """
    if (all_image_features is None) != (all_text_features is None):
        raise ValueError("pass both all_image_features and all_text_features, or neither")
    all_img = _columns(image_features, all_image_features, offset, "all_image_features")
    all_txt = _columns(text_features, all_text_features, offset, "all_text_features")
    targets = torch.arange(image_features.shape[0], device=image_features.device) + offset
    i2t = _logits(image_features, all_txt, logit_scale, logit_bias)
    t2i = _logits(text_features, all_img, logit_scale, logit_bias)
    return 0.5 * (
        F.cross_entropy(i2t, targets, label_smoothing=label_smoothing)
        + F.cross_entropy(t2i, targets, label_smoothing=label_smoothing)
    )


def sigmoid_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    *,
    all_image_features: Tensor | None = None,
    all_text_features: Tensor | None = None,
    offset: int = 0,
) -> Tensor:
    """SigLIP pairwise sigmoid loss, summed over pairs and divided by the local batch size.

    Local image rows are scored against all texts; pair (i, offset + i) is positive, every other
    pair negative. Each (image, text) pair of the global batch is scored by exactly one rank, so
    ``all_image_features`` is not needed (accepted so callers can treat both losses alike; when
    given it is only validated, and no gradient flows through it).
    """
    if all_image_features is not None:
        _columns(image_features, all_image_features, offset, "all_image_features")
    all_txt = _columns(text_features, all_text_features, offset, "all_text_features")
    n_local = image_features.shape[0]
    logits = _logits(image_features, all_txt, logit_scale, logit_bias)
    # +1 on the positive diagonal (shifted by offset), -1 elsewhere.
    labels = -torch.ones_like(logits)
    rows = torch.arange(n_local, device=logits.device)
    labels[rows, rows + offset] = 1.0
    return -F.logsigmoid(labels * logits).sum() / n_local


@dataclass(frozen=True)
class LossSpec:
    """A loss and the logit scale/bias it is usually trained from (scale stored as a log)."""

    fn: Callable[..., Tensor]
    uses_bias: bool
    init_logit_scale: float
    init_logit_bias: float | None


LOSSES: Registry[LossSpec] = Registry("loss")
# CLIP's temperature 0.07; SigLIP paper: t' = log 10, b = -10 (counters the many negatives).
LOSSES.register(
    "contrastive",
    LossSpec(
        contrastive_loss, uses_bias=False, init_logit_scale=math.log(1 / 0.07), init_logit_bias=None
    ),
    aliases=("clip", "align"),
)
LOSSES.register(
    "siglip",
    LossSpec(sigmoid_loss, uses_bias=True, init_logit_scale=math.log(10.0), init_logit_bias=-10.0),
)


def get_loss(name: str) -> LossSpec:
    """The :class:`LossSpec` registered as ``name`` (KeyError listing known names otherwise)."""
    return LOSSES.get(name)
