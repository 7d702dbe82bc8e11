"""Skip counts against a planted shard set: per epoch, per split, summed over workers, through a resume.

Planted per training epoch: 10 corrupt images, 10 empty captions (5 of each in each of two
40-sample shards, none in the last slot, so one pass reads every slot) and one empty shard;
per validation run: 4 corrupt images of 20.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dualenc.data.datamodule import WebDataModule
from real_shards import jpeg, write_tar

TRAIN = {"corrupt_image": 10, "empty_caption": 10, "empty_shard": 1}
VAL = {"corrupt_image": 4}
DATA_CONFIG = {"input_size": (3, 8, 8), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3,
               "crop_pct": 1.0, "crop_mode": "center"}


def _planted(root: Path) -> tuple[Path, Path]:
    train, val = root / "train", root / "val"
    train.mkdir()
    val.mkdir()
    for s in range(2):
        members = []
        for i in range(40):
            key = f"t{s}{i:03d}"
            members += [(f"{key}.jpg", b"not a jpeg" if i % 8 == 0 else jpeg(i)),
                        (f"{key}.txt", b"  " if i % 8 == 1 else b"a caption")]
        write_tar(train / f"{s:05d}.tar", members)
    write_tar(train / "00002.tar", [])  # img2dataset's shard whose URLs all failed
    (train / "sizes.json").write_text(json.dumps({"00000.tar": 40, "00001.tar": 40, "00002.tar": 0}))
    members = [m for i in range(20) for m in ((f"v{i:03d}.jpg", b"broken" if i % 5 == 0 else jpeg(i)),
                                              (f"v{i:03d}.txt", b"a caption"))]
    write_tar(val / "00000.tar", members)
    (val / "sizes.json").write_text(json.dumps({"00000.tar": 20}))
    return train, val


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_counts_per_epoch_and_split(tmp_path: Path, demo_data: Path, workers: int) -> None:
    from dualenc.cli import main
    from tests_helpers import tiny_config

    train, val = _planted(tmp_path)
    cfg = tiny_config(tmp_path, demo_data, max_steps=-1, max_epochs=2)
    main(["fit", "--config", str(cfg), "--data.train", str(train), "--data.val", str(val),
          "--data.epoch_samples", "60", "--data.val_samples", "16", "--data.batch_size", "4",
          "--data.shuffle_buffer", "0", "--data.num_workers", str(workers), "--trainer.val_check_interval", "1.0"])
    rows = list(csv.DictReader(next((tmp_path / "run").rglob("metrics.csv")).open()))
    train_rows = [r for r in rows if r.get("data/skipped_corrupt_image")]
    val_rows = [r for r in rows if r.get("data/val_skipped_corrupt_image")]
    assert len(train_rows) == 2 and len(val_rows) == 2  # one row per epoch and split
    for row in train_rows:
        got = {k[len("data/skipped_"):]: float(v) for k, v in row.items() if k.startswith("data/skipped_") and v}
        assert got == TRAIN  # not cumulative over epochs, not overwritten by validation
    for row in val_rows:
        got = {k[len("data/val_skipped_"):]: float(v) for k, v in row.items()
               if k.startswith("data/val_skipped_") and v}
        assert got == VAL


def _dm(train: Path, workers: int) -> WebDataModule:
    # No shuffle: a worker stops once its batches are made, and in shard order every planted skip
    # comes before its last good sample (a shuffled order may put skips after it, unread).
    dm = WebDataModule(train=str(train), batch_size=4, num_workers=workers, epoch_samples=60, shuffle_buffer=0)
    dm.set_preprocessing(DATA_CONFIG, lambda texts: {"input_ids": torch.ones(len(texts), 2, dtype=torch.long)})
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, current_epoch=0, training=True)
    return dm


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_counts_survive_a_resume(tmp_path: Path, workers: int) -> None:
    train, _ = _planted(tmp_path)
    dm = _dm(train, workers)
    loader = dm.train_dataloader()
    total = None
    state = None
    for i, batch in enumerate(loader):
        total = dm.on_before_batch_transfer(batch, 0)["skipped_split"]
        if i == 4:  # the checkpoint: what the loop consumed so far, counts included
            state = loader.state_dict()
    assert total == TRAIN
    dm = _dm(train, workers)
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    batches = [dm.on_before_batch_transfer(b, 0) for b in resumed]
    assert len(batches) == len(loader) - 5
    assert batches[-1]["skipped_split"] == TRAIN  # not only the part after the resume
