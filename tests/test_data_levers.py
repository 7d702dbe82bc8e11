"""CPU-saving levers of the data path: JPEG draft decoding, uint8 images normalized on the device,
an interpolation override. Each switch is checked against the plain path."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode

from dualenc.data.datamodule import WebDataModule
from dualenc.data.decode import SampleDecoder
from dualenc.data.transforms import draft_min_side, image_transform, normalize_uint8
from dualenc.data_tools.writer import ShardWriter

CFG = {"input_size": (3, 64, 64), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
       "std": (0.229, 0.224, 0.225), "crop_pct": 0.875, "crop_mode": "center"}


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth colour field with some texture: compresses and resamples roughly like a photo."""
    rng = np.random.default_rng(seed)
    low = rng.uniform(0, 255, (4, 5, 3)).astype(np.uint8)
    img = Image.fromarray(low).resize((w, h), Image.BICUBIC)
    noise = rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8))


def _encode(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=90) if fmt == "JPEG" else img.save(buf, format=fmt)
    return buf.getvalue()


def _decode(decoder: SampleDecoder, data: bytes, ext: str = "jpg") -> Image.Image:
    out = decoder({"__key__": "k", ext: data, "txt": b"a photo"})
    assert out is not None
    return out["image"]


def test_draft_min_side_values() -> None:
    assert draft_min_side(CFG, train=False) == 74  # resize target: ceil(64 / 0.875)
    cfg224 = {**CFG, "input_size": (3, 224, 224)}
    assert draft_min_side(cfg224, train=False) == 256
    # Train: the smallest crop (scale 0.08 at aspect 3/4) must keep 224 px on its shorter side.
    assert draft_min_side(cfg224, train=True) == 915
    assert draft_min_side(cfg224, train=True, scale=(1.0, 1.0)) == 259
    assert draft_min_side(cfg224, train=True, scale=(0.25, 1.0)) == 518


def test_draft_decodes_large_jpegs_at_reduced_scale() -> None:
    data = _encode(_photo(1024, 768))
    assert _decode(SampleDecoder(), data).size == (1024, 768)
    assert _decode(SampleDecoder(draft_min_side=256), data).size == (512, 384)  # 1/2: 384 >= 256, 1/4: 192 < 256
    assert _decode(SampleDecoder(draft_min_side=100), data).size == (256, 192)  # 1/4
    assert _decode(SampleDecoder(draft_min_side=96), data).size == (128, 96)  # 1/8, libjpeg's smallest
    assert _decode(SampleDecoder(draft_min_side=385), data).size == (1024, 768)  # 1/2 would give 384 < 385
    png = _encode(_photo(1024, 768), "PNG")
    assert _decode(SampleDecoder(draft_min_side=96), png, "png").size == (1024, 768)  # JPEG only
    # The pixel limit still applies to the full size, before any draft.
    assert SampleDecoder(max_pixels=1000 * 700, draft_min_side=96)({"__key__": "k", "jpg": data, "txt": b"x"}) is None


def test_safe_draft_keeps_eval_output_size_and_content() -> None:
    data = _encode(_photo(800, 600))
    dm = _dm(jpeg_draft=True, uint8_images=False)
    decoder, transform = dm.preprocessing(train=False)
    assert decoder.draft_min_side == 74
    drafted = _decode(decoder, data)
    assert drafted.size == (100, 75)  # 1/8 scale: shorter side 75 >= 74
    full = transform(_decode(SampleDecoder(), data))
    fast = transform(drafted)
    assert fast.shape == full.shape == (3, 64, 64)
    # Same picture: DCT-domain downscaling then resize vs full decode then resize. Difference in
    # normalized units (1.0 ~ 58 grey levels).
    assert (fast - full).abs().mean() < 0.03


def test_safe_draft_in_training_guards_the_smallest_crop() -> None:
    data = _encode(_photo(1024, 768))
    decoder, _ = _dm(jpeg_draft=True, crop_scale=(0.08, 1.0)).preprocessing(train=True)
    assert decoder.draft_min_side == draft_min_side(CFG, True, (0.08, 1.0)) == 262  # 64 / sqrt(0.08 * 3/4)
    img = _decode(decoder, data)
    assert img.size == (512, 384)  # 1/2; 1/4 would leave 192 < 262
    smallest_crop_side = (0.08 * img.width * img.height * 3 / 4) ** 0.5
    assert smallest_crop_side >= 64  # still no crop upsampled beyond what a full decode gives
    decoder, transform = _dm(jpeg_draft=True, draft_crop_scale=1.0).preprocessing(train=True)
    img = _decode(decoder, data)
    assert img.size == (128, 96)  # opt-in: only near-whole-image crops are guaranteed 64+ px
    assert transform(img).shape == (3, 64, 64)
    decoder, _ = _dm(jpeg_draft=False).preprocessing(train=True)
    assert decoder.draft_min_side is None
    with pytest.raises(ValueError, match="draft_crop_scale"):
        _dm(draft_crop_scale=0.0)


@pytest.mark.parametrize("train", [False, True])
def test_uint8_then_device_normalize_equals_float_path(train: bool) -> None:
    img = _photo(300, 200, seed=3)
    kw = {"scale": (1.0, 1.0), "hflip": 0.0} if train else {}  # deterministic crop for the comparison
    ref = image_transform(CFG, train=train, **kw)(img)
    raw = image_transform(CFG, train=train, uint8=True, **kw)(img)
    assert raw.dtype == torch.uint8 and ref.dtype == torch.float32 and raw.shape == ref.shape
    torch.testing.assert_close(normalize_uint8(raw[None], CFG["mean"], CFG["std"])[0], ref, atol=1e-5, rtol=0)


def test_interpolation_override() -> None:
    assert image_transform(CFG, train=False).transforms[0].interpolation == InterpolationMode.BICUBIC
    t = image_transform(CFG, train=False, interpolation="bilinear")
    assert t.transforms[0].interpolation == InterpolationMode.BILINEAR
    train = image_transform(CFG, train=True, interpolation="bilinear").transforms[0]
    assert "bilinear" in repr(train).lower() and "bicubic" not in repr(train).lower()


def _dm(tmp: Path | None = None, **kw) -> WebDataModule:
    dm = WebDataModule(train=str(tmp) if tmp else None, val=str(tmp) if tmp else None, batch_size=4,
                       num_workers=0, **kw)
    dm.set_preprocessing(CFG, None)
    return dm


def test_datamodule_uint8_batches_normalize_on_transfer(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, max_count=4) as w:
        for i in range(8):
            w.write(f"s{i:03d}", _encode(_photo(320 + 8 * i, 240, seed=i)), f"caption {i}")
    fast, plain = _dm(tmp_path), _dm(tmp_path, uint8_images=False, jpeg_draft=False)
    assert fast.uint8_images and fast.jpeg_draft  # the defaults
    for a, b in zip(fast.val_dataloader(), plain.val_dataloader()):
        assert a["image"].dtype == torch.uint8 and b["image"].dtype == torch.float32
        assert a["key"] == b["key"]
        out = fast.on_after_batch_transfer(a, 0)  # what Lightning calls after moving the batch
        assert out["image"].dtype == torch.float32
        # The default draft decodes these (shorter side 240 >= 2 x 74) at 1/2 scale: the same
        # picture within resampling differences.
        assert (out["image"] - b["image"]).abs().mean() < 0.03
    same = _dm(tmp_path, jpeg_draft=False)
    for a, b in zip(same.val_dataloader(), plain.val_dataloader()):
        torch.testing.assert_close(same.on_after_batch_transfer(a, 0)["image"], b["image"], atol=1e-5, rtol=0)
    float_batch = {"image": torch.zeros(2, 3, 4, 4)}
    assert plain.on_after_batch_transfer(float_batch, 0)["image"] is float_batch["image"]  # untouched
    train = next(iter(fast.train_dataloader()))
    assert train["image"].dtype == torch.uint8 and train["image"].shape == (4, 3, 64, 64)
