"""k-nearest-neighbour classification of image embeddings (ALIGN's "ImageNet KNN R@1").

Test embeddings are compared with train embeddings by cosine similarity (both L2-normalised here);
each test image takes the labels of its k most similar train images. The vote is DINO's weighted kNN
(Caron et al. 2021, its ``eval_knn.py``): neighbour j adds ``exp(sim_j / temperature)`` to its class,
temperature 0.07; k=1 is the plain 1-NN label under either vote. ``weighting="uniform"`` is a majority
vote instead (ties go to the class with the larger summed similarity). Similarities are computed in
chunks of test x train rows with a running top-k, so memory stays bounded for large train sets.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dualenc.eval.probe import classification_metrics

WEIGHTINGS = ("dino", "uniform")
DEFAULT_KS = (1, 10, 20)
DEFAULT_TEMPERATURE = 0.07  # DINO's


@torch.no_grad()
def nearest_train(test_x: Tensor, train_x: Tensor, k: int, test_chunk: int = 1024, train_chunk: int = 65536,
                  device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """(similarities, train indices) of each test row's ``k`` most similar train rows, best first.

    Inner products of the rows as given (normalise first for cosine); memory is
    ``test_chunk x train_chunk`` similarities at a time."""
    k = min(k, train_x.shape[0])
    sims, idx = [], []
    for i in range(0, test_x.shape[0], test_chunk):
        q = test_x[i : i + test_chunk].to(device).float()
        best_s = q.new_empty(q.shape[0], 0)
        best_i = torch.empty(q.shape[0], 0, dtype=torch.long, device=q.device)
        for j in range(0, train_x.shape[0], train_chunk):
            s = q @ train_x[j : j + train_chunk].to(device).float().T
            top_s, top_pos = s.topk(min(k, s.shape[1]), dim=1)  # the chunk's best, then merged with the running best
            cand_s, cand_i = torch.cat([best_s, top_s], dim=1), torch.cat([best_i, top_pos + j], dim=1)
            best_s, pos = cand_s.topk(min(k, cand_s.shape[1]), dim=1)
            best_i = cand_i.gather(1, pos)
        sims.append(best_s.cpu())
        idx.append(best_i.cpu())
    return torch.cat(sims), torch.cat(idx)


def vote(sims: Tensor, labels: Tensor, k: int, num_classes: int, weighting: str = "dino",
         temperature: float = DEFAULT_TEMPERATURE) -> Tensor:
    """(N, C) class scores from the first ``k`` neighbours (``sims`` best first, ``labels`` theirs)."""
    s, lab = sims[:, :k].double(), labels[:, :k]
    scores = torch.zeros(s.shape[0], num_classes, dtype=torch.float64)
    if weighting == "dino":
        # exp((s - max) / T): the same ranking as exp(s / T), without overflow at small temperatures
        scores.scatter_add_(1, lab, ((s - s[:, :1]) / temperature).exp())
    elif weighting == "uniform":
        # count * (2k+1) dominates any difference of summed similarities (|sum| <= k): ties go to similarity
        scores.scatter_add_(1, lab, torch.full_like(s, 2.0 * k + 1) + s)
    else:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    return scores


def knn_classify(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, ks: Sequence[int] = DEFAULT_KS,
                 temperature: float = DEFAULT_TEMPERATURE, weighting: str = "dino", num_classes: int | None = None,
                 test_chunk: int = 1024, train_chunk: int = 65536,
                 device: torch.device | str = "cpu") -> dict[str, Any]:
    """kNN top-1 / top-5 / mean per-class recall of ``test_x`` against ``train_x`` for each k in ``ks``.

    Rows are L2-normalised here (cosine similarity). Returns ``knn_top1@K``, ``knn_top5@K`` (top-min(5, C)),
    ``knn_mean_per_class_recall@K`` per k, and ``top1`` / ``top5`` / ``mean_per_class_recall``
    of the first k (ALIGN's KNN R@1 is ``knn_top1@1``), ``ks``, ``weighting``, ``temperature``,
    ``samples``, ``train_samples``, ``classes``. A k above the train size uses every train row.
    """
    for what, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] == 0:
            raise ValueError(f"{what} embeddings: need (N, D) with N > 0 and one label per row, got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"embedding sizes differ: train {train_x.shape[1]}, test {test_x.shape[1]}; embed both "
                         "splits with the same model")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive neighbour counts, got {list(ks)}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    n_cls = num_classes or int(max(train_y.max(), test_y.max())) + 1
    sims, idx = nearest_train(F.normalize(test_x.float(), dim=-1), F.normalize(train_x.float(), dim=-1), max(ks),
                              test_chunk, train_chunk, device)
    neighbour_labels = train_y.long().cpu()[idx]
    out: dict[str, Any] = {}
    for k in ks:
        m = classification_metrics(vote(sims, neighbour_labels, k, n_cls, weighting, temperature), test_y, n_cls)
        for name in ("top1", "top5", "mean_per_class_recall"):
            out[f"knn_{name}@{k}"] = m[name]
        if k == ks[0]:
            out.update({name: m[name] for name in ("top1", "top5", "mean_per_class_recall", "per_class_recall")})
    out.update({"ks": list(ks), "weighting": weighting, "temperature": temperature, "samples": int(test_x.shape[0]),
                "train_samples": int(train_x.shape[0]), "classes": n_cls})
    return out
