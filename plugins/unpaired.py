"""Unpaired orthogonal maps: iterative Procrustes on nearest-neighbour pairs, no paired anchors.

Two starts (``init="auto"``, the default, picks one by the loop; see ``fit_mnn_procrustes``).
``init="similarity"`` is VecMap's fully unsupervised initialisation (Artetxe
et al. 2018, "A robust self-learning method for fully unsupervised cross-lingual mappings"): a point's
sorted similarities to the rest of its own set do not change under a rotation, so points of the two sets
are matched by those profiles (of the square root of each set's Gram matrix) before any map exists.
``init="pca"`` matches the principal axes of the two centred sets (their eigenvectors correspond up to
sign under a rotation; each sign chosen by the 1-D marginals, then greedily by nearest-neighbour
similarity); it fails whenever the two spaces are not an exact rotation of each other (two real encoders).

Then, repeatedly: map the source, pair points, refit Procrustes on the pairs. The plain loop pairs mutual
nearest neighbours until the pairs stop changing; it stalls in a local optimum with a few thousand
vectors a side. ``robust=True`` uses the fixes of unsupervised word-translation work: CSLS similarities
(Conneau et al. 2018: a point's similarity minus the mean similarity of its k nearest neighbours, against
hubs), every point paired with its best match both ways, and stochastic dictionary induction (VecMap:
each similarity entry is kept with probability ``keep``, starting at 0.1 and doubled whenever the mean
similarity of the induced pairs has not improved (by ``tol``) for ``patience`` iterations, so early iterations
explore; it stops when that stalls at ``keep`` 1).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from dualenc.plugins.checks import as_matrix, check_anchor_count
from dualenc.plugins.mapfile import MapMeta
from dualenc.plugins.procrustes import OrthogonalMap, _model_id, procrustes_q


def pca_init(xc: torch.Tensor, yc: torch.Tensor, passes: int = 2, subsample: int = 512, seed: int = 0) -> torch.Tensor:
    """(dim_y, dim_x) semi-orthogonal map sending x's principal axes to y's, with signs chosen as above."""
    r = min(xc.shape[1], yc.shape[1])
    _, _, vx = torch.linalg.svd(xc, full_matrices=False)  # rows of vx: principal axes, by variance
    _, _, vy = torch.linalg.svd(yc, full_matrices=False)
    vx, vy = vx[:r], vy[:r]
    px, py = xc @ vx.T, yc @ vy.T
    levels = torch.linspace(0.01, 0.99, 99, dtype=xc.dtype)
    qx, qy, qy_neg = (torch.quantile(v, levels, dim=0) for v in (px, py, -py))
    signs = torch.where((qx - qy).abs().mean(0) <= (qx - qy_neg).abs().mean(0), 1.0, -1.0).to(xc.dtype)
    g = torch.Generator().manual_seed(seed)
    # The score of a sign vector s: similarities S = (x_axes * s) @ y_axes^T of the subsamples' projections
    # on the matched axes (row norms do not depend on s). Flipping sign i is the rank-1 update
    # S - 2 s_i x_i y_i^T: O(subsample^2) per trial instead of rebuilding Q and a matrix product.
    xs = px[torch.randperm(len(px), generator=g)[:subsample]]
    ys = py[torch.randperm(len(py), generator=g)[:subsample]]
    xs = xs / xs.norm(dim=1, keepdim=True).clamp_min(1e-12)
    ys = ys / ys.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def score(sim: torch.Tensor) -> float:
        return float(sim.max(1).values.mean() + sim.max(0).values.mean())

    sim = (xs * signs) @ ys.T
    best = score(sim)
    for _ in range(passes):  # greedy: a marginal that is symmetric cannot tell its sign by itself
        improved = False
        for i in range(r):
            trial = sim - 2 * signs[i] * torch.outer(xs[:, i], ys[:, i])
            sc = score(trial)
            if sc > best:
                best, sim, improved = sc, trial, True
                signs = signs.clone()
                signs[i] = -signs[i]
        if not improved:
            break

    def q_of(s: torch.Tensor) -> torch.Tensor:
        return vy.T @ torch.diag(s) @ vx

    q = q_of(signs)
    if r < max(xc.shape[1], yc.shape[1]) or torch.linalg.matrix_rank(q) < r:
        u, _, vh = torch.linalg.svd(q + 1e-12 * torch.eye(*q.shape, dtype=q.dtype), full_matrices=False)
        q = u @ vh  # complete to a full (semi-)orthogonal map
    return q


def _vecmap_normalize(x: torch.Tensor) -> torch.Tensor:
    x = F.normalize(x, dim=-1)
    return F.normalize(x - x.mean(0), dim=-1)


def similarity_profiles(x: torch.Tensor) -> torch.Tensor:
    """Rows: each point's sorted similarities to the set (square root of the Gram matrix), normalized.

    Rotation-invariant: ``x @ R`` has the same profiles. The square root ``U S U^T`` (from ``x = U S V^T``)
    rather than ``x x^T`` itself, as VecMap does: it puts the two sets' similarity scales closer.
    """
    u, s, _ = torch.linalg.svd(_vecmap_normalize(x.float()), full_matrices=False)
    return _vecmap_normalize(((u * s) @ u.T).sort(dim=1, descending=True).values)


def similarity_init(xc: torch.Tensor, yc: torch.Tensor, points: int = 4000, seed: int = 0) -> torch.Tensor:
    """(dim_y, dim_x) semi-orthogonal start: Procrustes on the pairs matched by similarity profiles.

    ``points`` a side (a random subsample, the same count on both sides so the profiles compare):
    O(points^2) memory, O(points^3) time for the Gram square root (4,000: ~2 s).
    """
    n = min(points, len(xc), len(yc))
    g = torch.Generator().manual_seed(seed)
    ia = torch.randperm(len(xc), generator=g)[:n]
    ib = torch.randperm(len(yc), generator=g)[:n]
    i, j = csls_pairs(similarity_profiles(xc[ia]), similarity_profiles(yc[ib]))
    return procrustes_q(xc[ia][i], yc[ib][j], use_scipy=False)


def mutual_nn(a: torch.Tensor, b: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pairs (i, j) where b[j] is a[i]'s nearest neighbour (cosine) and vice versa."""
    a, b = F.normalize(a, dim=-1).float(), F.normalize(b, dim=-1).float()  # indices only: float32 is enough, 2x faster
    best_b = torch.empty(a.shape[0], dtype=torch.long)
    col_best = torch.full((b.shape[0],), -float("inf"), dtype=a.dtype)
    col_arg = torch.zeros(b.shape[0], dtype=torch.long)
    for s in range(0, a.shape[0], chunk):
        sims = a[s:s + chunk] @ b.T
        best_b[s:s + chunk] = sims.argmax(1)
        v, i = sims.max(0)
        better = v > col_best
        col_best[better], col_arg[better] = v[better], i[better] + s
    i = torch.arange(a.shape[0])
    keep = col_arg[best_b] == i
    return i[keep], best_b[keep]


def csls_pairs(a: torch.Tensor, b: torch.Tensor, keep: float = 1.0, k: int = 10, chunk: int = 4096,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pairs (i, j): each a[i] with its best b by CSLS, and each b[j] with its best a (not only mutual).

    Entries are kept with probability ``keep`` (stochastic dictionary induction). Chunked: memory is
    ``chunk`` x len(b), never the whole similarity matrix.
    """
    a, b = F.normalize(a, dim=-1).float(), F.normalize(b, dim=-1).float()
    k = max(1, min(k, len(a), len(b)))

    full = a @ b.T if len(a) * len(b) <= 2 ** 25 else None  # small enough (<= 128 MB): one product, not three

    def knn_mean(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return torch.cat([(p[s:s + chunk] @ q.T).topk(k, dim=1).values.mean(1) for s in range(0, len(p), chunk)])

    if full is not None:
        ra, rb = full.topk(k, dim=1).values.mean(1), full.topk(k, dim=0).values.mean(0)
        chunk = len(a)
    else:
        ra, rb = knn_mean(a, b), knn_mean(b, a)
    best_b = torch.empty(len(a), dtype=torch.long)
    col_best = torch.full((len(b),), -float("inf"))
    col_arg = torch.zeros(len(b), dtype=torch.long)
    for s in range(0, len(a), chunk):
        sims = 2 * (full if full is not None else a[s:s + chunk] @ b.T) - ra[s:s + chunk, None] - rb[None, :]
        if keep < 1.0:
            sims = sims.masked_fill(torch.rand(sims.shape, generator=generator) >= keep, -float("inf"))
        best_b[s:s + chunk] = sims.argmax(1)
        v, i = sims.max(0)
        better = v > col_best
        col_best[better], col_arg[better] = v[better], i[better] + s
    return torch.cat([torch.arange(len(a)), col_arg]), torch.cat([best_b, torch.arange(len(b))])


def _refine(xc: torch.Tensor, yc: torch.Tensor, q: torch.Tensor, robust: bool, iters: int, patience: int, tol: float,
            g: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
    """Self-learning from ``q``: pair, refit Procrustes, repeat (module docstring)."""
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None
    done, keep, best, stalled = 0, 0.1, -float("inf"), 0
    for done in range(1, iters + 1):
        mapped = xc @ q.T
        if robust:
            i, j = csls_pairs(mapped, yc, keep=keep, generator=g)
            objective = float(F.cosine_similarity(mapped[i].float(), yc[j].float(), dim=-1).mean())
            best, stalled = (objective, 0) if objective > best + tol else (best, stalled + 1)
        else:
            i, j = mutual_nn(mapped, yc)
            if pairs is not None and len(i) == len(pairs[0]) and bool((i == pairs[0]).all() and (j == pairs[1]).all()):
                break
        pairs = (i, j)
        if len(i) < 2:
            break
        q = procrustes_q(xc[i], yc[j], use_scipy=False)
        if robust and stalled >= patience:
            if keep >= 1.0:
                break
            keep, stalled = min(1.0, 2 * keep), 0
    info: dict[str, Any] = {"iterations": done, "mnn_pairs": 0 if pairs is None else len(pairs[0])}
    if robust:
        info["final_keep"] = keep
    return q, info


def fit_mnn_procrustes(
    source_emb: torch.Tensor,
    target_emb: torch.Tensor,
    *,
    source_text: torch.Tensor | None = None,
    target_text: torch.Tensor | None = None,
    source: Any = None,
    target: Any = None,
    init: Literal["auto", "similarity", "pca", "identity"] = "auto",
    iters: int | None = None,
    robust: bool = False,
    patience: int = 3,
    tol: float = 1e-3,
    init_points: int = 4000,
    seed: int = 0,
    on_few_anchors: Literal["warn", "error"] = "warn",
) -> OrthogonalMap:
    """Unpaired orthogonal map from two sets of embeddings of *different* items of one distribution.

    ``init="auto"``: the similarity-profile start when ``robust`` (its exploring loop recovers from that
    rough start, and it is what finds a map between two different models), the PCA-axis start for the
    plain loop (no exploration: it needs a start that is already nearly right, which PCA axes are when
    the two sets are a rotation of each other; in 16-d synthetic mixtures similarity profiles are
    ambiguous and the robust loop from them can stop in a wrong rotation, top-1 0.57 among 500).
    ``iters``: at most this many refits (default 20, or 200 with ``robust``, which stops by itself).
    ``patience``, ``tol`` (the gain in mean pair cosine that counts as an improvement) and
    ``init_points``: see the module docstring and ``similarity_init``.
    """
    x = as_matrix(source_emb, "source embeddings")
    y = as_matrix(target_emb, "target embeddings")
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    start = ("similarity" if robust else "pca") if init == "auto" else init
    if start == "similarity":
        q = similarity_init(xc, yc, init_points, seed).to(x.dtype)
    elif start == "pca":
        q = pca_init(xc, yc)
    elif start == "identity":
        q = torch.eye(y.shape[1], x.shape[1], dtype=x.dtype)
    else:
        raise ValueError(f"init must be 'auto', 'similarity', 'pca' or 'identity', got {init!r}")
    iters = iters if iters is not None else (200 if robust else 20)
    q, info = _refine(xc, yc, q, robust, iters, patience, tol, torch.Generator().manual_seed(seed))
    check_anchor_count(max(info["mnn_pairs"], 2), max(x.shape[1], y.shape[1]), "MNN-Procrustes (mutual pairs)",
                       on_few_anchors)
    means = {"image_source": mx, "image_target": my}
    if source_text is not None and target_text is not None:
        means["text_source"] = as_matrix(source_text, "source text").mean(0)
        means["text_target"] = as_matrix(target_text, "target text").mean(0)
    extra: dict[str, Any] = {"method": "mnn_procrustes", "init": init, "start": start, "robust": robust, **info,
                             "source_count": x.shape[0], "target_count": y.shape[0]}
    meta = MapMeta(kind=OrthogonalMap.kind, source=_model_id(source, "source", x.shape[1]),
                   target=_model_id(target, "target", y.shape[1]), anchors=0, extra=extra)
    return OrthogonalMap(q, means, meta)


class MNNProcrustes:
    """Registry entry for ``dualenc align fit --method mnn_procrustes``; its maps are ``procrustes`` maps."""

    kind: ClassVar[str] = "mnn_procrustes"

    @staticmethod
    def fit_embeddings(source: Any, target: Any, **kwargs: Any) -> OrthogonalMap:
        return fit_mnn_procrustes(source.get("image"), target.get("image"), source_text=source.arrays.get("text"),
                                  target_text=target.arrays.get("text"), source=source.model, target=target.model,
                                  **kwargs)
