"""Image-tower evaluations on a labelled train and test split: linear probe and kNN classification.

Both need the image embeddings of two splits of a CLIP_benchmark root (``root/{train,test}/*.tar`` with
``.cls`` labels); nothing else of the model (no text tower, no prompts). :func:`embed_splits` is the
embedding step for one process; ``EvalSuite`` embeds the splits on every rank and scores on rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dualenc.errors import UserError
from dualenc.eval.encode import EncodedImages, encode_images, eval_batches, shard_urls
from dualenc.eval.layout import benchmark_split, is_benchmark_root
from dualenc.eval.knn import DEFAULT_KS, DEFAULT_TEMPERATURE, WEIGHTINGS, knn_classify
from dualenc.eval.probe import linear_probe
from dualenc.model import DualEncoder
from dualenc.progress import sample_total


def check_splits(data: str, train_split: str = "train", split: str = "test") -> None:
    """Fail unless ``data`` is a CLIP_benchmark root holding both splits, and they differ (a flat shard
    folder would give the same images as train and test: a probe scored on what it was fitted on)."""
    if not is_benchmark_root(data):
        raise UserError(f"{data} is not a CLIP_benchmark root; a linear probe or kNN needs ROOT/{train_split}/*.tar "
                        f"and ROOT/{split}/*.tar (with .cls labels): give the folder that holds both splits")
    if train_split == split:
        raise UserError(f"the train and scored splits are both {split!r}; give different splits "
                        "(--train-split / --split, or train_split / split)")
    for part, flag in ((train_split, "--train-split"), (split, "--split")):
        try:
            benchmark_split(data, part)
        except UserError as e:
            raise UserError(f"{e} (here: {flag} / {flag[2:].replace('-', '_')})") from None


@dataclass
class LinearProbeSet:
    """A linear probe (``dualenc.eval.probe``) fitted on ``train_split``, scored on ``split``."""

    name: str
    data: str  # a CLIP_benchmark root with both splits
    split: str = "test"
    train_split: str = "train"
    val_proportion: float = 0.2
    lr: float = 0.1
    epochs: int = 10
    batch_size: int = 64
    seed: int = 0
    task = "linear_probe"

    def check(self) -> None:
        check_splits(self.data, self.train_split, self.split)

    def keys(self) -> list[str]:
        return [f"{self.name}/{k}" for k in ("top1", "top5", "mean_per_class_recall", "weight_decay")]

    def score(self, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
              device: torch.device | str = "cpu") -> dict[str, Any]:
        return linear_probe(train_x, train_y, test_x, test_y, val_proportion=self.val_proportion, lr=self.lr,
                            epochs=self.epochs, batch_size=self.batch_size, seed=self.seed, device=device)


@dataclass
class KnnSet:
    """kNN classification (``dualenc.eval.knn``) of ``split`` against ``train_split``."""

    name: str
    data: str
    split: str = "test"
    train_split: str = "train"
    ks: tuple[int, ...] = DEFAULT_KS
    temperature: float = DEFAULT_TEMPERATURE
    weighting: str = "dino"
    task = "knn_classification"

    def check(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        check_splits(self.data, self.train_split, self.split)

    def keys(self) -> list[str]:
        return [f"{self.name}/knn_{m}@{k}" for k in self.ks for m in ("top1", "mean_per_class_recall")]

    def score(self, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
              device: torch.device | str = "cpu") -> dict[str, Any]:
        return knn_classify(train_x, train_y, test_x, test_y, ks=tuple(self.ks), temperature=self.temperature,
                            weighting=self.weighting, device=device)


def by_key(emb: Tensor, labels: Tensor, keys: list[str]) -> tuple[Tensor, Tensor]:
    """Rows sorted by sample key: the probe's seeded validation split and batches then do not depend on how
    many ranks read the shards, or in which order they were gathered."""
    order = torch.tensor(sorted(range(len(keys)), key=keys.__getitem__), dtype=torch.long)
    return emb[order], labels[order]


def embed_splits(model: DualEncoder, data: str, train_split: str = "train", split: str = "test",
                 batch_size: int = 256, num_workers: int = 2, device: torch.device | str = "cpu",
                 show_progress: bool = False) -> tuple[EncodedImages, EncodedImages]:
    """L2-normalised image embeddings and labels of ``data``'s train and test splits (one process), each
    with its rows in sample-key order (:func:`by_key`), as ``EvalSuite`` scores them."""
    check_splits(data, train_split, split)
    out = []
    for part in (train_split, split):
        batches = eval_batches(data, model.image_tower.data_config, batch_size, num_workers, labels=True, split=part)
        total = sample_total(shard_urls(data, part)) if show_progress else None
        enc = encode_images(model, batches, device, labels=True, name=f"{data} ({part} split)",
                            show_progress=show_progress, total=total)
        assert enc.labels is not None
        enc.embeddings, enc.labels = by_key(enc.embeddings, enc.labels, enc.keys)
        enc.keys = sorted(enc.keys)
        out.append(enc)
    return out[0], out[1]
