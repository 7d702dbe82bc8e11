"""Recall@K exactly as CLIP_benchmark computes it, and the retrieval metrics under each tie convention.

CLIP_benchmark (``metrics/zeroshot_retrieval.py``) scores ``texts @ images.T`` in float32 and, per
query and per K, counts a hit when ``torch.topk(scores, K)`` holds a positive. Where scores tie exactly
(duplicate captions, common in web data) which item makes the top K is whatever ``torch.topk`` returns,
so its numbers can sit anywhere between our exact optimistic and pessimistic ranks. ``ties="clip_benchmark"``
reproduces its formula (same score orientation, same per-K top-k calls, images without captions
counted as misses) so results are comparable with CLIP_benchmark's files; the exact optimistic and
pessimistic recalls are reported next to it, so a reader sees how much of the number is tie-breaking.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from dualenc.eval.retrieval import (DEFAULT_IMAGE_CHUNK, DEFAULT_TEXT_CHUNK, check_retrieval_inputs, full_fp32_matmul,
                                    metrics_from_ranks, recall_curve, retrieval_ranks)

TIES = ("clip_benchmark", "optimistic", "pessimistic")
DEFAULT_TIES = "clip_benchmark"
BLOCK = 2**24  # score elements per block (64 MiB of float32)
CONVENTIONS = {
    "clip_benchmark": "Recall@K as CLIP_benchmark computes it: a query is a hit when a positive is among "
                      "torch.topk(scores, K) of float32 text x image scores; exactly tied scores are ordered as "
                      "torch.topk returns them; images without captions count as misses. Mean/median ranks are "
                      "exact with ties counted against the query (pessimistic).",
    "optimistic": "Exact ranks: 1 + the number of non-positives scoring strictly above the best positive "
                  "(ties count in the query's favour).",
    "pessimistic": "Exact ranks: 1 + the number of non-positives scoring at least as high as the best positive "
                   "(ties count against the query).",
}


@torch.no_grad()
def clip_benchmark_recall(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor, ks: Sequence[int],
                          device: torch.device | str | None = None) -> dict[str, float]:
    """``image_retrieval_recall@K`` (text -> image) and ``text_retrieval_recall@K`` (image -> text) by
    CLIP_benchmark's formula, in blocks of queries (CLIP_benchmark holds the whole matrix at once)."""
    check_retrieval_inputs(image_emb, text_emb, text_to_image)
    dev = torch.device(device) if device is not None else image_emb.device
    img, txt = image_emb.to(dev, torch.float32), text_emb.to(dev, torch.float32)
    owner = text_to_image.to(dev, torch.long)
    n, m = img.shape[0], txt.shape[0]
    out: dict[str, float] = {}
    with full_fp32_matmul():
        hits_t = {k: 0 for k in ks}  # text queries (rows of texts @ images.T)
        rows = max(1, BLOCK // n)
        for t0 in range(0, m, rows):
            s = txt[t0 : t0 + rows] @ img.T
            for k in ks:
                top = s.topk(min(k, n), dim=1).indices
                hits_t[k] += int((top == owner[t0 : t0 + rows, None]).any(1).sum())
        hits_i = {k: 0 for k in ks}  # image queries: columns of the same texts @ images.T
        cols = max(1, BLOCK // m)
        for i0 in range(0, n, cols):
            s = (txt @ img[i0 : i0 + cols].T).T  # (images, texts), scored in CLIP_benchmark's orientation
            mine = owner[None, :] == torch.arange(i0, i0 + s.shape[0], device=dev)[:, None]
            for k in ks:
                top = s.topk(min(k, m), dim=1).indices
                hits_i[k] += int(mine.gather(1, top).any(1).sum())
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = hits_t[k] / m
        out[f"text_retrieval_recall@{k}"] = hits_i[k] / n
    return out


def retrieval_report(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor, ks: Sequence[int] = (1, 5, 10),
                     ties: str = DEFAULT_TIES, image_chunk: int = DEFAULT_IMAGE_CHUNK,
                     text_chunk: int = DEFAULT_TEXT_CHUNK, device: torch.device | str | None = None,
                     curve_ks: Sequence[int] = (1, 2, 5, 10, 20, 50, 100)) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics, details) under ``ties``; details hold the convention, recall curves and, where ties
    changed anything, the optimistic/pessimistic recall bounds."""
    if ties not in TIES:
        raise ValueError(f"ties must be one of {', '.join(TIES)}, got {ties!r}")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {list(ks)}")
    exact = "pessimistic" if ties == "clip_benchmark" else ties
    ranks = retrieval_ranks(image_emb, text_emb, text_to_image, 0, image_chunk, text_chunk, device, exact)
    metrics = metrics_from_ranks(ranks, ks)
    details: dict[str, Any] = {"ties": ties, "ties_convention": CONVENTIONS[ties],
                               "recall_curves": {"image_retrieval": recall_curve(ranks.image_ranks, curve_ks),
                                                 "text_retrieval": recall_curve(ranks.text_ranks, curve_ks)}}
    if ties == "clip_benchmark":
        metrics.update(clip_benchmark_recall(image_emb, text_emb, text_to_image, ks, device))
        opt = metrics_from_ranks(retrieval_ranks(image_emb, text_emb, text_to_image, 0, image_chunk, text_chunk,
                                                 device, "optimistic"), ks)
        pes = metrics_from_ranks(ranks, ks)
        details["recall_bounds"] = {key: [pes[key], opt[key]] for key in pes if "_recall@" in key}
        details["ties_changed_recall"] = any(pes[key] != opt[key] for key in details["recall_bounds"])
    return metrics, details
