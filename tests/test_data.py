"""WebDataset reading: shard specs, safe decoding with skip counters, no unpickling, equal steps per rank."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dualenc.data.datamodule import WebDataModule, eval_loader
from dualenc.data.decode import SampleDecoder
from dualenc.data.sources import count_samples, expand_urls
from dualenc.data_tools.writer import ShardWriter

DATA_CONFIG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3,
               "crop_pct": 1.0, "crop_mode": "center"}


def _jpeg(color=(200, 30, 30), size=(40, 36)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def _tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[len(t) % 50 + 1] * 4 for t in texts])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _write_shards(folder: Path, n_shards: int, per_shard: int) -> list[str]:
    keys = []
    with ShardWriter(folder, max_count=per_shard) as w:
        for i in range(n_shards * per_shard):
            key = f"s{i:05d}"
            w.write(key, _jpeg((i % 255, 80, 120)), f"caption number {i}")
            keys.append(key)
    return keys


def _add_members(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


class _Payload:
    """Unpickling this writes a file: proof that something executed data."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (Path(self.target).write_text, ("pwned",))


# ---- shard specs -------------------------------------------------------------------------------

def test_expand_urls_patterns(tmp_path: Path) -> None:
    _write_shards(tmp_path, 3, 2)
    names = sorted(p.name for p in tmp_path.glob("*.tar"))
    assert [Path(u).name for u in expand_urls(str(tmp_path))] == names
    assert len(expand_urls(f"{tmp_path}/shard-{{00000..00001}}.tar")) == 2
    assert len(expand_urls(f"{tmp_path}/*.tar")) == 3
    assert len(expand_urls(f"{tmp_path}/shard-00000.tar::{tmp_path}/shard-00002.tar")) == 2
    assert expand_urls("pipe:cat x.tar") == ["pipe:cat x.tar"]
    assert expand_urls("s3://bucket/{0..1}.tar") == ["s3://bucket/0.tar", "s3://bucket/1.tar"]
    assert count_samples(expand_urls(str(tmp_path))) == 6


def test_pattern_matching_nothing_names_it(tmp_path: Path) -> None:
    pattern = f"{tmp_path}/nothing-{{000..009}}.tar"
    with pytest.raises(FileNotFoundError, match="nothing-"):
        expand_urls(pattern)
    with pytest.raises(FileNotFoundError, match="matches no file"):
        WebDataModule(train=pattern)


# ---- decoding --------------------------------------------------------------------------------

def test_decoder_skips_and_counts_each_kind() -> None:
    dec = SampleDecoder(max_pixels=100 * 100)
    good = _jpeg()
    truncated = good[: len(good) // 2]
    big = _jpeg(size=(200, 200))
    samples = [
        {"__key__": "ok", "jpg": good, "txt": b"a red square"},
        {"__key__": "corrupt", "jpg": b"not a jpeg at all", "txt": b"x"},
        {"__key__": "trunc", "jpg": truncated, "txt": b"x"},
        {"__key__": "nocap", "jpg": good},
        {"__key__": "empty", "jpg": good, "txt": b"   "},
        {"__key__": "latin1", "jpg": good, "txt": "caf\u00e9".encode("latin-1")},
        {"__key__": "bomb", "jpg": big, "txt": b"x"},
        {"__key__": "noimg", "txt": b"x"},
    ]
    out = [dec(s) for s in samples]
    assert out[0] is not None and out[0]["text"] == "a red square" and out[0]["image"].size == (40, 36)
    assert all(o is None for o in out[1:])
    assert dict(dec.skipped) == {"corrupt_image": 2, "missing_caption": 1, "empty_caption": 1,
                                 "non_utf8_caption": 1, "too_many_pixels": 1, "missing_image": 1}


def test_decoder_reads_only_used_members() -> None:
    dec = SampleDecoder()
    assert dec.wanted("a/b.jpg") and dec.wanted("k.txt") and dec.wanted("k.WEBP")
    assert not dec.wanted("k.pyd") and not dec.wanted("k.pth") and not dec.wanted("k.pickle")
    assert not dec.wanted("k.json")


def test_pickle_payload_in_shard_never_executes(tmp_path: Path) -> None:
    target = tmp_path / "executed.txt"
    payload = pickle.dumps(_Payload(str(target)))
    shard = tmp_path / "evil-00000.tar"
    members: dict[str, bytes] = {}
    for i in range(8):
        members[f"k{i}.jpg"] = _jpeg()
        members[f"k{i}.txt"] = b"a caption"
        members[f"k{i}.pyd"] = payload
        members[f"k{i}.pth"] = payload
        members[f"k{i}.pickle"] = payload
    _add_members(shard, members)
    pickle.loads(payload)  # sanity: the payload really does write the file when unpickled
    assert target.exists()
    target.unlink()
    dm = WebDataModule(train=str(shard), batch_size=4, num_workers=0, epoch_samples=8)
    dm.set_preprocessing(DATA_CONFIG, _tokenize)
    batches = list(dm.train_dataloader())
    assert len(batches) == 2 and batches[0]["image"].shape == (4, 3, 32, 32)
    assert set(batches[0]) >= {"image", "input_ids", "attention_mask", "key", "text"}
    assert not target.exists()


def test_truncated_tar_is_skipped_and_counted(tmp_path: Path) -> None:
    _write_shards(tmp_path, 2, 8)
    shard = tmp_path / "shard-00001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 100])  # cut in the middle of a member
    loader = eval_loader(str(tmp_path), DATA_CONFIG, batch_size=4, num_workers=0, label_key=None, caption_key="txt")
    keys = [k for b in loader for k in b["key"]]
    assert 8 <= len(keys) < 16  # the whole first shard, part of the second, and no crash
    assert len(set(keys)) == len(keys)


# ---- loaders ---------------------------------------------------------------------------------

def test_train_loader_batches_and_length(tmp_path: Path) -> None:
    _write_shards(tmp_path, 4, 10)
    dm = WebDataModule(train=str(tmp_path), batch_size=4, num_workers=2)
    dm.set_preprocessing(DATA_CONFIG, _tokenize)
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == 40 // 4 // 2 * 2
    assert all(b["image"].shape == (4, 3, 32, 32) and b["input_ids"].shape == (4, 4) for b in batches)
    keys = [k for b in batches for k in b["key"]]
    assert len(set(keys)) == len(keys)  # no sample twice within an epoch


@pytest.mark.parametrize("rank", [0, 1])
def test_every_rank_takes_the_same_number_of_steps(tmp_path: Path, monkeypatch, rank: int) -> None:
    # 3 shards of unequal size over 2 ranks: rank 0 reads 2 shards, rank 1 one, yet both yield the
    # same number of batches, or DDP would hang at the end of the epoch.
    with ShardWriter(tmp_path, max_count=10) as w:
        for i in range(25):
            w.write(f"s{i:04d}", _jpeg(), f"caption {i}")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    dm = WebDataModule(train=str(tmp_path), batch_size=4, num_workers=0)
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, current_epoch=0)
    dm.set_preprocessing(DATA_CONFIG, _tokenize)
    batches = list(dm.train_dataloader())
    assert len(batches) == 25 // (4 * 2)


def test_too_few_samples_is_a_clear_error_and_one_shard_feeds_two_ranks(tmp_path: Path) -> None:
    _write_shards(tmp_path, 1, 3)
    dm = WebDataModule(train=str(tmp_path), batch_size=8, num_workers=0)
    dm.set_preprocessing(DATA_CONFIG, _tokenize)
    with pytest.raises(ValueError, match="fewer than one batch"):
        dm.train_dataloader()
    # Fewer shards than ranks: the ranks share the shard sample by sample (no sample on both).
    keys = []
    for rank in range(2):
        dm = WebDataModule(train=str(tmp_path), batch_size=1, num_workers=0)
        dm.set_preprocessing(DATA_CONFIG, _tokenize)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, current_epoch=0)
        keys.append([k for b in dm.train_dataloader() for k in b["key"]])
    assert len(keys[0]) == len(keys[1]) == 1 and not set(keys[0]) & set(keys[1])


def test_missing_sizes_asks_for_epoch_samples(tmp_path: Path) -> None:
    _write_shards(tmp_path, 1, 4)
    (tmp_path / "sizes.json").unlink()
    dm = WebDataModule(train=str(tmp_path), batch_size=2, num_workers=0)
    dm.set_preprocessing(DATA_CONFIG, _tokenize)
    with pytest.raises(ValueError, match="epoch_samples"):
        dm.train_dataloader()


def test_eval_loader_reads_labels_in_order(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, max_count=5) as w:
        for i in range(7):
            w.write(f"e{i}", _jpeg(), extra={"cls": i % 3})
    batches = list(eval_loader(str(tmp_path), DATA_CONFIG, batch_size=4, num_workers=0))
    assert [b["image"].shape[0] for b in batches] == [4, 3]
    assert torch.cat([b["label"] for b in batches]).tolist() == [i % 3 for i in range(7)]
