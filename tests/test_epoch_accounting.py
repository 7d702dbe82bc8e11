"""Epoch accounting users can trust: on planted corrupt shards one epoch counts each bad sample once,
whatever the number of loader workers (0-4, real processes); samples a worker takes again from a later
pass are counted apart (data/repeated), never as skips; `dualenc-data stats` writes usable.json, whose
counts make the epoch one pass over what training can use; the epoch plan is logged once, with a
warning when keeping workers x ranks equal costs more than a few percent."""

from __future__ import annotations

import json
import logging
import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dualenc.data.datamodule import WebDataModule
from dualenc.data_tools.stats import shard_stats
from real_shards import jpeg, write_tar

DATA_CONFIG = {"input_size": (3, 8, 8), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3,
               "crop_pct": 1.0, "crop_mode": "center"}
# Per epoch: 4 shards of 23-31 samples (110) with bad ones spread through them (39), and one empty shard.
PLANTED = {"corrupt_image": 20, "empty_caption": 9, "missing_caption": 10, "empty_shard": 1}


def _planted(root: Path) -> Path:
    bad: Counter[str] = Counter()
    for s, n in enumerate([31, 23, 29, 27]):
        members = []
        for i in range(n):
            key, j = f"s{s}_{i:03d}", (7 * i + s) % 11
            members.append((f"{key}.jpg", b"not a jpeg" if j in (0, 5) else jpeg(i)))
            if j != 3:  # 3: no caption member
                members.append((f"{key}.txt", b"   " if j == 8 else b"a caption"))
            bad.update({0: ["corrupt_image"], 5: ["corrupt_image"], 8: ["empty_caption"], 3: ["missing_caption"]}
                       .get(j, []))
        write_tar(root / f"{s:05d}.tar", members)
    write_tar(root / "00004.tar", [])
    bad["empty_shard"] = 1
    assert bad == PLANTED
    return root


def _dm(train: Path, workers: int, **kw) -> WebDataModule:
    kw = {"batch_size": 4, "shuffle_buffer": 16, "seed": 1, **kw}
    dm = WebDataModule(train=str(train), num_workers=workers, **kw)
    dm.set_preprocessing(DATA_CONFIG, lambda texts: {"input_ids": torch.ones(len(texts), 2, dtype=torch.long)})
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, current_epoch=0, training=True)
    return dm


def _epoch(dm: WebDataModule) -> tuple[dict[str, int], int, list[str]]:
    """One epoch as the training loop takes it: skip counts, repeated samples, keys."""
    keys, batch = [], {}
    for batch in dm.train_dataloader():
        batch = dm.on_before_batch_transfer(batch, 0)
        keys += batch["key"]
    return batch["skipped_split"], batch["repeated_split"], keys


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    (tmp_path / "train").mkdir()
    train = _planted(tmp_path / "train")
    shard_stats(str(train), tmp_path / "stats", plots=False)  # writes sizes.json and usable.json
    return train


def test_stats_writes_the_usable_counts(planted: Path) -> None:
    sizes = json.loads((planted / "sizes.json").read_text())
    usable = json.loads((planted / "usable.json").read_text())
    assert sizes == {"00000.tar": 31, "00001.tar": 23, "00002.tar": 29, "00003.tar": 27, "00004.tar": 0}
    assert sum(usable.values()) == 71 and usable["00004.tar"] == 0


@pytest.mark.parametrize("workers", [0, 1, 2, 3, 4])
def test_each_bad_sample_counted_once_whatever_the_worker_count(planted: Path, workers: int) -> None:
    # The epoch counts usable.json's samples: one pass; a worker whose batches are made reads the rest
    # of its pass only to count its skips.
    skipped, repeated, keys = _epoch(_dm(planted, workers))
    assert skipped == PLANTED
    assert repeated == len(keys) - len(set(keys))
    # Without usable.json the epoch counts every slot, more than can be used: workers cycle, and what
    # they take again is counted apart, not as skips.
    (planted / "usable.json").unlink()
    skipped, repeated, keys = _epoch(_dm(planted, workers))
    assert skipped == PLANTED
    assert repeated == len(keys) - len(set(keys)) > 0


def test_the_epoch_plan_is_logged_once_and_warns_when_it_costs(planted: Path, caplog) -> None:
    caplog.set_level(logging.INFO)
    with pytest.warns(UserWarning, match=r"loses .*% to keeping 8 worker\(s\) x 1 rank\(s\) equal"):
        _dm(planted, 8).train_dataloader()  # 71 usable samples, batches of 4 x 8 workers: 64 used
    plans = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch plan")]
    assert len(plans) == 1
    assert "64 of 71 samples (usable.json) in 16 steps" in plans[0] and "left out to keep ranks and workers " \
        "equal: 7" in plans[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 70 of 71 used: no warning
        _dm(planted, 2, batch_size=1).train_dataloader()
