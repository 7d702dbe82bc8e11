"""Zero-shot classification: class names x prompt templates, prompt ensembling, top-k accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassRecall

from dualenc.model import DualEncoder


def read_lines(path: str | Path) -> list[str]:
    """Non-empty stripped lines of a text file (class names, templates)."""
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    return [ln for ln in lines if ln]


def check_templates(templates: list[str]) -> None:
    bad = [t for t in templates if "{c}" not in t]
    if not templates or bad:
        raise ValueError(f"every prompt template needs '{{c}}' where the class name goes; bad: {bad or 'none given'}")


@torch.no_grad()
def build_classifier(model: DualEncoder, tokenize: Callable[[list[str]], dict[str, torch.Tensor]],
                     classnames: list[str], templates: list[str], device: torch.device | str = "cpu",
                     batch_size: int = 256) -> torch.Tensor:
    """(C, D) class embeddings: mean of each class's normalized prompt embeddings, renormalized."""
    check_templates(templates)
    if not classnames:
        raise ValueError("no class names given")
    prompts = [t.replace("{c}", c) for c in classnames for t in templates]
    chunks = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenize(prompts[i : i + batch_size])
        chunks.append(model.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device)))
    emb = torch.cat(chunks).view(len(classnames), len(templates), -1)
    return F.normalize(F.normalize(emb, dim=-1).mean(dim=1), dim=-1)


@torch.no_grad()
def evaluate(model: DualEncoder, batches: Iterable[dict[str, Any]], classifier: torch.Tensor,
             device: torch.device | str = "cpu") -> dict[str, float]:
    """Top-1, top-5 and mean per-class recall of ``classifier`` on labelled image batches
    (:func:`zeroshot_metrics` of their embeddings)."""
    embs, labs = [], []
    for batch in batches:
        embs.append(model.encode_image(batch["image"].to(device)).float().cpu())
        labs.append(batch["label"].long().cpu())
    if not embs:
        raise ValueError("the evaluation set is empty: no labelled image was read")
    return zeroshot_metrics(torch.cat(embs), torch.cat(labs), classifier)


@torch.no_grad()
def zeroshot_metrics(image_emb: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor,
                     per_class: bool = False, chunk: int = 8192) -> dict[str, Any]:
    """:func:`evaluate`'s metrics from precomputed image embeddings (e.g. gathered from all ranks).

    With ``per_class``, adds ``per_class_recall``: one recall (accuracy) per class, in class order.
    """
    n = classifier.shape[0]
    if image_emb.ndim != 2 or image_emb.shape[1] != classifier.shape[1]:
        raise ValueError(f"embedding sizes differ: images {tuple(image_emb.shape)}, classifier "
                         f"{tuple(classifier.shape)}; embed both with the same model")
    if image_emb.shape[0] == 0:
        raise ValueError("the evaluation set is empty: no labelled image was read")
    if labels.shape != (image_emb.shape[0],):
        raise ValueError(f"need one label per image: {tuple(labels.shape)} labels for {image_emb.shape[0]} images")
    if int(labels.min()) < 0 or int(labels.max()) >= n:
        bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
        raise ValueError(f"label {bad} is out of range for {n} class names")
    # The embeddings are already global (gathered): torchmetrics must not sync across ranks again,
    # and only rank 0 calls this, so a sync would wait forever.
    kw = {"sync_on_compute": False}
    metrics = {
        "top1": MulticlassAccuracy(num_classes=n, top_k=1, average="micro", **kw),
        "top5": MulticlassAccuracy(num_classes=n, top_k=min(5, n), average="micro", **kw),
        "per_class_recall": MulticlassRecall(num_classes=n, average=None, **kw),
    }
    cls = classifier.float().cpu()
    for i in range(0, image_emb.shape[0], chunk):
        logits = image_emb[i : i + chunk].float().cpu() @ cls.T
        for m in metrics.values():
            m.update(logits, labels[i : i + chunk].cpu())
    out: dict[str, Any] = {k: float(m.compute()) for k, m in metrics.items() if k != "per_class_recall"}
    recall = metrics["per_class_recall"].compute()
    # CLIP_benchmark's mean_per_class_recall is sklearn's balanced accuracy: the mean over the classes
    # that occur among the labels (torchmetrics' macro average would count absent classes as 0).
    present = torch.bincount(labels.cpu().long(), minlength=n) > 0
    out["mean_per_class_recall"] = float(recall[present].mean())
    # CLIP_benchmark's names; like it, no acc5 below 5 classes (it writes NaN; null here is valid JSON).
    out["acc1"], out["acc5"] = out["top1"], (out["top5"] if n >= 5 else None)
    if per_class:
        out["per_class_recall"] = recall.tolist()
    out["samples"] = int(image_emb.shape[0])
    out["classes"] = n
    return out
