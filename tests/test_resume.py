"""Exact resume: after SIGKILL and `fit --ckpt_path`, the epoch goes on with no sample seen twice and
none skipped, proven from the logged sample keys, and the resumed run equals an uninterrupted one: the
same loss at every step and the same final weights (augmentation is seeded by position, dropout's
random state comes back from the checkpoint), with 0 and 2 loader workers; from a mid-epoch checkpoint
and from Lightning's end-of-epoch one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from resume_helpers import config as _config, fit as _fit, losses as _losses, steps as _steps


@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_then_resume_sees_each_sample_once(tmp_path: Path, demo_data: Path, workers: int) -> None:
    all_keys = {f"train_{i:07d}" for i in range(json.loads((demo_data / "train" / "sizes.json").read_text())
                                                 and sum(json.loads((demo_data / "train" / "sizes.json").read_text()).values()))}
    # Uninterrupted reference run.
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref_keys = ref_dir / "keys.tsv"
    proc = _fit(_config(ref_dir, demo_data, workers, ref_keys, None), ref_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = _steps(ref_keys)
    assert len(ref) == 24 and {k for ks in ref.values() for k in ks} == all_keys

    # Killed at step 12 (checkpoints at 5 and 10), then resumed from the last checkpoint.
    run = tmp_path / "run"
    run.mkdir()
    keys = run / "keys.tsv"
    proc = _fit(_config(run, demo_data, workers, keys, kill_at=12), run)
    assert proc.returncode == -9, proc.stderr[-3000:]  # died by SIGKILL
    before = {s: k for s, k in _steps(keys).items() if s <= 10}  # what the checkpoint covers
    assert sorted(before) == list(range(1, 11))
    keys.rename(run / "keys_killed.tsv")
    (run / "losses.tsv").rename(run / "losses_killed.tsv")
    proc = _fit(_config(run, demo_data, workers, keys, None), run, "--ckpt_path", str(run / "ckpt" / "last.ckpt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = _steps(keys)
    assert sorted(after) == list(range(11, 25))
    seen = [k for s in sorted(before) for k in before[s]] + [k for s in sorted(after) for k in after[s]]
    assert len(seen) == len(set(seen)) == len(all_keys)  # none twice, none skipped
    assert set(seen) == all_keys
    # And the resumed epoch is the very one the uninterrupted run saw, batch for batch.
    assert {**before, **after} == ref
    # Lightning's "not resumable" warning is gone: the loader implements its state_dict protocol.
    assert "not resumable" not in proc.stderr
    # The same results: the loss of every resumed step and the final weights equal the uninterrupted run's.
    ref_loss, got = _losses(ref_dir / "losses.tsv"), _losses(run / "losses.tsv")
    assert sorted(ref_loss) == list(range(1, 25)) and {s for s in got if s > 10} == set(range(11, 25))
    for step in range(11, 25):
        assert got[step] == pytest.approx(ref_loss[step], rel=1e-6, abs=1e-7), step
    ref_w = torch.load(ref_dir / "weights.pt", weights_only=True)
    got_w = torch.load(run / "weights.pt", weights_only=True)
    assert ref_w.keys() == got_w.keys()
    worst = max((ref_w[k].float() - got_w[k].float()).abs().max().item() for k in ref_w)
    assert worst <= 1e-6, worst


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_an_end_of_epoch_checkpoint_equals_the_uninterrupted_run(tmp_path: Path, demo_data: Path,
                                                                             workers: int) -> None:
    # Two epochs of 8 steps; Lightning's epoch-end checkpoint (step 8) is the one resumed from, after a kill
    # in the second epoch. Lightning hands a finished epoch's loader state to no loader and iterates the
    # next epoch's loader before it counts the finished one: this used to replay the first epoch's data
    # (its seed) and lose the random state (dropout).
    def config(run: Path, kill_at: int | None) -> Path:
        path = _config(run, demo_data, workers, run / "keys.tsv", kill_at)
        cfg = yaml.safe_load(path.read_text())
        cfg["trainer"]["max_epochs"] = 2
        cfg["trainer"]["callbacks"][0]["init_args"] = {"dirpath": str(run / "ckpt"), "save_last": True,
                                                       "every_n_epochs": 1, "save_top_k": -1}
        cfg["data"]["epoch_samples"] = 128
        cfg["model"]["scheduler"]["total_steps"] = 16
        path.write_text(yaml.safe_dump(cfg))
        return path

    ref_dir, run = tmp_path / "ref", tmp_path / "run"
    ref_dir.mkdir(), run.mkdir()
    proc = _fit(config(ref_dir, None), ref_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _fit(config(run, 10), run)
    assert proc.returncode == -9, proc.stderr[-3000:]
    ckpt = torch.load(run / "ckpt" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 8 and ckpt["epoch"] == 0
    (run / "keys.tsv").rename(run / "keys_killed.tsv")
    (run / "losses.tsv").rename(run / "losses_killed.tsv")
    proc = _fit(config(run, None), run, "--ckpt_path", str(run / "ckpt" / "last.ckpt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref, got = _steps(ref_dir / "keys.tsv"), _steps(run / "keys.tsv")
    assert sorted(ref) == list(range(1, 17)) and ref[9] != ref[1]  # the second epoch has its own order
    assert sorted(got) == list(range(9, 17)) and got == {s: k for s, k in ref.items() if s > 8}
    ref_loss, got_loss = _losses(ref_dir / "losses.tsv"), _losses(run / "losses.tsv")
    for step in range(9, 17):
        assert got_loss[step] == pytest.approx(ref_loss[step], rel=1e-6, abs=1e-7), step
    ref_w = torch.load(ref_dir / "weights.pt", weights_only=True)
    got_w = torch.load(run / "weights.pt", weights_only=True)
    worst = max((ref_w[k].float() - got_w[k].float()).abs().max().item() for k in ref_w)
    assert worst <= 1e-6, worst
