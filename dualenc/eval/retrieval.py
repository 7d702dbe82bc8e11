"""Exact image<->text retrieval metrics in bounded memory: the similarity matrix is only ever seen in blocks.

Each (image chunk x text chunk) block is computed once and serves both directions: its rows rank
texts for image queries, its columns rank images for text queries. A query's rank is
``1 + #(non-positive items scoring strictly higher than its best positive)``: ties count in the
query's favour (or, with ``ties="pessimistic"``, against it), and ranks (hence Recall@K, mean and
median rank) are exact, not read off a top-k list.

Exact despite float32 blocks: a block score can differ from the true dot product by at most the
float32 rounding bound, so only scores within that bound of a query's threshold are undecided;
those few are recomputed in float64, the same way as the thresholds. Results therefore do not depend
on chunk sizes, batch composition or the BLAS library, and duplicate captions/images tie exactly.
Optional top-k lists are kept with running ``torch.topk`` merges.

Naming follows CLIP_benchmark: ``image_retrieval_*`` is text -> image, ``text_retrieval_*`` is
image -> text. Recalls are fractions in [0, 1].
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

DEFAULT_IMAGE_CHUNK = 2048
DEFAULT_TEXT_CHUNK = 8192  # a 2048 x 8192 float32 block is 64 MiB; the scan keeps three such buffers
RECHECK_CHUNK = 8192  # undecided (near-tie) pairs recomputed in float64 at a time
MAX_CHUNK = 2**24  # counts are summed in float32, exact up to here


@dataclass
class RetrievalRanks:
    """Per-query results of :func:`retrieval_ranks` (on CPU)."""

    text_ranks: Tensor  # (N,) image -> text: 1-based rank of the first correct caption; 0 = image has none
    image_ranks: Tensor  # (M,) text -> image: 1-based rank of the caption's image
    text_topk: Tensor | None = None  # (N, k) best text indices per image, best first
    image_topk: Tensor | None = None  # (M, k) best image indices per text


def check_retrieval_inputs(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor) -> None:
    """Clear errors for shapes and mappings that cannot be scored."""
    if image_emb.ndim != 2 or text_emb.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (rows, dim); got image {tuple(image_emb.shape)}, "
                         f"text {tuple(text_emb.shape)}")
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"embedding sizes differ: images have dim {image_emb.shape[1]}, texts {text_emb.shape[1]}; "
                         "embed both with the same model")
    if image_emb.shape[0] == 0 or text_emb.shape[0] == 0:
        raise ValueError(f"nothing to retrieve: {image_emb.shape[0]} images and {text_emb.shape[0]} texts; "
                         "the evaluation set is empty")
    if text_to_image.shape != (text_emb.shape[0],):
        raise ValueError(f"text_to_image must have one image index per text: shape {tuple(text_to_image.shape)}, "
                         f"expected ({text_emb.shape[0]},)")
    if text_to_image.dtype.is_floating_point:
        raise ValueError("text_to_image must hold integer image indices")
    lo, hi = int(text_to_image.min()), int(text_to_image.max())
    if lo < 0 or hi >= image_emb.shape[0]:
        raise ValueError(f"text_to_image points at image {lo if lo < 0 else hi}, outside 0..{image_emb.shape[0] - 1}")


@contextlib.contextmanager
def full_fp32_matmul() -> Iterator[None]:
    # TF32 / bf16 matmuls would break the rounding bound the exact ranks rely on.
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def dot64(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot products in float64 (exact products, ~1e-16 relative error)."""
    return (a.double() * b.double()).sum(-1)


def merge_topk(vals: Tensor, idx: Tensor, new_vals: Tensor, new_idx: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Best ``k`` of two (rows, *) candidate lists, by value (descending)."""
    v = torch.cat([vals, new_vals], dim=1)
    i = torch.cat([idx, new_idx], dim=1)
    top, pos = v.topk(min(k, v.shape[1]), dim=1)
    return top, i.gather(1, pos)


class _Buffers:
    """Block-sized scratch tensors, allocated once: fresh 64 MiB tensors per block cost page faults."""

    def __init__(self, rows: int, cols: int, device: torch.device) -> None:
        self.f = [torch.empty(rows * cols, device=device) for _ in range(3)]
        self.b = torch.empty(rows * cols, device=device, dtype=torch.bool)

    def get(self, i: int, r: int, c: int) -> Tensor:
        return self.f[i][: r * c].view(r, c)


def _count_above(s: Tensor, thr32: Tensor, dim: int, tol: float, bufs: _Buffers) -> tuple[Tensor, Tensor]:
    """Per query (along ``dim``): how many scores are surely above ``thr32`` (by more than ``tol``), and
    the (row, col) positions of the undecided scores within ``tol`` of it."""
    r, c = s.shape
    d = torch.sub(s, thr32, out=bufs.get(1, r, c))
    band = torch.le(torch.abs(d, out=bufs.get(2, r, c)), tol, out=bufs.b[: r * c].view(r, c)).nonzero()
    # (d - tol) clamped at 0 has sign 1 exactly where d > tol; float sums are exact for counts < 2**24
    # and far faster than summing booleans.
    sure = d.sub_(tol).clamp_(min=0).sign_().sum(dim)
    return sure.long(), band


def _scan(s: Tensor, r0: int, c0: int, dim: int, thr32: Tensor, thr64: Tensor, tol: float, owner: Tensor,
          img_all: Tensor, txt_all: Tensor, above: Tensor, bufs: _Buffers, pessimistic: bool) -> None:
    """Add to ``above`` (per query) the non-positive items of block ``s`` scoring above each query's
    threshold; queries are rows (images, ``dim=1``) or columns (texts, ``dim=0``)."""
    q0 = r0 if dim == 1 else c0
    thr = thr32[q0 : q0 + s.shape[1 - dim]]
    # Good models rank positives near the top, so most queries have nothing near their threshold in
    # a given block: a max per query finds the few that do, and only those are examined.
    active = (s.amax(dim) >= thr - tol).nonzero().squeeze(1)
    if active.numel() == 0:
        return
    if active.numel() > s.shape[1 - dim] // 2:  # most are: a copy would cost more than it saves
        active = torch.arange(s.shape[1 - dim], device=s.device)
        sub, t = s, thr
    else:
        sub, t = s.index_select(1 - dim, active), thr[active]
    sure, band = _count_above(sub, t[:, None] if dim == 1 else t[None, :], dim, tol, bufs)
    above.index_add_(0, active + q0, sure)
    if dim == 1:
        rows, cols = active[band[:, 0]] + r0, band[:, 1] + c0
    else:
        rows, cols = band[:, 0] + r0, active[band[:, 1]] + c0
    negative = owner[cols] != rows  # a positive never counts against its own query
    rows, cols = rows[negative], cols[negative]
    query = rows if dim == 1 else cols
    # Usually a handful per query; in chunks anyway, since a collapsed model ties everything.
    for i in range(0, rows.numel(), RECHECK_CHUNK):
        r, c, q = rows[i : i + RECHECK_CHUNK], cols[i : i + RECHECK_CHUNK], query[i : i + RECHECK_CHUNK]
        exact = dot64(img_all[r], txt_all[c])
        wins = q[exact >= thr64[q] if pessimistic else exact > thr64[q]]
        above.index_add_(0, wins, torch.ones_like(wins))


@torch.no_grad()
def retrieval_ranks(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor, topk: int = 0,
                    image_chunk: int = DEFAULT_IMAGE_CHUNK, text_chunk: int = DEFAULT_TEXT_CHUNK,
                    device: torch.device | str | None = None, ties: str = "optimistic") -> RetrievalRanks:
    """Exact ranks for both directions (and top-``topk`` index lists if ``topk > 0``).

    Scores are dot products (cosine similarities for normalized embeddings). ``text_to_image[t]`` is
    the image that caption ``t`` describes; an image may own several captions, or none (it is then
    only a distractor for text queries and gets rank 0 as a query). Blocks are computed in float32
    on ``device`` (default: the embeddings' device). Extra memory: three float32 blocks of
    ``image_chunk * text_chunk`` plus O((N + M) * (topk + 1)).

    ``ties``: ``optimistic`` (a negative scoring exactly the best positive's score does not push it
    down) or ``pessimistic`` (it does). They differ only where scores tie exactly, e.g. duplicate
    captions; CLIP_benchmark's top-k lists break such ties arbitrarily.
    """
    if ties not in ("optimistic", "pessimistic"):
        raise ValueError(f"ties must be 'optimistic' or 'pessimistic', got {ties!r}")
    image_emb, text_emb = torch.as_tensor(image_emb), torch.as_tensor(text_emb)
    text_to_image = torch.as_tensor(text_to_image)
    check_retrieval_inputs(image_emb, text_emb, text_to_image)
    if not (1 <= image_chunk <= MAX_CHUNK and 1 <= text_chunk <= MAX_CHUNK):
        raise ValueError(f"chunk sizes must be in 1..{MAX_CHUNK}, got image_chunk={image_chunk}, "
                         f"text_chunk={text_chunk}")
    dev = torch.device(device) if device is not None else image_emb.device
    img_all, txt_all = image_emb.to(dev, torch.float32), text_emb.to(dev, torch.float32)
    owner = text_to_image.to(dev, torch.long)
    n, m, dim = img_all.shape[0], txt_all.shape[0], img_all.shape[1]

    # Thresholds in float64: each caption's score with its image, each image's best caption score.
    pos = torch.cat([dot64(txt_all[c : c + text_chunk], img_all[owner[c : c + text_chunk]])
                     for c in range(0, m, text_chunk)])
    best = torch.full((n,), float("-inf"), device=dev, dtype=torch.float64).scatter_reduce(0, owner, pos, "amax")
    # Images without captions are no queries: +inf thresholds keep them out of every scan.
    pos32, best32 = pos.float(), best.float().nan_to_num(neginf=float("inf"))
    # Float32 rounding bound of a dot product (any summation order), doubled for the thresholds'
    # own rounding to float32 and for margin.
    norms = float(img_all.norm(dim=1).max()) * float(txt_all.norm(dim=1).max())
    tol = 2.0 * (dim + 2) * 2.0**-24 * norms

    above_img = torch.zeros(n, device=dev, dtype=torch.long)  # per image query: texts scoring above
    above_txt = torch.zeros(m, device=dev, dtype=torch.long)  # per text query: images scoring above
    k_txt, k_img = min(topk, m), min(topk, n)
    text_topk = torch.empty((n, k_txt), dtype=torch.long, device=dev) if topk else None
    img_v = torch.full((m, k_img), float("-inf"), device=dev) if topk else None
    img_i = torch.full((m, k_img), -1, device=dev, dtype=torch.long) if topk else None
    bufs = _Buffers(min(image_chunk, n), min(text_chunk, m), dev)

    with full_fp32_matmul():
        for r0 in range(0, n, image_chunk):
            r1 = min(r0 + image_chunk, n)
            img = img_all[r0:r1]
            if topk:
                row_v = torch.empty((r1 - r0, 0), device=dev)
                row_i = torch.empty((r1 - r0, 0), device=dev, dtype=torch.long)
            for c0 in range(0, m, text_chunk):
                c1 = min(c0 + text_chunk, m)
                s = torch.matmul(img, txt_all[c0:c1].T, out=bufs.get(0, r1 - r0, c1 - c0))
                pessimistic = ties == "pessimistic"
                _scan(s, r0, c0, 1, best32, best, tol, owner, img_all, txt_all, above_img, bufs, pessimistic)
                _scan(s, r0, c0, 0, pos32, pos, tol, owner, img_all, txt_all, above_txt, bufs, pessimistic)
                if topk:
                    v, i = s.topk(min(k_txt, c1 - c0), dim=1)
                    row_v, row_i = merge_topk(row_v, row_i, v, i + c0, k_txt)
                    v, i = s.topk(min(k_img, r1 - r0), dim=0)
                    img_v[c0:c1], img_i[c0:c1] = merge_topk(img_v[c0:c1], img_i[c0:c1], v.T, i.T + r0, k_img)
            if topk:
                text_topk[r0:r1] = row_i

    has_caption = torch.bincount(owner, minlength=n) > 0
    text_ranks = torch.where(has_caption, above_img + 1, torch.zeros_like(above_img))
    return RetrievalRanks(text_ranks=text_ranks.cpu(), image_ranks=(above_txt + 1).cpu(),
                          text_topk=text_topk.cpu() if topk else None, image_topk=img_i.cpu() if topk else None)


def rank_summary(ranks: Tensor, ks: Sequence[int], prefix: str) -> dict[str, float]:
    """Recall@K for each K, mean and median rank of valid (>= 1) ranks, under ``prefix``."""
    r = ranks[ranks > 0].numpy()
    if r.size == 0:
        raise ValueError(f"{prefix}: no query has a correct answer")
    out = {f"{prefix}_recall@{k}": float((r <= k).mean()) for k in ks}
    out[f"{prefix}_mean_rank"] = float(r.mean())
    out[f"{prefix}_median_rank"] = float(np.median(r))
    return out


def metrics_from_ranks(ranks: RetrievalRanks, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    out = rank_summary(ranks.image_ranks, ks, "image_retrieval")
    out.update(rank_summary(ranks.text_ranks, ks, "text_retrieval"))
    out["images"] = int(ranks.text_ranks.shape[0])
    out["texts"] = int(ranks.image_ranks.shape[0])
    out["image_queries"] = int((ranks.text_ranks > 0).sum())
    return out


def retrieval_metrics(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor, ks: Sequence[int] = (1, 5, 10),
                      image_chunk: int = DEFAULT_IMAGE_CHUNK, text_chunk: int = DEFAULT_TEXT_CHUNK,
                      device: torch.device | str | None = None, ties: str = "optimistic") -> dict[str, float]:
    """Recall@K (both directions), mean and median rank; see :func:`retrieval_ranks`.

    Keys: ``image_retrieval_recall@K`` (text -> image), ``text_retrieval_recall@K`` (image -> text),
    ``*_mean_rank``, ``*_median_rank``, and the counts ``images``, ``texts``, ``image_queries``.
    """
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {list(ks)}")
    ranks = retrieval_ranks(image_emb, text_emb, text_to_image, 0, image_chunk, text_chunk, device, ties)
    return metrics_from_ranks(ranks, ks)


def recall_curve(ranks: Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Recall@K for many K from exact ranks (queries with rank 0 have no answer and are left out)."""
    r = ranks[ranks > 0]
    return {int(k): float((r <= k).double().mean()) for k in ks}


@torch.no_grad()
def topk_search(queries: Tensor, gallery: Tensor, k: int, query_chunk: int = 4096, gallery_chunk: int = 16384,
                device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """(scores, indices), each (Q, k): the ``k`` highest dot products per query, via running top-k merges."""
    queries, gallery = torch.as_tensor(queries), torch.as_tensor(gallery)
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"embedding sizes differ: queries {tuple(queries.shape)}, gallery {tuple(gallery.shape)}; "
                         "both must be (rows, dim) from the same model")
    if gallery.shape[0] == 0:
        raise ValueError("the gallery is empty")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    dev = torch.device(device) if device is not None else queries.device
    # Half precision matmuls are fast on GPUs but slow or missing on CPUs.
    dt = torch.float32 if dev.type == "cpu" or not queries.dtype.is_floating_point else queries.dtype
    g_all = gallery.to(dev, dt)
    k = min(k, g_all.shape[0])
    scores, indices = [], []
    for q0 in range(0, queries.shape[0], query_chunk):
        q = queries[q0 : q0 + query_chunk].to(dev, dt)
        best_v = torch.empty((q.shape[0], 0), device=dev, dtype=dt)
        best_i = torch.empty((q.shape[0], 0), device=dev, dtype=torch.long)
        for g0 in range(0, g_all.shape[0], gallery_chunk):
            s = q @ g_all[g0 : g0 + gallery_chunk].T
            v, i = s.topk(min(k, s.shape[1]), dim=1)
            best_v, best_i = merge_topk(best_v, best_i, v, i + g0, k)
        scores.append(best_v.cpu())
        indices.append(best_i.cpu())
    return torch.cat(scores), torch.cat(indices)
