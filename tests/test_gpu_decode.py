"""GPU decode path (dualenc.data.gpu_decode), checked on the CPU: the workers' byte path draws the
same crops as the worker (PIL + timm) path for the same RNG state, and the device-side decode +
crop/resize/flip gives the same images up to JPEG-decoder and resize-kernel rounding."""

from __future__ import annotations

import io
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dualenc.data.gpu_decode import ByteCollate, ByteDecoder, CropParams, decode_batch
from dualenc.data.transforms import image_transform

CFG = {"input_size": (3, 64, 64), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
       "std": (0.229, 0.224, 0.225), "crop_pct": 0.875}


def _photo(width: int, height: int, seed: int) -> bytes:
    """A smooth, textured JPEG (gradients + a few shapes): like a photo, unlike noise, for the decoders."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([x / width * 255, y / height * 255, (np.sin(x / 7 + seed) * np.cos(y / 11)) * 127 + 128], -1)
    img += rng.normal(0, 4, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


SIZES = [(320, 240), (200, 300), (257, 129), (96, 96), (640, 480)]


def _worker_path(data: bytes, transform) -> torch.Tensor:
    return transform(Image.open(io.BytesIO(data)).convert("RGB"))


def test_crop_params_are_the_worker_paths_crops() -> None:
    """Same seed -> the byte path's (crop, flip) reproduce timm's transform output bit for bit on PIL."""
    from torchvision.transforms.functional import InterpolationMode

    transform = image_transform(CFG, train=True, uint8=True)
    params = CropParams(transform)
    assert params.size == (64, 64) and params.interpolation == InterpolationMode.BICUBIC and params.hflip == 0.5
    flips = 0
    for k, (w, h) in enumerate(SIZES * 4):
        data = _photo(w, h, k)
        random.seed(k), torch.manual_seed(k)
        enc = params(ByteDecoder()({"__key__": str(k), "jpg": data, "txt": b"a caption"})["image"])
        random.seed(k), torch.manual_seed(k)
        expected = _worker_path(data, transform)
        top, left, ch, cw = enc.crop
        pil = Image.open(io.BytesIO(data)).convert("RGB").crop((left, top, left + cw, top + ch))
        pil = pil.resize((64, 64), Image.BICUBIC)
        if enc.flip:
            pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
        flips += enc.flip
        assert torch.equal(torch.from_numpy(np.array(pil)).permute(2, 0, 1), expected), (k, enc.crop)
    assert 0 < flips < len(SIZES) * 4


def test_device_decode_matches_the_worker_path() -> None:
    """decode_batch (torchvision decode_jpeg + antialiased bicubic resized_crop + flip; on CUDA the same
    calls run on nvJPEG) against PIL decode + timm: within rounding of the two resize kernels."""
    transform = image_transform(CFG, train=True, uint8=True)
    params = CropParams(transform)
    datas, crops, expected = [], [], []
    for k, (w, h) in enumerate(SIZES * 2):
        data = _photo(w, h, 100 + k)
        random.seed(k), torch.manual_seed(k)
        enc = params(ByteDecoder()({"__key__": str(k), "jpg": data, "txt": b"x"})["image"])
        random.seed(k), torch.manual_seed(k)
        expected.append(_worker_path(data, transform))
        datas.append(data)
        crops.append((*enc.crop, int(enc.flip)))
    got = decode_batch(datas, crops, params.size, params.interpolation, "cpu")
    assert got.dtype == torch.uint8 and got.shape == (len(datas), 3, 64, 64)
    diff = (got.int() - torch.stack(expected).int()).abs().float()
    # Same decoder library, same crop: only the two bicubic kernels' rounding differs (measured here:
    # mean 0.015 levels, max 1).
    assert diff.mean() < 0.25 and diff.max() <= 2, (diff.mean(), diff.max())


def test_png_members_take_the_host_decode(tmp_path: Path) -> None:
    img = Image.fromarray(np.full((40, 50, 3), (10, 200, 30), np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    enc = ByteDecoder()({"__key__": "p", "png": buf.getvalue(), "txt": b"green"})["image"]
    assert not enc.jpeg and (enc.width, enc.height) == (50, 40)
    out = decode_batch([enc.data], [(0, 0, 40, 50, 0)], (16, 16), CropParams(
        image_transform(CFG, train=True, uint8=True)).interpolation, "cpu", [False])
    assert out.shape == (1, 3, 16, 16) and out[0, :, 8, 8].tolist() == [10, 200, 30]


def test_byte_decoder_skips_and_counts_like_the_sample_decoder() -> None:
    dec = ByteDecoder()
    assert dec({"__key__": "a", "txt": b"x"}) is None
    assert dec({"__key__": "b", "jpg": b"not a jpeg", "txt": b"x"}) is None
    assert dec({"__key__": "c", "jpg": _photo(20, 20, 0), "txt": b"   "}) is None
    assert dec({"__key__": "d", "jpg": _photo(20, 20, 0)}) is None
    assert dec.skipped == Counter(missing_image=1, corrupt_image=1, empty_caption=1, missing_caption=1)
    assert dec.wanted("x/0001.jpg") and dec.wanted("0001.txt") and not dec.wanted("0001.pth")


def test_byte_path_refuses_colour_jitter() -> None:
    with pytest.raises(ValueError, match="colour jitter"):
        CropParams(image_transform(CFG, train=True, color_jitter=0.4, uint8=True))


def test_datamodule_gpu_decode_gives_the_worker_paths_batches(demo_data: Path) -> None:
    """Same seed, same shards: the gpu_decode loader's batches (decoded "on the device", here the CPU)
    equal the worker path's up to resize rounding: same samples, same crops, same flips."""
    from dualenc.data.datamodule import WebDataModule
    from dualenc.towers.text import Tokenize, load_tokenizer

    tokenize = Tokenize(load_tokenizer(str(demo_data / "tokenizer")), 16)
    cfg = dict(CFG, input_size=(3, 32, 32))
    batches = {}
    for gpu in (False, True):
        dm = WebDataModule(train=str(demo_data / "train"), batch_size=16, num_workers=0, jpeg_draft=False,
                           gpu_decode=gpu)
        dm.set_preprocessing(cfg, tokenize)
        random.seed(0), torch.manual_seed(0)
        loader = dm.train_dataloader()
        batch = dm.on_after_batch_transfer(next(iter(loader)), 0)
        assert batch["image"].dtype == torch.float32 and batch["image"].shape == (16, 3, 32, 32)
        assert "jpeg" not in batch and "crop" not in batch
        batches[gpu] = batch
    assert batches[True]["key"] == batches[False]["key"]
    assert torch.equal(batches[True]["input_ids"], batches[False]["input_ids"])
    std = torch.tensor(CFG["std"]).view(1, 3, 1, 1) * 255
    diff = (batches[True]["image"] - batches[False]["image"]).abs() * std  # back to pixel levels
    assert diff.mean() < 0.25 and diff.max() < 2.01, (diff.mean(), diff.max())


def test_byte_collate_keeps_bytes_and_crops_on_the_host() -> None:
    from dualenc.data.gpu_decode import EncodedImage

    samples = [{"__key__": str(i), "image": EncodedImage(b"\xff\xd8", 4, 4, True, (0, 0, 4, 4), i == 1),
                "text": "t"} for i in range(2)]
    batch = ByteCollate(None, Counter())(samples)
    assert batch["jpeg"] == [b"\xff\xd8"] * 2 and batch["crop"] == [(0, 0, 4, 4, 0), (0, 0, 4, 4, 1)]
    assert not any(isinstance(v, torch.Tensor) for v in (batch["jpeg"][0], batch["crop"][0]))


def test_worker_side_pickles_for_loader_processes() -> None:
    import pickle

    from dualenc.data.gpu_decode import byte_preprocessing

    decoder, params, collate = byte_preprocessing(CFG, {"caption_key": "txt"}, {"scale": (0.08, 1.0), "hflip": 0.5},
                                                  None, None)
    decoder2, params2, _ = pickle.loads(pickle.dumps((decoder, params, collate)))
    random.seed(3), torch.manual_seed(3)
    a = params(decoder({"__key__": "k", "jpg": _photo(300, 200, 3), "txt": b"x"})["image"])
    random.seed(3), torch.manual_seed(3)
    b = params2(decoder2({"__key__": "k", "jpg": _photo(300, 200, 3), "txt": b"x"})["image"])
    assert (a.crop, a.flip) == (b.crop, b.flip)


def test_trainer_fits_with_gpu_decode_and_a_loader_worker(demo_data: Path, tiny_image_tower) -> None:
    """Lightning's loop with the byte path: a worker process ships bytes + crops, the batch is decoded
    in on_after_batch_transfer (on the CPU here, nvJPEG on a GPU) and the model trains on it."""
    import lightning as L

    from conftest import TINY_BERT
    from dualenc.data.datamodule import WebDataModule
    from dualenc.model import DualEncoder
    from dualenc.module import DualEncoderModule
    from dualenc.towers import HFTextTower

    text = HFTextTower(config=dict(TINY_BERT), tokenizer=str(demo_data / "tokenizer"), context_length=16)
    module = DualEncoderModule(DualEncoder(tiny_image_tower, text, embed_dim=16))
    seen = []

    class Check(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            seen.append((batch["image"].dtype, tuple(batch["image"].shape), "jpeg" in batch))

    dm = WebDataModule(train=str(demo_data / "train"), batch_size=8, num_workers=1, gpu_decode=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Check()])
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2
    assert seen == [(torch.float32, (8, 3, 32, 32), False)] * 2
