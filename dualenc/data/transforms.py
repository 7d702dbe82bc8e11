"""Image transforms from the image tower's timm data config; tokenization happens at collate time."""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

import torch
from timm.data import create_transform


def image_transform(data_config: dict[str, Any], train: bool, scale: tuple[float, float] = (0.08, 1.0),
                    hflip: float = 0.5, color_jitter: float | None = None) -> Callable:
    """timm's train (random resized crop + flip) or eval (resize + center crop) transform."""
    cfg = {k: data_config[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
           if k in data_config}
    if not train:
        return create_transform(**cfg, is_training=False)
    cfg.pop("crop_pct", None)
    cfg.pop("crop_mode", None)
    return create_transform(**cfg, is_training=True, scale=scale, hflip=hflip, color_jitter=color_jitter)


class Collate:
    """Samples -> batch: stacked images, tokenized texts, keys, and the worker's skip counters."""

    def __init__(self, tokenize: Callable[[list[str]], dict[str, torch.Tensor]] | None,
                 skipped: Counter[str]) -> None:
        self.tokenize = tokenize
        self.skipped = skipped

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "image": torch.stack([s["image"] for s in samples]),
            "key": [s["__key__"] for s in samples],
            "text": [s["text"] for s in samples],
        }
        if self.tokenize is not None and samples[0]["text"] is not None:
            batch.update(self.tokenize(batch["text"]))
        if "label" in samples[0]:
            batch["label"] = torch.tensor([s["label"] for s in samples])
        info = torch.utils.data.get_worker_info()
        batch["worker"] = 0 if info is None else info.id
        batch["skipped"] = dict(self.skipped)  # cumulative in this worker; the module logs the sum
        return batch
