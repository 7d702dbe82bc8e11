"""SIGKILL mid-epoch, then `fit --ckpt_path` from a checkpoint at every residue of the step mod the
loader's worker count (3; the helpers run 2 ranks too, with DDP over gloo on CPU): every rank's per-step
sample keys, the losses and the final weights equal the uninterrupted run's. (Before the loader recorded its next worker, a
resume was exact only at multiples of the worker count.) The uninterrupted and the killed run are made
once per layout; each checkpoint step is its own test. Marked slow (about 2 minutes on 2 busy cores):
`make test` runs them; `pytest -m "not slow"` leaves them out."""

from __future__ import annotations

from pathlib import Path

import pytest

from resume_helpers import config, fit, losses, max_abs_diff, steps

SAMPLES, BATCH = 192, 16
# (workers, ranks, checkpoint step): every residue mod 3 workers. 2 ranks x 2 workers resumed at an odd
# step, after a SIGKILL of one of them, is test_multinode.py's (DDP over 2 nodes); even steps and 0-3
# workers at every residue are in test_resume.py and test_resume_any_step.py.
CASES = [(3, 1, 2), (3, 1, 3), (3, 1, 4)]


def _extra(world: int) -> list[str]:
    extra = ["--trainer.devices", str(world)]
    return extra + ["--trainer.strategy", "ddp", "--trainer.sync_batchnorm", "false"] if world > 1 else extra


def _cfg(run: Path, data: Path, workers: int, world: int, kill_at: int | None) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    return config(run, data, workers, run / "keys.tsv", kill_at, every=1 if kill_at else 1000,
                  total_steps=SAMPLES // (BATCH * world), epoch_samples=SAMPLES)


def _record(run: Path, world: int) -> tuple[list[dict[int, list[str]]], dict[int, float]]:
    keys = [steps(run / f"keys.rank{r}.tsv") for r in range(world)]
    return keys, losses(run / ("losses.tsv" if world == 1 else "losses.rank0.tsv"))


_RUNS: dict[tuple[int, int], tuple[Path, Path]] = {}


def _reference_and_killed(tmp: Path, data: Path, workers: int, world: int) -> tuple[Path, Path]:
    """The uninterrupted run and one SIGKILLed after the last checkpoint of CASES (every step saved)."""
    if (workers, world) not in _RUNS:
        ref, killed = tmp / f"ref-{workers}-{world}", tmp / f"killed-{workers}-{world}"
        proc = fit(_cfg(ref, data, workers, world, None), ref, *_extra(world))
        assert proc.returncode == 0, proc.stderr[-3000:]
        kill = max(s for w, r, s in CASES if (w, r) == (workers, world)) + 1
        proc = fit(_cfg(killed, data, workers, world, kill), killed, *_extra(world))
        assert proc.returncode == -9, proc.stderr[-3000:]  # died by SIGKILL mid-epoch
        _RUNS[workers, world] = ref, killed
    return _RUNS[workers, world]


def test_cases_sweep_every_residue() -> None:
    assert {s % 3 for w, r, s in CASES if (w, r) == (3, 1)} == {0, 1, 2}


@pytest.mark.slow
@pytest.mark.parametrize("workers,world,step", CASES, ids=[f"{w}workers-{r}ranks-step{s}" for w, r, s in CASES])
def test_sigkill_then_resume_at_step(tmp_path_factory: pytest.TempPathFactory, demo_data: Path, workers: int,
                                     world: int, step: int) -> None:
    ref, killed = _reference_and_killed(tmp_path_factory.getbasetemp() / "resume_sweep", demo_data, workers, world)
    total = SAMPLES // (BATCH * world)
    ref_keys, ref_loss = _record(ref, world)
    assert all(sorted(k) == list(range(1, total + 1)) for k in ref_keys)
    if world == 2:  # each rank its own samples
        assert not {k for s in ref_keys[0].values() for k in s} & {k for s in ref_keys[1].values() for k in s}
    run = tmp_path_factory.mktemp(f"resume{step}")
    proc = fit(_cfg(run, demo_data, workers, world, None), run, *_extra(world),
               "--ckpt_path", str(killed / "ckpt" / f"epoch=0-step={step}.ckpt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got_keys, got_loss = _record(run, world)
    for r, (got, want) in enumerate(zip(got_keys, ref_keys)):
        assert got == {s: k for s, k in want.items() if s > step}, r
    assert sorted(got_loss) == list(range(step + 1, total + 1))
    for s in range(step + 1, total + 1):
        assert got_loss[s] == pytest.approx(ref_loss[s], rel=1e-6, abs=1e-7), s
    assert max_abs_diff(ref / "weights.pt", run / "weights.pt") <= 1e-6
