"""Cross-model evaluation metrics: pure functions on embedding tensors.

Typical use: embed queries with model A, map them into B's space, search an index embedded by B
(and back). Similarity is cosine throughout (inputs need not be normalized).

* ``translation_metrics``: vec2vec's mean cosine to the true target, top-1 and mean rank of the true
  target among the (shuffled) candidates, in chunks of 8,192 as the paper.
* ``retrieval_metrics``: top-1, mean/median rank and Recall@K of queries against an index.
* ``cross_model_report``: the above for A->B and B->A, per modality and across modalities.
* ``zero_shot_accuracy``: images (e.g. A's, mapped to B) against class prompt embeddings (B's text).
* ``backward_compatibility``: M(new query -> old index) vs M(old -> old) (Shen et al.'s criterion).
* ``compatibility_report``: that criterion (and M(new -> new)) for each query/index modality pair.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

CHUNK = 8192


def _norm(x: torch.Tensor) -> torch.Tensor:
    if x.ndim != 2:
        raise ValueError(f"expected (N, D) embeddings, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("embeddings contain NaN or inf")
    return F.normalize(x.float(), dim=-1)


def mean_cosine(pred: torch.Tensor, true: torch.Tensor) -> float:
    """Mean cosine similarity of row i of ``pred`` with row i of ``true``."""
    if pred.shape != true.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and true {tuple(true.shape)} differ: are they in one space?")
    return float((_norm(pred) * _norm(true)).sum(-1).mean())


def ranks_of_truth(queries: torch.Tensor, index: torch.Tensor, truth: torch.Tensor | None = None,
                   chunk: int = CHUNK) -> torch.Tensor:
    """1-based rank of each query's true index row among all rows (ties count against the truth).

    ``truth[i]`` is the index row that query i should retrieve (default: row i). Ranks are computed
    by counting rows scored at least as high as the truth (the truth included), so they do not depend
    on row order, and a map that collapses everything onto one point gets the worst rank, not the best.
    """
    q, x = _norm(queries), _norm(index)
    if q.shape[1] != x.shape[1]:
        raise ValueError(f"queries are {q.shape[1]}-dim but the index is {x.shape[1]}-dim: map them into one space")
    if truth is None:
        if q.shape[0] != x.shape[0]:
            raise ValueError("without `truth`, queries and index must be paired row by row")
        truth = torch.arange(q.shape[0])
    truth = torch.as_tensor(truth, dtype=torch.long)
    if truth.shape != (q.shape[0],) or int(truth.min()) < 0 or int(truth.max()) >= x.shape[0]:
        raise ValueError(f"truth must give one index row in [0, {x.shape[0]}) per query")
    out = []
    for s in range(0, q.shape[0], chunk):
        sims = q[s:s + chunk] @ x.T
        true = sims.gather(1, truth[s:s + chunk, None])
        out.append((sims >= true).sum(1))  # ties count against the truth: a collapsed map must not score
    return torch.cat(out)


def translation_metrics(pred: torch.Tensor, true: torch.Tensor, chunk: int = CHUNK,
                        seed: int = 0) -> dict[str, float]:
    """vec2vec's metrics: mean cosine to the true target, top-1 and mean rank among shuffled candidates.

    Rows are shuffled once (seeded) before chunking, so each chunk's candidates are a random subset.
    """
    if pred.shape != true.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and true {tuple(true.shape)} differ")
    perm = torch.randperm(pred.shape[0], generator=torch.Generator().manual_seed(seed))
    p, t = pred[perm], true[perm]
    ranks = torch.cat([ranks_of_truth(p[s:s + chunk], t[s:s + chunk]) for s in range(0, len(p), chunk)])
    return {"mean_cosine": mean_cosine(pred, true), "top1": float((ranks == 1).float().mean()),
            "mean_rank": float(ranks.float().mean()), "candidates": float(min(chunk, len(p)))}


def recall_at_k(ranks: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    return {f"R@{k}": float((ranks <= k).float().mean()) for k in ks}


def retrieval_metrics(queries: torch.Tensor, index: torch.Tensor, truth: torch.Tensor | None = None,
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Top-1, mean and median rank, Recall@K of ``queries`` searched in ``index``."""
    r = ranks_of_truth(queries, index, truth)
    return {"top1": float((r == 1).float().mean()), "mean_rank": float(r.float().mean()),
            "median_rank": float(r.float().median()), **recall_at_k(r, ks)}


MapFn = Callable[[torch.Tensor, str], torch.Tensor]


def cross_model_report(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], a_to_b: MapFn,
                       b_to_a: MapFn | None = None, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Paired embeddings of the same items by models A and B (``{"image": (N, Da), "text": (N, Da)}``,
    row i of every matrix is item i) and maps ``fn(x, modality)`` between them.

    Keys: ``a2b/image/...`` (A's images mapped vs B's own: translation metrics), ``a2b/text->image/R@K``
    (A's text queries mapped and searched in B's image index), ``b/text->image/...`` (B alone, the
    reference), and the same for the other directions/modality pairs.
    """
    out: dict[str, float] = {}
    dirs = [("a2b", a, b, a_to_b)] + ([("b2a", b, a, b_to_a)] if b_to_a is not None else [])
    for tag, src, dst, fn in dirs:
        mapped = {m: fn(x, m) for m, x in src.items()}
        for m in mapped:
            if m in dst:
                out.update({f"{tag}/{m}/{k}": v for k, v in translation_metrics(mapped[m], dst[m]).items()})
        for qm, im in (("text", "image"), ("image", "text")):
            if qm in mapped and im in dst:
                metrics = retrieval_metrics(mapped[qm], dst[im], ks=ks)
                out.update({f"{tag}/{qm}->{im}/{k}": v for k, v in metrics.items()})
    for tag, emb in (("a", a), ("b", b)):
        for qm, im in (("text", "image"), ("image", "text")):
            if qm in emb and im in emb:
                out.update({f"{tag}/{qm}->{im}/{k}": v for k, v in retrieval_metrics(emb[qm], emb[im], ks=ks).items()})
    return out


def zero_shot_accuracy(image_emb: torch.Tensor, labels: torch.Tensor, class_emb: torch.Tensor,
                       ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy of images against class embeddings (e.g. A's images mapped into B vs B's prompts)."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.shape != (image_emb.shape[0],):
        raise ValueError("one label per image")
    r = ranks_of_truth(image_emb, class_emb, labels)
    return {f"top{k}": float((r <= k).float().mean()) for k in ks if k <= class_emb.shape[0]}


def backward_compatibility(new_queries: torch.Tensor, old_queries: torch.Tensor, old_index: torch.Tensor,
                           truth: torch.Tensor | None = None, metric: str = "R@1",
                           ks: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
    """Is a new model (its queries mapped into the old space) compatible with an old index?

    Compatible when M(new -> old) >= M(old -> old): the upgrade can search the old index without
    re-embedding it, and does no worse than the old model did.
    """
    new = retrieval_metrics(new_queries, old_index, truth, ks)
    old = retrieval_metrics(old_queries, old_index, truth, ks)
    if metric not in new:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(new)}")
    higher_better = metric != "mean_rank" and metric != "median_rank"
    ok = new[metric] >= old[metric] if higher_better else new[metric] <= old[metric]
    return {"metric": metric, "new_to_old": new[metric], "old_to_old": old[metric], "compatible": bool(ok)}


def compatibility_report(new: dict[str, torch.Tensor], old: dict[str, torch.Tensor], new_to_old: MapFn,
                         metric: str = "R@1", ks: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
    """The backward-compatibility criterion for text->image and image->text search.

    ``new``/``old``: paired embeddings of the same items by the new and the old model (as in
    ``cross_model_report``); ``new_to_old`` maps the new model's embeddings into the old space.
    Keys ``compat/{q}->{i}/new_to_old``, ``.../old_to_old``, ``.../new_to_new`` (the new model alone, what
    re-embedding the index would buy) and ``.../compatible`` (new_to_old no worse than old_to_old).
    """
    out: dict[str, Any] = {}
    for qm, im in (("text", "image"), ("image", "text")):
        if qm not in new or qm not in old or im not in old:
            continue
        bc = backward_compatibility(new_to_old(new[qm], qm), old[qm], old[im], metric=metric, ks=ks)
        tag = f"compat/{qm}->{im}"
        out.update({f"{tag}/new_to_old": bc["new_to_old"], f"{tag}/old_to_old": bc["old_to_old"],
                    f"{tag}/compatible": bc["compatible"]})
        if im in new:
            out[f"{tag}/new_to_new"] = retrieval_metrics(new[qm], new[im], ks=ks)[metric]
    if out:
        out["compat/metric"] = metric
    return out
