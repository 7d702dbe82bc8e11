"""The shard stream: img2dataset layout, JSON captions, duplicates, mixing, resampling, transforms, logging."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from dualenc.data.datamodule import SourceSpec, WebDataModule
from dualenc.data.tario import iter_samples
from dualenc.data.transforms import image_transform

DATA_CONFIG = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3,
               "crop_pct": 0.875, "crop_mode": "center"}


def _jpeg(size=(48, 40), color=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _tokenize(texts):
    ids = torch.ones(len(texts), 3, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": ids}


def _dm(**kw) -> WebDataModule:
    dm = WebDataModule(**kw)
    dm.set_preprocessing(DATA_CONFIG, _tokenize)
    return dm


def test_img2dataset_layout_with_json_captions(tmp_path: Path) -> None:
    # img2dataset writes NNNNN.tar with key.jpg/.txt/.json and NNNNN_stats.json (no sizes.json).
    for shard in range(2):
        members = []
        for i in range(6):
            key = f"{shard:05d}{i:04d}"
            members += [(f"{key}.jpg", _jpeg()),
                        (f"{key}.json", json.dumps({"caption": f"photo {key}", "url": "http://x", "key": key}).encode()),
                        (f"{key}.txt", b"ignored when the caption comes from json")]
        _tar(tmp_path / f"{shard:05d}.tar", members)
        (tmp_path / f"{shard:05d}_stats.json").write_text(json.dumps({"successes": 6, "count": 7}))
    (tmp_path / "00000_stats.json").with_suffix(".parquet").write_bytes(b"not read")
    dm = _dm(train=f"{tmp_path}/{{00000..00001}}.tar", batch_size=4, num_workers=0, caption_key="json",
             caption_field="caption")
    batches = list(dm.train_dataloader())
    assert len(batches) == 12 // 4
    texts = [t for b in batches for t in b["text"]]
    assert sorted(texts) == sorted(f"photo {s:05d}{i:04d}" for s in range(2) for i in range(6))


def test_duplicate_keys_are_dropped_and_counted(tmp_path: Path) -> None:
    shard = tmp_path / "dup.tar"
    _tar(shard, [("a.jpg", _jpeg()), ("a.txt", b"first"), ("b.jpg", _jpeg()), ("b.txt", b"second"),
                 ("a.jpg", _jpeg()), ("a.txt", b"again")])
    skipped: Counter[str] = Counter()
    keys = [s["__key__"] for s in iter_samples(str(shard), lambda n: True, skipped)]
    assert keys == ["a", "b"] and skipped["duplicate_key"] == 1


def test_weighted_mixture_of_sources(tmp_path: Path) -> None:
    for name in ("big", "small"):
        (tmp_path / name).mkdir()
        members = []
        for i in range(40):
            members += [(f"{name}{i:03d}.jpg", _jpeg()), (f"{name}{i:03d}.txt", name.encode())]
        _tar(tmp_path / name / "0.tar", members)
    dm = _dm(train=[SourceSpec(str(tmp_path / "big" / "0.tar"), 3.0), {"shards": str(tmp_path / "small" / "0.tar"),
                                                                        "weight": 1.0}],
             batch_size=8, num_workers=0, epoch_samples=80, shuffle_buffer=8)
    counts = Counter(t for b in dm.train_dataloader() for t in b["text"])
    assert counts["big"] + counts["small"] == 80
    assert 45 <= counts["big"] <= 72  # about 3:1


def test_resampled_mode_draws_shards_with_replacement(tmp_path: Path) -> None:
    for s in range(3):
        _tar(tmp_path / f"{s}.tar", [(f"s{s}k{i}.jpg", _jpeg()) for i in range(4)] +
             [(f"s{s}k{i}.txt", b"x") for i in range(4)])
    # Members of a sample must be adjacent: rebuild in key order.
    for s in range(3):
        _tar(tmp_path / f"{s}.tar", [m for i in range(4) for m in ((f"s{s}k{i}.jpg", _jpeg()), (f"s{s}k{i}.txt", b"x"))])
    dm = _dm(train=str(tmp_path), batch_size=4, num_workers=0, epoch_samples=24, resampled=True)
    # Resampled mode needs no shard per rank: 3 shards feed 4 ranks.
    dm.trainer = SimpleNamespace(global_rank=3, world_size=4, current_epoch=0)
    batches = list(dm.train_dataloader())
    assert len(batches) == 24 // (4 * 4)
    dm.trainer = SimpleNamespace(global_rank=3, world_size=4, current_epoch=1)
    again = [k for b in dm.train_dataloader() for k in b["key"]]
    assert again and all(k.startswith("s") for k in again)


def test_shuffle_depends_on_seed_and_epoch_only(tmp_path: Path) -> None:
    members = [m for i in range(32) for m in ((f"k{i:03d}.jpg", _jpeg()), (f"k{i:03d}.txt", b"x"))]
    _tar(tmp_path / "0.tar", members)

    def order(seed: int, epoch: int) -> list[str]:
        dm = _dm(train=str(tmp_path / "0.tar"), batch_size=4, num_workers=0, epoch_samples=32, seed=seed,
                 shuffle_buffer=16)
        dm.trainer = SimpleNamespace(global_rank=0, world_size=1, current_epoch=epoch)
        return [k for b in dm.train_dataloader() for k in b["key"]]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)
    assert sorted(order(0, 1)) == sorted(order(1, 0))


def test_transforms_follow_the_towers_data_config() -> None:
    from timm.data.transforms import RandomResizedCropAndInterpolation

    train = image_transform(DATA_CONFIG, train=True, scale=(0.5, 1.0), hflip=0.0)
    assert not any(isinstance(t, T.RandomHorizontalFlip) for t in train.transforms)
    rrc = next(t for t in train.transforms if isinstance(t, RandomResizedCropAndInterpolation))
    assert rrc.size == (32, 32) and tuple(rrc.scale) == (0.5, 1.0)
    flip = image_transform(DATA_CONFIG, train=True, hflip=0.5)
    assert any(isinstance(t, T.RandomHorizontalFlip) for t in flip.transforms)
    evaluation = image_transform(DATA_CONFIG, train=False)
    kinds = [type(t) for t in evaluation.transforms]
    assert T.Resize in kinds and T.CenterCrop in kinds
    resize = next(t for t in evaluation.transforms if isinstance(t, T.Resize))
    assert resize.size in (36, (36, 36))  # 32 / crop_pct 0.875, then the center crop
    out = evaluation(Image.new("RGB", (80, 50), (255, 0, 0)))
    assert out.shape == (3, 32, 32)
    torch.testing.assert_close(out[0].mean(), torch.tensor(1.0))  # normalized with the config's mean/std


def test_skip_counts_are_logged(tmp_path: Path, demo_data: Path) -> None:
    from dualenc.cli import main
    from tests_helpers import tiny_config

    # A shard with broken samples next to the demo data: training goes on and logs why it skipped.
    bad = tmp_path / "bad"
    bad.mkdir()
    members = []
    for i in range(40):
        members += [(f"bad{i:03d}.jpg", b"garbage" if i % 4 == 0 else _jpeg()),
                    (f"bad{i:03d}.txt", b"" if i % 4 == 1 else b"a caption")]
    _tar(bad / "0.tar", members)
    cfg = tiny_config(tmp_path, demo_data, max_steps=3)
    main(["fit", "--config", str(cfg), "--data.train", str(bad / "0.tar"), "--data.epoch_samples", "64",
          "--data.batch_size", "8", "--data.num_workers", "0", "--trainer.max_epochs", "1",
          "--trainer.max_steps", "-1", "--trainer.limit_val_batches", "0"])
    metrics = next((tmp_path / "run").rglob("metrics.csv")).read_text().splitlines()
    header = metrics[0].split(",")
    assert "data/skipped_corrupt_image" in header and "data/skipped_empty_caption" in header
