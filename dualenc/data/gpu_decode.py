"""GPU JPEG decode: loader workers only read bytes and draw crop parameters; decode, random resized
crop, resize and flip run on the device (``WebDataModule(gpu_decode=True)``).

On a 16-core box the CPU path (PIL decode + timm's crop/resize per sample) cannot feed ViT-B/32-class
rates of 5,000+ samples/s; with this path a worker only parses the JPEG header (PIL reads the size
without decoding), draws the crop exactly as timm's ``RandomResizedCropAndInterpolation`` and
torchvision's flip would (same RNG calls in the same order: same crops for the same seed) and ships
the encoded bytes. On the device, ``torchvision.io.decode_jpeg(list, device="cuda")`` decodes the
whole batch with nvJPEG, then each image is cropped, resized (antialiased, the tower's filter) and
flipped, and the batch is stacked as uint8 for the usual on-device normalization.

Training only (validation keeps the worker path); no colour jitter. PNG/WebP members (rare in
img2dataset shards) are decoded on the host with ``torchvision.io.decode_image`` and then take
the same device path.
"""

from __future__ import annotations

import io
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import torch
from PIL import Image

from dualenc.data.decode import IMAGE_EXTS, parse_caption

__all__ = ["EncodedImage", "ByteDecoder", "CropParams", "ByteCollate", "decode_batch", "byte_preprocessing"]


@dataclass
class EncodedImage:
    """An image as stored (bytes), its size from the header, and (after ``CropParams``) its crop."""

    data: bytes
    width: int
    height: int
    jpeg: bool
    crop: tuple[int, int, int, int] | None = None  # top, left, height, width in source pixels
    flip: bool = False


class ByteDecoder:
    """Raw sample -> ``{"__key__", "image": EncodedImage, "text"}`` without decoding pixels.

    Skips and counts like ``SampleDecoder`` (missing image or caption, bad UTF-8/JSON, empty caption,
    unreadable header, too many pixels); a JPEG whose body is corrupt fails later, on the device.
    """

    def __init__(self, caption_key: str = "txt", caption_field: str | None = None,
                 max_pixels: int = 89_478_485, image_keys: tuple[str, ...] = IMAGE_EXTS) -> None:
        self.caption_key, self.caption_field, self.max_pixels, self.image_keys = (caption_key, caption_field,
                                                                                    max_pixels, image_keys)
        self.skipped: Counter[str] = Counter()

    def wanted(self, member_name: str) -> bool:
        ext = member_name.rsplit(".", 1)[-1].lower() if "." in member_name else ""
        return ext in self.image_keys or ext == self.caption_key

    def _caption(self, raw: Any) -> str | None:
        text, problem = parse_caption(raw, self.caption_field)
        return text if text is not None else self._skip(problem)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        key = next((k for k in self.image_keys if k in sample), None)
        if key is None:
            return self._skip("missing_image")
        if sample.get(self.caption_key) is None:
            return self._skip("missing_caption")
        text = self._caption(sample[self.caption_key])
        if text is None:
            return None
        data = sample[key]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))  # header only: no pixel is decoded here
                width, height, fmt = img.width, img.height, img.format
        except Exception:  # noqa: BLE001 - an unreadable header means a corrupt image
            return self._skip("corrupt_image")
        if width * height > self.max_pixels:
            return self._skip("too_many_pixels")
        return {"__key__": sample.get("__key__"), "image": EncodedImage(data, width, height, fmt == "JPEG"),
                "text": text}

    def _skip(self, reason: str) -> None:
        self.skipped[reason] += 1
        return None


class CropParams:
    """The worker half of timm's train transform: draws (crop, flip) exactly as the timm transform
    built from the same data config would, and leaves the pixels alone."""

    def __init__(self, timm_transform: Callable) -> None:
        from timm.data.transforms import RandomResizedCropAndInterpolation
        from torchvision.transforms import ColorJitter, RandomHorizontalFlip

        steps = getattr(timm_transform, "transforms", [])
        rrc = [t for t in steps if isinstance(t, RandomResizedCropAndInterpolation)]
        if len(rrc) != 1:
            raise ValueError("gpu_decode needs timm's train transform (one random resized crop)")
        if any(isinstance(t, ColorJitter) for t in steps):
            raise ValueError("gpu_decode does not do colour jitter: set data.color_jitter null or gpu_decode false")
        self.crop = rrc[0]
        flips = [t for t in steps if isinstance(t, RandomHorizontalFlip)]
        self.hflip = flips[0].p if flips else 0.0
        self.size = tuple(self.crop.size)
        interp = self.crop.interpolation
        self.interpolation = interp[0] if isinstance(interp, (list, tuple)) else interp

    def __call__(self, image: EncodedImage) -> EncodedImage:
        # A zero-copy stand-in with the image's size: timm reads only the size (python `random` draws).
        shape = torch.empty(1, 1, 1).expand(1, image.height, image.width)
        image.crop = tuple(int(v) for v in self.crop.get_params(shape, self.crop.scale, self.crop.ratio))
        # torchvision's RandomHorizontalFlip draws from torch's RNG, after the crop: the same order.
        image.flip = bool(self.hflip > 0 and torch.rand(1) < self.hflip)
        return image


class ByteCollate:
    """Samples -> batch with ``jpeg`` (list of bytes: Lightning moves no bytes to the device),
    ``crop`` (list of ``(top, left, h, w, flip)`` on the host, so reading it costs no device sync),
    tokenized texts, keys and the worker's skip counters."""

    def __init__(self, tokenize: Callable | None, skipped: Counter[str]) -> None:
        self.tokenize, self.skipped = tokenize, skipped

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        images = [s["image"] for s in samples]
        batch: dict[str, Any] = {
            "jpeg": [im.data for im in images],
            "jpeg_is_jpeg": [im.jpeg for im in images],
            "crop": [(*im.crop, int(im.flip)) for im in images],
            "key": [s["__key__"] for s in samples],
            "text": [s["text"] for s in samples],
        }
        if self.tokenize is not None:
            batch.update(self.tokenize(batch["text"]))
        info = torch.utils.data.get_worker_info()
        batch["worker"] = 0 if info is None else info.id
        batch["skipped"] = dict(self.skipped)
        return batch


def _decode(data: list[bytes], is_jpeg: list[bool], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in data]
    out: list[torch.Tensor | None] = [None] * len(tensors)
    jpegs = [i for i, j in enumerate(is_jpeg) if j]
    if jpegs:  # one batched call: nvJPEG on CUDA
        decoded = decode_jpeg([tensors[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
        for i, img in zip(jpegs, decoded):
            out[i] = img
    for i, j in enumerate(is_jpeg):
        if not j:
            out[i] = decode_image(tensors[i], mode=ImageReadMode.RGB).to(device, non_blocking=True)
    return out  # type: ignore[return-value]


def decode_batch(data: list[bytes], crops: list[tuple[int, int, int, int, int]], size: tuple[int, int],
                 interpolation: Any, device: torch.device | str, is_jpeg: list[bool] | None = None) -> torch.Tensor:
    """Encoded images -> ``(B, 3, H, W)`` uint8 on ``device``: decode, crop, resize (antialiased), flip."""
    from torchvision.transforms.v2 import functional as TF

    device = torch.device(device)
    images = _decode(data, is_jpeg if is_jpeg is not None else [True] * len(data), device)
    out = torch.empty((len(images), 3, *size), dtype=torch.uint8, device=device)
    for k, (img, (top, left, h, w, flip)) in enumerate(zip(images, crops)):
        img = TF.resized_crop(img, top, left, h, w, list(size), interpolation=interpolation, antialias=True)
        out[k] = img.flip(-1) if flip else img
    return out


def byte_preprocessing(data_config: dict[str, Any], decoder_args: dict[str, Any], aug: dict[str, Any],
                       interpolation: str | None, tokenize: Callable | None) -> tuple[ByteDecoder, CropParams, ByteCollate]:
    """The worker side of the GPU decode path for ``WebDataModule``'s training loader."""
    from dualenc.data.transforms import image_transform

    if aug.get("color_jitter"):
        raise ValueError("gpu_decode does not do colour jitter: set data.color_jitter null or gpu_decode false")
    decoder = ByteDecoder(caption_key=decoder_args.get("caption_key") or "txt",
                          caption_field=decoder_args.get("caption_field"),
                          max_pixels=decoder_args.get("max_pixels", 89_478_485))
    params = CropParams(image_transform(data_config, train=True, **aug, interpolation=interpolation, uint8=True))
    return decoder, params, ByteCollate(tokenize, decoder.skipped)
