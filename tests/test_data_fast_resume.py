"""A resume computes the shuffle's state from counts (numpy, no stepping): it must equal the
uninterrupted stream from every position (filling, mid-pass, final flush, later cycles, mixed sources)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import dualenc.data.stream as stream_mod
from dualenc.data.datamodule import SourceSpec, WebDataModule
from dualenc.data.tario import INDEX_ENV
from real_shards import jpeg, write_tar

DATA_CONFIG = {"input_size": (3, 8, 8), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3,
               "crop_pct": 1.0, "crop_mode": "center"}


def _source(root: Path, name: str, sizes: list[int]) -> str:
    folder = root / name
    folder.mkdir()
    for s, n in enumerate(sizes):
        members = [m for i in range(n) for m in ((f"{name}{s}_{i:03d}.jpg", jpeg(i)), (f"{name}{s}_{i:03d}.txt", b"x"))]
        write_tar(folder / f"{s:05d}.tar", members)
    (folder / "sizes.json").write_text(json.dumps({f"{s:05d}.tar": n for s, n in enumerate(sizes)}))
    return str(folder)


def _stream(train, buffer: int):
    dm = WebDataModule(train=train, batch_size=1, num_workers=0, epoch_samples=70, shuffle_buffer=buffer,
                       caption_key="txt", uint8_images=True)
    dm.set_preprocessing(DATA_CONFIG, lambda t: {"input_ids": torch.ones(len(t), 2, dtype=torch.long)})
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, current_epoch=1)
    return dm.train_dataloader().stream


@pytest.mark.parametrize("mixed,buffer,indexed", [(True, 5, True), (False, 5, True), (False, 64, True),
                                                   (False, 0, True), (True, 5, False), (False, 64, False)])
def test_resume_from_counts_equals_the_uninterrupted_stream(tmp_path: Path, monkeypatch, mixed: bool, buffer: int,
                                                            indexed: bool) -> None:
    # indexed: the shards' slot offsets are cached once read whole (read back by seeks), else walked.
    if not indexed:
        monkeypatch.setenv(INDEX_ENV, "off")
    # 18 + 9 slots (an empty shard among them) for 70 samples: several passes; buffer 64 only flushes.
    a = _source(tmp_path, "a", [7, 0, 11])
    train = [SourceSpec(a, 2.0), SourceSpec(_source(tmp_path, "b", [9]), 1.0)] if mixed else a
    ref = _stream(train, buffer)
    ref.state = stream_mod.StreamState(epoch=1)
    full = list(ref)
    assert len(full) == 70 and len({b["key"][0] for b in full}) == (27 if mixed else 18)
    for cut in range(1, len(full)):
        _, _, pos, made = (int(x) for x in full[cut - 1]["stream"])
        stream = _stream(train, buffer)
        stream.state = stream_mod.StreamState(epoch=1, positions={0: pos}, batches={0: made})
        assert stream._resume(0, 1, pos) is not None  # from counts, not step by step
        rest = list(stream)
        assert [b["key"] for b in rest] == [b["key"] for b in full[cut:]], cut
        for x, y in zip(rest, full[cut:]):
            assert torch.equal(x["image"], y["image"]) and torch.equal(x["stream"], y["stream"])


def test_a_loader_state_of_another_data_order_restarts_the_epoch(tmp_path: Path) -> None:
    dm = WebDataModule(train=_source(tmp_path, "a", [7]), batch_size=1, num_workers=0, epoch_samples=7)
    dm.set_preprocessing(DATA_CONFIG, lambda t: {"input_ids": torch.ones(len(t), 2, dtype=torch.long)})
    loader = dm.train_dataloader()
    old = {"ranks": [{"epoch": 0, "positions": {0: 3}, "batches": {0: 3}}], "num_workers": 0}  # no "order": 1
    with pytest.warns(UserWarning, match="data order 1.*restarts from its beginning"):
        loader.load_state_dict(old)
    assert loader.resume is None
    loader.load_state_dict({**old, "order": stream_mod.ORDER})
    assert loader.resume is not None and loader.resume.positions == {0: 3}


def test_buffer_state_drawn_backwards_in_chunks_equals_all_steps() -> None:
    for size, steps in [(5, 0), (5, 3), (5, 40), (64, 1000), (7, 10_000)]:
        for key in (1, 2**63 + 5):
            full = stream_mod._Shuffle.held(size, key, steps, chunk=max(steps, 1))
            assert np.array_equal(stream_mod._Shuffle.held(size, key, steps, chunk=3), full)
            # and by stepping the shuffle itself
            buf = list(range(size))
            for k, u in zip(range(steps), stream_mod._draws(key)):
                buf[int(u * size)] = size + k
            assert full.tolist() == buf
