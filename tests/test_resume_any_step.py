"""Exact resume at every checkpoint step, whatever the loader's worker count: a DataLoader asks its worker
processes round-robin from process 0, so a loader resumed after step s must ask the worker the
uninterrupted one would have asked next (s mod W), not worker 0. Real loader processes; the checkpoint
step swept over every residue mod the worker count."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dualenc.data.datamodule import WebDataModule
from real_shards import jpeg, write_tar

DATA_CONFIG = {"input_size": (3, 8, 8), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3,
               "crop_pct": 1.0, "crop_mode": "center"}


def _shards(root: Path, sizes: list[int]) -> Path:
    for s, n in enumerate(sizes):
        write_tar(root / f"{s:05d}.tar", [m for i in range(n) for m in ((f"s{s}_{i:03d}.jpg", jpeg(i)),
                                                                        (f"s{s}_{i:03d}.txt", b"a caption"))])
    (root / "sizes.json").write_text(json.dumps({f"{s:05d}.tar": n for s, n in enumerate(sizes)}))
    return root


def _dm(train: Path, workers: int, rank: int = 0, world: int = 1) -> WebDataModule:
    dm = WebDataModule(train=str(train), batch_size=2, num_workers=workers, shuffle_buffer=6, seed=3)
    dm.set_preprocessing(DATA_CONFIG, lambda texts: {"input_ids": torch.ones(len(texts), 2, dtype=torch.long)})
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, current_epoch=0, training=True)
    return dm


def _run(dm: WebDataModule, state: dict | None = None, stop: int | None = None) -> tuple[list, dict | None]:
    """The batches the loop takes (keys, images), and the loader state after ``stop`` of them."""
    loader = dm.train_dataloader()
    if state is not None:
        loader.load_state_dict(state)
    out, saved = [], None
    for i, batch in enumerate(loader, 1):
        dm.on_before_batch_transfer(batch, 0)
        out.append((batch["key"], batch["image"]))
        if i == stop:
            saved = loader.state_dict()
    return out, saved


@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_resume_after_every_residue_of_the_worker_count(tmp_path: Path, workers: int) -> None:
    train = _shards(tmp_path, [11, 9, 13, 7])
    ref, _ = _run(_dm(train, workers))
    W = max(1, workers)
    assert len(ref) == 40 // (2 * W) * W
    # Checkpoints at 2W .. 3W: every residue mod W, past the first round of the loader's prefetch.
    for step in range(2 * W, 3 * W + 1):
        head, state = _run(_dm(train, workers), stop=step)
        assert state["ranks"][0]["next_worker"] == step % W
        rest, _ = _run(_dm(train, workers), state)
        assert len(rest) == len(ref) - step, step
        for (keys, image), (ref_keys, ref_image) in zip(rest, ref[step:]):
            assert keys == ref_keys, step
            assert torch.equal(image, ref_image), step


@pytest.mark.parametrize("rank", [0, 1])
def test_resume_rotates_each_rank_on_its_own(tmp_path: Path, rank: int) -> None:
    # Two data-parallel ranks, 3 workers each: rank 1's state is its own, and resumes from step 4 (4 mod 3 = 1).
    train = _shards(tmp_path, [11, 9, 13, 7, 8])
    ref, _ = _run(_dm(train, 3, rank, 2))
    _, state = _run(_dm(train, 3, rank, 2), stop=4)
    state = {**state, "ranks": [state["ranks"][0]] * 2}  # what all_gather_object gives: one entry per rank
    rest, _ = _run(_dm(train, 3, rank, 2), state)
    assert [k for k, _ in rest] == [k for k, _ in ref[4:]]


def test_a_checkpoint_without_next_worker_resumes_from_its_batch_count(tmp_path: Path) -> None:
    # Checkpoints of earlier versions lack next_worker: the round-robin from worker 0 is implied.
    train = _shards(tmp_path, [11, 9, 13, 7])
    ref, _ = _run(_dm(train, 2))
    _, state = _run(_dm(train, 2), stop=5)
    del state["ranks"][0]["next_worker"]
    rest, _ = _run(_dm(train, 2), state)
    assert [k for k, _ in rest] == [k for k, _ in ref[5:]]
