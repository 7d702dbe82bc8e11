"""One evaluation for every model of the real-training study: zero-shot (all / seen / unseen classes),
linear probe and kNN, from one embedding pass of an eval root's train and test splits.

Every number comes from dualenc's own evaluation functions (``zeroshot_metrics``, ``linear_probe``,
``knn_classify``); a model trained by open_clip is loaded into the same ``DualEncoder`` code first
(``init_from`` reads open_clip checkpoints), so two trainers differ only in the weights they produced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dualenc.eval.imagesets import embed_splits
from dualenc.eval.knn import knn_classify
from dualenc.eval.probe import linear_probe
from dualenc.eval.zeroshot import build_classifier, read_lines, zeroshot_metrics


class PooledFeatures(torch.nn.Module):
    """A model's image tower alone (no projection): the frozen pretrained features' probe and kNN."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.image_tower = model.image_tower
        self.embed_dim = int(model.image_tower.output_dim)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_tower(images), dim=-1)


def evaluate_model(model: Any, eval_root: str | Path, workers: int = 2, zeroshot: bool = True) -> dict[str, Any]:
    """``{zeroshot_{all,seen,unseen}, probe, knn}`` for ``model`` on ``eval_root``'s ``all`` set.

    The seen / unseen sets are the ``all`` test images of those classes, classified among their own class
    names (the roots ``seen/`` and ``unseen/`` hold the same images, renumbered).
    """
    root = Path(eval_root)
    model.eval()
    with torch.no_grad():
        train, test = embed_splits(model, str(root / "all"), num_workers=workers, batch_size=250)
    out: dict[str, Any] = {}
    if zeroshot:
        names = read_lines(root / "all" / "classnames.txt")
        templates = read_lines(root / "all" / "zeroshot_classification_templates.txt")
        for part in ("all", "seen", "unseen"):
            own = read_lines(root / part / "classnames.txt")
            keep = torch.tensor([names[int(y)] in own for y in test.labels])
            labels = torch.tensor([own.index(names[int(y)]) for y in test.labels[keep]])
            with torch.no_grad():
                cls = build_classifier(model, model.text_tower.tokenizer_fn(), own, templates)
            m = zeroshot_metrics(test.embeddings[keep], labels, cls)
            out[f"zeroshot_{part}"] = {"top1": m["top1"], "classes": len(own), "samples": int(keep.sum()),
                                       "chance": 1 / len(own)}
    p = linear_probe(train.embeddings, train.labels, test.embeddings, test.labels)
    out["probe"] = {"top1": p["top1"], "weight_decay": p["weight_decay"]}
    k = knn_classify(train.embeddings, train.labels, test.embeddings, test.labels, ks=(1, 20))
    out["knn"] = {"top1@1": k["knn_top1@1"], "top1@20": k["knn_top1@20"]}
    return out
