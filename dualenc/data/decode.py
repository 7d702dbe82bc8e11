"""Safe per-sample decoding: only the keys we use, never unpickling, skipping and counting bad samples."""

from __future__ import annotations

import io
import json
import math
import warnings
from collections import Counter
from typing import Any

from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def parse_caption(raw: Any, caption_field: str | None = None) -> tuple[str | None, str]:
    """A caption member's text, or ``(None, skip reason)``: ``non_utf8_caption``, ``bad_json`` (when the
    caption is ``caption_field`` of a JSON member, as in img2dataset's ``.json``) or ``empty_caption``."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError:
        return None, "non_utf8_caption"
    if caption_field:
        try:
            value = json.loads(text).get(caption_field)
        except (ValueError, AttributeError):
            return None, "bad_json"
        text = value if isinstance(value, str) else ""
    text = text.strip()
    return (text, "") if text else (None, "empty_caption")


class SampleDecoder:
    """Raw webdataset sample (``{"__key__": ..., "jpg": bytes, ...}``) -> ``{"image", "text"[, "label"]}``.

    Returns None for a sample to skip, and counts why in ``skipped`` (per worker process).
    """

    def __init__(self, caption_key: str | None = "txt", label_key: str | None = None,
                 image_keys: tuple[str, ...] = IMAGE_EXTS, max_pixels: int = 89_478_485,
                 caption_field: str | None = None, draft_min_side: int | None = None) -> None:
        self.caption_key = caption_key
        self.caption_field = caption_field  # caption inside a JSON member (e.g. img2dataset's .json)
        self.label_key = label_key
        self.image_keys = image_keys
        self.max_pixels = max_pixels  # PIL's own decompression-bomb default
        # JPEGs whose shorter side is at least twice this decode at 1/2, 1/4 or 1/8 scale (libjpeg's
        # DCT scaling, PIL's draft mode) keeping the shorter side >= draft_min_side: less work in the
        # decoder and in the resize after it. See transforms.draft_min_side for a safe value.
        self.draft_min_side = draft_min_side
        self.skipped: Counter[str] = Counter()

    def wanted(self, member_name: str) -> bool:
        """Which tar members to read at all; everything else (e.g. .pyd/.pth) is never extracted."""
        ext = member_name.rsplit(".", 1)[-1].lower() if "." in member_name else ""
        return ext in self.image_keys or ext in (self.caption_key, self.label_key)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        key = next((k for k in self.image_keys if k in sample), None)
        if key is None:
            return self._skip("missing_image")
        text = None
        if self.caption_key:
            raw = sample.get(self.caption_key)
            if raw is None:
                return self._skip("missing_caption")
            text, problem = parse_caption(raw, self.caption_field)
            if text is None:
                return self._skip(problem)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(sample[key]))
                if img.width * img.height > self.max_pixels:
                    return self._skip("too_many_pixels")
                if self.draft_min_side and img.format == "JPEG":
                    self._draft(img, self.draft_min_side)
                img = img.convert("RGB")  # forces the full decode: truncated files fail here
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            return self._skip("too_many_pixels")
        except Exception:  # noqa: BLE001 - any decoder failure means a corrupt image
            return self._skip("corrupt_image")
        out: dict[str, Any] = {"__key__": sample.get("__key__"), "image": img, "text": text}
        if self.label_key:
            try:
                out["label"] = int(sample[self.label_key].decode("utf-8").strip())
            except (KeyError, ValueError, UnicodeDecodeError):
                return self._skip("bad_label")
        return out

    @staticmethod
    def _draft(img: Image.Image, min_side: int) -> None:
        w, h = img.size
        short = min(w, h)
        if short >= 2 * min_side:  # PIL keeps both sides >= the requested ones
            img.draft("RGB", (math.ceil(w * min_side / short), math.ceil(h * min_side / short)))

    def _skip(self, reason: str) -> None:
        self.skipped[reason] += 1
        return None
