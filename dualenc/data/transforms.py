"""Image transforms from the image tower's timm data config; tokenization happens at collate time."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any, Callable

import torch
from timm.data import create_transform


def image_transform(data_config: dict[str, Any], train: bool, scale: tuple[float, float] = (0.08, 1.0),
                    hflip: float = 0.5, color_jitter: float | None = None, interpolation: str | None = None,
                    uint8: bool = False) -> Callable:
    """timm's train (random resized crop + flip) or eval (resize + center crop) transform.

    ``interpolation`` overrides the data config's (e.g. ``bilinear``: cheaper than ``bicubic``).
    ``uint8=True`` stops at a uint8 CHW tensor (timm's prefetcher mode): no float conversion or
    normalization on the CPU; finish on the device with ``normalize_uint8``.
    """
    cfg = {k: data_config[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
           if k in data_config}
    if interpolation is not None:
        cfg["interpolation"] = interpolation
    if not train:
        return create_transform(**cfg, is_training=False, use_prefetcher=uint8)
    cfg.pop("crop_pct", None)
    cfg.pop("crop_mode", None)
    return create_transform(**cfg, is_training=True, scale=scale, hflip=hflip, color_jitter=color_jitter,
                            use_prefetcher=uint8)


def normalize_uint8(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``(..., 3, H, W)`` images -> float ``(x / 255 - mean) / std``, on the images' device."""
    m = torch.tensor(mean, device=images.device, dtype=torch.float32).view(-1, 1, 1) * 255
    s = torch.tensor(std, device=images.device, dtype=torch.float32).view(-1, 1, 1) * 255
    return images.float().sub_(m).div_(s)


def draft_min_side(data_config: dict[str, Any], train: bool, scale: tuple[float, float] = (0.08, 1.0),
                   ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> int:
    """Smallest shorter side a JPEG may be decoded down to (``SampleDecoder(draft_min_side=...)``)
    with the transform still getting at least its output resolution from the source pixels.

    Eval (resize shorter side to ``size / crop_pct``, center crop): that resize target. Train (random
    resized crop): the smallest crop, ``scale[0]`` of the area at the most extreme aspect ``ratio``,
    must keep ``size`` px on its shorter side; its shorter side is at least
    ``sqrt(scale[0] * min(ratio, 1/ratio))`` times the image's, hence ``size / sqrt(...)``. Pass a
    larger ``scale[0]`` than the transform's to decode faster, accepting upsampled small crops.
    """
    size = max(data_config["input_size"][-2:])
    if not train:
        return math.ceil(size / data_config.get("crop_pct", 1.0))
    worst = scale[0] * min(min(ratio), 1 / max(ratio))
    return math.ceil(size / math.sqrt(worst))


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
