"""Linear probe on precomputed image features, following CLIP_benchmark's ``linear_probe`` protocol.

The protocol (CLIP_benchmark 1.6, after CLIP's appendix A.3, with AdamW in place of L-BFGS):

1. a validation part is carved from the train features (``val_proportion``) unless one is given;
2. a logistic regression (``nn.Linear`` + cross-entropy) is trained on the rest for ``epochs`` epochs of
   shuffled mini-batches, AdamW at ``lr`` with a cosine schedule and no warm-up, the weights initialised
   and the batches shuffled from ``seed``;
3. the weight decay is searched on ``logspace(-6, 2, 97)``: the 7 points of ``logspace(-6, 2, 7)``
   first, then around the best one with steps of 8, 4, 2 and 1 grid points, by validation top-1;
4. the probe is refitted on train + validation with the best weight decay and scored on the test
   features: top-1, top-5 and mean per-class recall (CLIP_benchmark's ``lp_*`` keys and ours).

Without a validation part (``val_proportion=0``) the weight decay is 0, as in CLIP_benchmark.
Same features, seed, batch size and schedule give CLIP_benchmark's numbers (tests/test_eval_probe.py):
the weights come from ``torch.manual_seed(seed)`` and the batches from a shuffling ``DataLoader``, as
there, inside ``torch.random.fork_rng`` so the caller's global RNG is left as it was.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset, random_split

WEIGHT_DECAYS = np.logspace(-6, 2, num=97).tolist()  # CLIP_benchmark's grid
COARSE_STEP = 16  # every 16th grid point is one of logspace(-6, 2, 7): the first pass
REFINE_SPANS = (8, 4, 2, 1)


def classification_metrics(scores: Tensor, labels: Tensor, num_classes: int) -> dict[str, Any]:
    """Top-1, top-5, mean per-class recall and per-class recall of (N, C) class scores.

    ``top5`` is top-min(5, C), as dualenc's zero-shot ``top5``; ``acc5`` is None below 5 classes
    (CLIP_benchmark writes NaN there). Mean per-class recall is sklearn's balanced accuracy
    (CLIP_benchmark's): the mean over the classes that occur among ``labels``.
    """
    scores, labels = scores.float().cpu(), labels.long().cpu()
    n = labels.shape[0]
    top = scores.topk(min(5, num_classes), dim=1).indices
    hit = top == labels[:, None]
    pred = top[:, 0]
    counts = torch.bincount(labels, minlength=num_classes).double()
    right = torch.bincount(labels[pred == labels], minlength=num_classes).double()
    present = counts > 0
    recall = torch.where(present, right / counts.clamp(min=1), torch.zeros_like(counts))
    top1 = float(hit[:, 0].double().sum() / n)
    top5 = float(hit.any(1).double().sum() / n)
    return {"top1": top1, "top5": top5, "acc1": top1, "acc5": top5 if num_classes >= 5 else None,
            "mean_per_class_recall": float(recall[present].mean()),
            "per_class_recall": recall.tolist(), "samples": n, "classes": num_classes}


def _cosine(total: int) -> Any:
    # CLIP_benchmark's cosine_lr without warm-up, as a LambdaLR factor of the base rate.
    return lambda step: 0.5 * (1 + math.cos(math.pi * step / total))


def train_linear(x: Tensor, y: Tensor, num_classes: int, weight_decay: float, lr: float = 0.1, epochs: int = 10,
                 batch_size: int = 64, seed: int = 0, device: torch.device | str = "cpu") -> torch.nn.Linear:
    """A logistic-regression layer fitted by AdamW on (x, y) (CLIP_benchmark's ``train``; see module doc)."""
    device = torch.device(device)
    # Evaluation runs under no_grad, and Lightning's test/validate loops under inference mode: fitting needs
    # autograd, which cannot save inference tensors, so those are cloned into normal ones.
    with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=[]):
        x, y = (t.clone() if t.is_inference() else t for t in (x, y))
        torch.manual_seed(seed)
        model = torch.nn.Linear(x.shape[1], num_classes).to(device)
        loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(epochs * len(loader)))
        loss_fn = torch.nn.CrossEntropyLoss()
        for _ in range(epochs):
            for xb, yb in loader:
                opt.zero_grad()
                loss_fn(model(xb.to(device)), yb.to(device)).backward()
                opt.step()
                sched.step()
    return model


@torch.no_grad()
def _logits(model: torch.nn.Linear, x: Tensor, chunk: int = 65536) -> Tensor:
    dev = model.weight.device
    return torch.cat([model(x[i : i + chunk].to(dev)).float().cpu() for i in range(0, x.shape[0], chunk)])


def search_weight_decay(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, num_classes: int,
                        **fit: Any) -> tuple[float, dict[float, float]]:
    """The weight decay of CLIP_benchmark's search (module doc, step 3) and every validation top-1 tried.

    Each probe is deterministic, so a grid point is fitted once even when the search revisits it.
    """
    tried: dict[int, float] = {}

    def acc(i: int) -> float:
        if i not in tried:
            model = train_linear(train_x, train_y, num_classes, WEIGHT_DECAYS[i], **fit)
            tried[i] = float((_logits(model, val_x).argmax(1) == val_y.cpu()).double().mean())
        return tried[i]

    def peak(candidates: list[int]) -> int:
        # As CLIP_benchmark: the first candidate with the highest accuracy; index 0 if none beats 0.
        best, best_acc = 0, 0.0
        for i in candidates:
            if best_acc < acc(i):
                best, best_acc = i, acc(i)
        return best

    best = peak(list(range(0, len(WEIGHT_DECAYS), COARSE_STEP)))
    for span in REFINE_SPANS:
        best = peak([max(best - span, 0), best, min(best + span, len(WEIGHT_DECAYS) - 1)])
    return WEIGHT_DECAYS[best], {WEIGHT_DECAYS[i]: a for i, a in sorted(tried.items())}


def _unit_rows(x: Tensor) -> bool:
    return bool(torch.allclose(x.norm(dim=1), torch.ones(x.shape[0]), atol=1e-3))


def _check(x: Tensor, y: Tensor, what: str) -> None:
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"{what}: need features (N, D) and one label per row, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{what} is empty: no labelled image was read")
    if int(y.min()) < 0:
        raise ValueError(f"{what}: labels must be class indices >= 0, got {int(y.min())}")


def linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, *, val_x: Tensor | None = None,
                 val_y: Tensor | None = None, val_proportion: float = 0.2, lr: float = 0.1, epochs: int = 10,
                 batch_size: int = 64, seed: int = 0, num_classes: int | None = None,
                 device: torch.device | str = "cpu") -> dict[str, Any]:
    """CLIP_benchmark's linear probe (module doc) on features; returns its metrics and ours.

    Features are used as given: dualenc's embeddings are L2-normalised, as CLIP_benchmark's are by
    default (``normalize=True``). ``val_x``/``val_y``: a validation split (else ``val_proportion`` of the
    train rows, drawn with ``seed``; 0: no search, weight decay 0). ``num_classes``: default the largest
    train label + 1, as CLIP_benchmark sizes its layer.

    Returns ``lp_acc1``, ``lp_acc5``, ``lp_mean_per_class_recall``, ``weight_decay``, ``epochs``,
    ``seed``, ``fewshot_k`` (always -1: the whole train split), ``normalized`` (rows of unit norm) under
    CLIP_benchmark's names (``lp_acc5`` None below 5 classes), ``top1``/``top5``/``mean_per_class_recall``
    (dualenc's), and
    ``per_class_recall``, ``val_top1`` (weight decay -> validation top-1), ``samples``, ``classes``.
    """
    _check(train_x, train_y, "train features")
    _check(test_x, test_y, "test features")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"feature sizes differ: train {train_x.shape[1]}, test {test_x.shape[1]}; embed both "
                         "splits with the same model")
    if (val_x is None) != (val_y is None):
        raise ValueError("give val_x and val_y together")
    n_cls = num_classes or int(train_y.max()) + 1
    for what, y in (("test", test_y), ("validation", val_y)):
        if y is not None and int(y.max()) >= n_cls:
            raise ValueError(f"{what} label {int(y.max())} never occurs in the train split ({n_cls} classes); a "
                             "linear probe cannot learn a class it never sees")
    train_x, train_y, test_x = train_x.float(), train_y.long(), test_x.float()
    if val_x is None and val_proportion > 0:
        if not 0 < val_proportion < 1:
            raise ValueError(f"val_proportion must be in [0, 1), got {val_proportion}")
        fit_part, val_part = random_split(range(train_x.shape[0]), [1 - val_proportion, val_proportion],
                                          generator=torch.Generator().manual_seed(seed))
        fit_idx, val_idx = torch.tensor(list(fit_part)), torch.tensor(list(val_part))
        if len(val_idx) == 0 or len(fit_idx) == 0:
            raise ValueError(f"{train_x.shape[0]} train rows are too few to carve a validation part of "
                             f"{val_proportion}; give more train data or val_proportion=0 (no search)")
        train_x, train_y, val_x, val_y = train_x[fit_idx], train_y[fit_idx], train_x[val_idx], train_y[val_idx]
    fit = {"lr": lr, "epochs": epochs, "batch_size": batch_size, "seed": seed, "device": device}
    wd, val_acc = 0.0, {}
    if val_x is not None and val_y is not None:
        _check(val_x, val_y, "validation features")
        val_x, val_y = val_x.float(), val_y.long()
        wd, val_acc = search_weight_decay(train_x, train_y, val_x, val_y, n_cls, **fit)
        train_x, train_y = torch.cat([train_x, val_x]), torch.cat([train_y, val_y])  # refit on train + val
    model = train_linear(train_x, train_y, n_cls, wd, **fit)
    out = classification_metrics(_logits(model, test_x), test_y, n_cls)
    out.update({"lp_acc1": out["top1"], "lp_acc5": out["acc5"], "lp_mean_per_class_recall":
                out["mean_per_class_recall"], "weight_decay": wd, "epochs": epochs, "seed": seed, "fewshot_k": -1,
                "normalized": _unit_rows(train_x), "val_top1": val_acc, "lr": lr, "batch_size": batch_size})
    return out
