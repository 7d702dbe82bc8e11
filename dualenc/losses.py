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
    fused: bool = False,
) -> Tensor:
    """CLIP/ALIGN symmetric softmax loss: (CE(image->text) + CE(text->image)) / 2.

    Local image rows are classified among all texts and local text rows among all images; the
    target for local row ``i`` is global column ``offset + i``. Mean over local rows.
    ``logit_bias`` is accepted for interface symmetry; softmax is shift-invariant, so it has no
    effect on the value and gets zero gradient.

    ``fused=True`` computes the same value in one pass (:func:`_fused_contrastive`): one logits
    matrix for both directions on a single process, positives as row-wise dot products, and
    log-sum-exp instead of ``cross_entropy`` (no target tensor, no gather from the logits).
    """
    if (all_image_features is None) != (all_text_features is None):
        raise ValueError("pass both all_image_features and all_text_features, or neither")
    all_img = _columns(image_features, all_image_features, offset, "all_image_features")
    all_txt = _columns(text_features, all_text_features, offset, "all_text_features")
    if fused:
        return _fused_contrastive(image_features, text_features, all_img, all_txt, logit_scale, logit_bias,
                                  label_smoothing, same_columns=all_image_features is None)
    targets = torch.arange(image_features.shape[0], device=image_features.device) + offset
    i2t = _logits(image_features, all_txt, logit_scale, logit_bias)
    t2i = _logits(text_features, all_img, logit_scale, logit_bias)
    return 0.5 * (
        F.cross_entropy(i2t, targets, label_smoothing=label_smoothing)
        + F.cross_entropy(t2i, targets, label_smoothing=label_smoothing)
    )


def _fp32(x: Tensor) -> Tensor:
    """At least float32 (bf16/fp16 logits upcast, as cross_entropy does under autocast; float64 stays)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _smoothed_ce(logits: Tensor, positive: Tensor, dim: int, smoothing: float) -> Tensor:
    # cross_entropy with label smoothing e, written out: lse - (1 - e) * z_pos - e * mean_j z_j.
    loss = torch.logsumexp(logits, dim=dim) - (1.0 - smoothing) * positive
    if smoothing:
        loss = loss - smoothing * logits.mean(dim=dim)
    return loss.mean()


def _fused_contrastive(img: Tensor, txt: Tensor, all_img: Tensor, all_txt: Tensor, logit_scale: Tensor,
                       logit_bias: Tensor | None, smoothing: float, same_columns: bool) -> Tensor:
    """The softmax loss without ``cross_entropy``: what torch.compile fuses into few kernels.

    On a single process (columns = the local batch) the text->image logits are the transpose of the
    image->text ones, so one matrix serves both directions (one matmul, half the logits memory). The
    bias is dropped: softmax is shift-invariant, so it changes neither value nor gradients.
    """
    # fp32 as cross_entropy computes under autocast (it upcasts bf16 logits).
    positive = logit_scale * (_fp32(img) * _fp32(txt)).sum(dim=-1)
    i2t = _fp32(logit_scale * (img @ all_txt.T))
    if same_columns:
        return 0.5 * (_smoothed_ce(i2t, positive, 1, smoothing) + _smoothed_ce(i2t, positive, 0, smoothing))
    t2i = _fp32(logit_scale * (txt @ all_img.T))
    return 0.5 * (_smoothed_ce(i2t, positive, 1, smoothing) + _smoothed_ce(t2i, positive, 1, smoothing))


def sigmoid_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    *,
    all_image_features: Tensor | None = None,
    all_text_features: Tensor | None = None,
    offset: int = 0,
    fused: bool = False,
) -> Tensor:
    """SigLIP pairwise sigmoid loss, summed over pairs and divided by the local batch size.

    Local image rows are scored against all texts; pair (i, offset + i) is positive, every other
    pair negative. Each (image, text) pair of the global batch is scored by exactly one rank, so
    ``all_image_features`` is not needed (accepted so callers can treat both losses alike; when
    given it is only validated, and no gradient flows through it).

    ``fused=True``: the same value without the +-1 label matrix: ``-log sigmoid(-z) = softplus(z)``
    for every pair and ``-log sigmoid(z) = softplus(z) - z`` for a positive, so the loss is
    ``(sum softplus(logits) - sum z_pos) / n`` with the positives as row-wise dot products.
    """
    if all_image_features is not None:
        _columns(image_features, all_image_features, offset, "all_image_features")
    all_txt = _columns(text_features, all_text_features, offset, "all_text_features")
    n_local = image_features.shape[0]
    logits = _logits(image_features, all_txt, logit_scale, logit_bias)
    if fused:
        positive = logit_scale * (_fp32(image_features) * _fp32(text_features)).sum(dim=-1) + logit_bias
        return (F.softplus(_fp32(logits)).sum() - positive.sum()) / n_local
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
