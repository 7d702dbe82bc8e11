"""Real-world shard sets: img2dataset's empty shard, truncated tars, and resuming from counts alone.

Loader workers and data-parallel ranks are simulated in-process (the stream's worker info and the
trainer's rank), so every layout of 1-8 workers x 2 ranks runs in seconds; one case runs real
loader processes.
"""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import dualenc.data.stream as stream_mod
import dualenc.data.tario as tario
from dualenc.data.datamodule import WebDataModule
from dualenc.data.stream import split_shards
from real_shards import img2dataset_shard, jpeg, write_tar

DATA_CONFIG = {"input_size": (3, 8, 8), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3,
               "crop_pct": 1.0, "crop_mode": "center"}


def _tokenize(texts):
    ids = torch.ones(len(texts), 2, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": ids}


def _dm(train: str, rank: int = 0, world: int = 1, epoch: int = 0, **kw) -> WebDataModule:
    kw = {"batch_size": 4, "num_workers": 0, "shuffle_buffer": 0, "caption_key": "txt", "uint8_images": True, **kw}
    dm = WebDataModule(train=train, **kw)
    dm.set_preprocessing(DATA_CONFIG, _tokenize)
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, current_epoch=epoch)
    return dm


def _run_worker(monkeypatch, loader, worker: int, workers: int) -> list[dict]:
    """Batches worker ``worker`` of ``workers`` yields (the stream run in this process)."""
    monkeypatch.setattr(stream_mod, "get_worker_info", lambda: SimpleNamespace(id=worker, num_workers=workers))
    loader.stream.state = stream_mod.StreamState(epoch=0) if loader.resume is None else loader.resume
    return list(iter(loader.stream))


@pytest.fixture
def i2d(tmp_path: Path) -> tuple[Path, list[str]]:
    """img2dataset output with shards of 0 (every URL failed), 1 and 500 samples."""
    keys = img2dataset_shard(tmp_path, 0, 0, failed=20) + img2dataset_shard(tmp_path, 1, 1, failed=3)
    keys += img2dataset_shard(tmp_path, 2, 500)
    return tmp_path, keys


@pytest.mark.parametrize("workers", [1, 2, 4, 8])
def test_empty_img2dataset_shard_every_worker_and_rank_same_steps(i2d, monkeypatch, workers: int) -> None:
    folder, all_keys = i2d
    world = 2
    steps, seen, skipped = [], {}, Counter()
    for rank in range(world):
        loader = _dm(str(folder), rank, world, num_workers=workers).train_dataloader()
        assert loader.num_workers == workers  # not cut down to the number of shards
        per_rank = 0
        for w in range(workers):
            batches = _run_worker(monkeypatch, loader, w, workers)
            assert len(batches) == loader.stream.batches_per_worker  # no worker runs dry, none hangs
            per_rank += len(batches)
            keys = {k for b in batches for k in b["key"]}
            for k in keys:  # each sample belongs to one (rank, worker) slot
                assert seen.setdefault(k, (rank, w)) == (rank, w)
            skipped.update(batches[-1]["skipped"])
        steps.append(per_rank)
    assert steps[0] == steps[1] == 501 // (4 * world * workers) * workers  # equal steps on both ranks
    assert set(seen) <= set(all_keys) and len(seen) >= min(501, steps[0] * world * 4 - 4 * world * workers)
    assert skipped == {"empty_shard": 1}  # counted once per epoch over all ranks and workers


def test_empty_img2dataset_shard_with_real_loader_workers(i2d) -> None:
    folder, all_keys = i2d
    loader = _dm(str(folder), num_workers=4, shuffle_buffer=32).train_dataloader()
    batches = list(loader)  # used to die: "worker 1 of rank 0 read no sample from its shards"
    assert len(batches) == len(loader) == 501 // (4 * 4) * 4
    assert {k for b in batches for k in b["key"]} <= set(all_keys)


def test_split_shards_by_counts() -> None:
    parts, empty = split_shards(["a", "b", "c", "d"], [0, 100, 100, 99], 3)  # whole shards
    assert [[p.url for p in ps] for ps in parts] == [["b"], ["c"], ["d"]] and empty == [["a"], [], []]
    parts, _ = split_shards(["b", "c"], [1, 500], 2)  # a big shard is cut into interleaved pieces
    assert [[(p.url, p.stride, p.phase) for p in ps] for ps in parts] == [[("b", 1, 0), ("c", 2, 0)], [("c", 2, 1)]]
    parts, empty = split_shards(["a", "b", "c"], [0, 1, 500], 8)  # fewer shards than slots
    assert all(ps for ps in parts) and sum(len(ps) for ps in parts) == 9 and empty[0] == ["a"]


# -- item 3: truncated tars ---------------------------------------------------------------------
def _shard(path: Path, n: int) -> bytes:
    write_tar(path, [m for i in range(n) for m in ((f"k{i:03d}.jpg", jpeg(i)), (f"k{i:03d}.txt", b"cap"))])
    return path.read_bytes()


def _headers_end(data: bytes, samples: int) -> int:
    """Byte offset where sample ``samples`` starts (a header boundary)."""
    import tarfile
    import io

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getmembers()[2 * samples].offset


def test_tar_cut_at_a_header_boundary_is_corrupt(tmp_path: Path) -> None:
    data = _shard(tmp_path / "full.tar", 6)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: _headers_end(data, 4)])  # Python's tarfile reads this as a valid 4-sample tar
    for url in (str(cut), f"pipe:cat {cut}"):
        skipped: Counter[str] = Counter()
        keys = [s["__key__"] for s in tario.iter_samples(url, lambda n: True, skipped)]
        assert keys == ["k000", "k001", "k002", "k003"] and skipped == {"corrupt_tar": 1}, url
    # With the expected count (sizes.json / _stats.json) the lost samples are counted too.
    slots = list(tario.iter_slots(str(cut), lambda n: True, expected=6))
    assert len(slots) == 6
    assert Counter(r for _, s in slots for r, n in s.get("__skipped__", {}).items() for _ in range(n)) == \
        {"corrupt_tar": 1, "missing_sample": 2}
    skipped = Counter()
    assert len(list(tario.iter_samples(str(tmp_path / "full.tar"), lambda n: True, skipped))) == 6 and not skipped


def test_truncated_shard_is_counted_by_the_datamodule(tmp_path: Path) -> None:
    data = _shard(tmp_path / "00000.tar", 8)
    (tmp_path / "00000.tar").write_bytes(data[: _headers_end(data, 5)])
    (tmp_path / "00000_stats.json").write_text('{"successes": 8}')
    loader = _dm(str(tmp_path), batch_size=1).train_dataloader()
    batches = list(loader)
    assert len(batches) == 8 and batches[-1]["skipped"] == {"corrupt_tar": 1, "missing_sample": 3}
    assert [b["key"][0] for b in batches[:5]] == [f"k{i:03d}" for i in range(5)]  # then it cycles


def test_member_cut_short_and_bad_header(tmp_path: Path) -> None:
    data = _shard(tmp_path / "full.tar", 4)
    (tmp_path / "mid.tar").write_bytes(data[: _headers_end(data, 2) + 600])  # inside k002.jpg
    at = _headers_end(data, 1)
    (tmp_path / "junk.tar").write_bytes(data[:at] + b"\x07" * 512 + data[at + 512:])  # k001.jpg's header
    for name, keys in (("mid.tar", ["k000", "k001"]), ("junk.tar", ["k000"])):
        for url in (str(tmp_path / name), f"pipe:cat {tmp_path / name}"):
            skipped: Counter[str] = Counter()
            got = [s["__key__"] for s in tario.iter_samples(url, lambda n: True, skipped)]
            assert got == keys and skipped == {"corrupt_tar": 1}, url


# -- item 6: resume from counts ------------------------------------------------------------------
def _set(tmp_path: Path, shards: int, per: int) -> str:
    sizes = {}
    for s in range(shards):
        write_tar(tmp_path / f"{s:05d}.tar", [m for i in range(per) for m in
                                              ((f"s{s}k{i:03d}.jpg", jpeg(i)), (f"s{s}k{i:03d}.txt", b"c"))])
        sizes[f"{s:05d}.tar"] = per
    import json

    (tmp_path / "sizes.json").write_text(json.dumps(sizes))
    return str(tmp_path)


@pytest.mark.parametrize("workers,world,shards", [(1, 1, 5), (2, 1, 5), (3, 2, 2)])
def test_resume_from_counts_equals_uninterrupted(tmp_path: Path, monkeypatch, workers, world, shards) -> None:
    spec = _set(tmp_path, shards, 30)
    kw = dict(batch_size=3, num_workers=workers, shuffle_buffer=16, epoch_samples=300)
    read: list[int] = []
    real_read = tario.TarWalker.read
    monkeypatch.setattr(tario.TarWalker, "read", lambda self, m: read.append(m.size) or real_read(self, m))
    for rank, w in itertools.product(range(world), range(workers)):
        ref = _run_worker(monkeypatch, _dm(spec, rank, world, **kw).train_dataloader(), w, workers)
        full_bytes = sum(read)
        for cut in (1, len(ref) // 2, len(ref) - 1):
            loader = _dm(spec, rank, world, **kw).train_dataloader()
            epoch, worker, pos, made = (int(x) for x in ref[cut - 1]["stream"])
            state = {"ranks": [{"epoch": 0, "positions": {w: pos}, "batches": {w: made},
                                "skipped": {w: ref[cut - 1]["skipped"]},
                                # worker w is run by itself here (no round-robin to go on with): no rotation
                                "next_worker": 0}] * world, "num_workers": workers,
                     "order": stream_mod.ORDER}
            loader.load_state_dict(state)
            read.clear()
            rest = _run_worker(monkeypatch, loader, w, workers)
            assert [b["key"] for b in rest] == [b["key"] for b in ref[cut:]]
            for a, b in zip(rest, ref[cut:]):  # same augmentation: a function of the position
                assert torch.equal(a["image"], b["image"])
            if cut == len(ref) - 1:  # only what the buffer held and what is left is read
                assert sum(read) < full_bytes / 2
        read.clear()


# -- a data set whose every sample is skipped fails, it does not cycle forever -------------------------
def _unusable(tmp_path: Path, image: bytes, caption_ext: str = "txt") -> str:
    for s in range(2):
        write_tar(tmp_path / f"{s:05d}.tar", [m for i in range(5) for m in
                                              ((f"s{s}k{i}.jpg", image), (f"s{s}k{i}.{caption_ext}", b"cap"))])
    (tmp_path / "sizes.json").write_text('{"00000.tar": 5, "00001.tar": 5}')
    return str(tmp_path)


class _Bounded:
    """A decoder that fails the test instead of letting a stream cycle its shards forever."""

    def __init__(self, decode) -> None:
        self.decode, self.calls = decode, 0

    def __call__(self, raw):
        self.calls += 1
        assert self.calls < 1000, "the stream cycles its shards forever"
        return self.decode(raw)


def test_all_corrupt_images_fail_after_one_pass(tmp_path: Path) -> None:
    from dualenc.errors import UserError

    loader = _dm(_unusable(tmp_path, b"not a jpeg"), batch_size=2, shuffle_buffer=4).train_dataloader()
    loader.stream.state = stream_mod.StreamState(epoch=0)
    loader.stream.decode = _Bounded(loader.stream.decode)
    with pytest.raises(UserError) as err:  # used to spin forever, cycling the shards for a first batch
        next(iter(loader.stream))
    text = str(err.value)
    assert f"{tmp_path / '00000.tar'}, {tmp_path / '00001.tar'}" in text and "{'corrupt_image': 10}" in text
    assert "no usable sample in a whole pass over the 2 shard(s) of train source 0" in text
    assert "dualenc-data filter" in text


def test_all_samples_skipped_in_a_loader_worker_is_one_clear_error(tmp_path: Path) -> None:
    from dualenc.errors import UserError, message

    spec = _unusable(tmp_path, jpeg(1), caption_ext="caption")  # captions under another extension
    loader = _dm(spec, batch_size=2, num_workers=1).train_dataloader()
    loader.stream.decode = _Bounded(loader.stream.decode)
    with pytest.raises(UserError) as err:
        next(iter(loader))
    text = message(err.value)  # what the CLI prints: without the worker's traceback
    assert text.startswith("no usable sample in a whole pass") and "Traceback" not in text
    assert "{'missing_caption': 10}" in text and "set --data.caption_key" in text
