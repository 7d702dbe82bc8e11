"""A resume reads back the samples its shuffle buffer holds by seeking to them: a shard read whole once
has its slot offsets cached (never beside the shards), so the headers of what the stream consumed
before the resume point are not walked again, and the resumed stream still equals the uninterrupted
one. A shard changed since it was indexed is walked, with a warning."""

from __future__ import annotations

import bisect
import json
import os
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import dualenc.data.stream as stream_mod
from dualenc.data import tario
from dualenc.data.datamodule import WebDataModule
from real_shards import jpeg, write_tar

DATA_CONFIG = {"input_size": (3, 8, 8), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3,
               "crop_pct": 1.0, "crop_mode": "center"}
SHARDS, PER_SHARD, BUFFER = 4, 40, 8


def _shards(root: Path, pax: bool) -> Path:
    # pax: webdataset's layout (a pax header before every member: the careful walk), else plain ustar.
    root.mkdir()
    for s in range(SHARDS):
        members = [m for i in range(PER_SHARD) for m in ((f"s{s}_{i:03d}.jpg", jpeg(i)), (f"s{s}_{i:03d}.txt", b"x"))]
        write_tar(root / f"{s:05d}.tar", members, mtime=1_700_000_000.5 if pax else 1_700_000_000)
    (root / "sizes.json").write_text(json.dumps({f"{s:05d}.tar": PER_SHARD for s in range(SHARDS)}))
    return root


def _stream(data: Path) -> stream_mod.ShardStream:
    dm = WebDataModule(train=str(data), batch_size=1, num_workers=0, epoch_samples=SHARDS * PER_SHARD,
                       shuffle_buffer=BUFFER, caption_key="txt", uint8_images=True)
    dm.set_preprocessing(DATA_CONFIG, lambda t: {"input_ids": torch.ones(len(t), 2, dtype=torch.long)})
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, current_epoch=0)
    stream = dm.train_dataloader().stream
    stream.state = stream_mod.StreamState(epoch=0)
    return stream


def _spy(monkeypatch) -> dict[str, list[int]]:
    """Header offsets of every member any walk yields, per shard file."""
    walked: dict[str, list[int]] = defaultdict(list)
    members = tario.TarWalker.members

    def spy(self, *args, **kwargs):
        for m in members(self, *args, **kwargs):
            walked[os.path.basename(self.f.name)].append(m.header)
            yield m
    monkeypatch.setattr(tario.TarWalker, "members", spy)
    return walked


def _resumed(data: Path, pos: int, made: int) -> stream_mod.ShardStream:
    stream = _stream(data)
    stream.state = stream_mod.StreamState(epoch=0, positions={0: pos}, batches={0: made})
    return stream


@pytest.mark.parametrize("pax", [False, True])
def test_resume_walks_no_header_of_what_it_consumed(tmp_path: Path, monkeypatch, pax: bool) -> None:
    data = _shards(tmp_path / "data", pax)
    full = list(_stream(data))  # the uninterrupted epoch: it reads every shard whole, indexing them
    assert len(full) == SHARDS * PER_SHARD
    parts, _ = _stream(data).plan(0, 0, 1, 0)
    names = [os.path.basename(p.url) for p in parts]
    index = {n: tario.slot_index(str(data / n), PER_SHARD) for n in names}
    assert all(i is not None and len(i) == PER_SHARD + 1 for i in index.values())
    for pos in (50, 75, 100, 125):  # the buffer holds samples of the shard before the current one
        walked = _spy(monkeypatch)
        stream = _resumed(data, pos, pos)
        first = next(iter(stream))
        assert torch.equal(first["stream"], full[pos]["stream"]) and first["key"] == full[pos]["key"]
        # Tokens handed to the shuffle so far: the resume point's, plus the buffer it holds.
        current, nxt = divmod(pos + BUFFER, PER_SHARD)
        consumed = {n: [h for h in walked[n] if k < current or (k == current and h < index[n][nxt])]
                    for k, n in enumerate(names)}
        # Each buffered sample costs its own two headers and the next sample's first, nothing else.
        assert sum(map(len, consumed.values())) <= 3 * BUFFER, (pos, {n: len(h) for n, h in consumed.items()})
        slots = {n: {bisect.bisect_right(index[n], h) - 1 for h in consumed[n]} for n in names}
        assert sum(map(len, slots.values())) <= 2 * BUFFER
        monkeypatch.undo()
    # And from every position the resumed stream is the uninterrupted one.
    for cut in range(1, len(full), 9):
        rest = list(_resumed(data, *(int(x) for x in full[cut - 1]["stream"][2:])))
        assert [b["key"] for b in rest] == [b["key"] for b in full[cut:]], cut
        assert all(torch.equal(x["image"], y["image"]) for x, y in zip(rest, full[cut:]))


def test_a_shard_changed_since_it_was_indexed_is_walked_with_a_warning(tmp_path: Path) -> None:
    data = _shards(tmp_path / "data", pax=False)
    full = list(_stream(data))
    shard = data / "00001.tar"
    assert tario.slot_index(str(shard), PER_SHARD) is not None
    os.utime(shard, ns=(os.stat(shard).st_atime_ns, os.stat(shard).st_mtime_ns + 10**9))  # touched
    with pytest.warns(UserWarning, match="00001.tar changed since its slot index was written"):
        assert tario.slot_index(str(shard), PER_SHARD) is None
    assert tario.slot_index(str(shard), PER_SHARD) is None  # the stale index is gone: no second warning
    for cut in (60, 100, 140):
        rest = list(_resumed(data, *(int(x) for x in full[cut - 1]["stream"][2:])))
        assert [b["key"] for b in rest] == [b["key"] for b in full[cut:]], cut
    # Nothing is written beside the user's shards; the index folder is the cache's.
    assert sorted(p.name for p in data.iterdir()) == sorted([f"{s:05d}.tar" for s in range(SHARDS)] + ["sizes.json"])
    assert list(Path(os.environ[tario.INDEX_ENV]).glob("*.npy"))


def test_only_a_whole_clean_walk_is_indexed(tmp_path: Path) -> None:
    members = [m for i in range(6) for m in ((f"k{i}.jpg", jpeg(i)), (f"k{i}.txt", b"x"))]
    good, dup, cut = tmp_path / "good.tar", tmp_path / "dup.tar", tmp_path / "cut.tar"
    write_tar(good, members)
    write_tar(dup, members + [("k2.jpg", jpeg(9))])  # a key seen twice: a dropped slot
    list(tario.iter_slots(str(good), lambda name: True, record=True))
    index = tario.slot_index(str(good), 6)
    cut.write_bytes(good.read_bytes()[: index[-1]])  # whole members, but no end-of-archive marker
    for path in (dup, cut):
        list(tario.iter_slots(str(path), lambda name: True, record=True))
    assert index is not None and tario.slot_index(str(dup)) is None and tario.slot_index(str(cut)) is None
    assert tario.slot_index(str(good), 7) is None  # another count than indexed: walk it
    # Reading slots by the index gives what the walk gives, and so does starting mid-shard.
    walk = dict(tario.iter_slots(str(good), lambda name: True))
    assert dict(tario.read_slots(str(good), lambda name: True, [0, 3, 5], index)) == {i: walk[i] for i in (0, 3, 5)}
    assert dict(tario.iter_slots(str(good), lambda name: True, 6, first=4, index=index)) == {4: walk[4], 5: walk[5]}
    assert np.array_equal(index[:-1], [m.header for m in tario.TarWalker(open(good, "rb"), True).members()][::2])
