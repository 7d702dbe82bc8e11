"""Rerun issue 20's table: `make demo`'s config, 60 steps of 32, checkpoints every 7 steps, SIGKILL, then
`dualenc fit --ckpt_path` from a checkpoint, against an uninterrupted run; per (loader workers,
checkpoint step) it prints whether every batch after the checkpoint equals the uninterrupted run's (the
SampleKeyLogger keys) and the largest difference of the final exported weights.

    python bench/resume_sweep.py --data data/demo            # after `make demo`; workers 0 2 4, steps 14 21 28 35
    python bench/resume_sweep.py --data data/demo --workers 3 --steps 7 14 21
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import yaml

REPO = Path(__file__).resolve().parents[1]


class KillAt(L.Callback):
    """SIGKILLs the process once training reaches ``step`` (a crash at a known point)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def _config(run: Path, data: Path, workers: int, args: argparse.Namespace, kill: int | None) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(run / "ckpt"), "every_n_train_steps": args.every, "save_top_k": -1,
                                "save_last": True}},
                 {"class_path": "dualenc.callbacks.SampleKeyLogger", "init_args": {"path": str(run / "keys.tsv")}},
                 {"class_path": "dualenc.callbacks.ExportOnFitEnd"}]
    if kill is not None:
        callbacks.append({"class_path": "resume_sweep.KillAt", "init_args": {"step": kill}})
    cfg = {"__base__": str(REPO / "configs" / "demo.yaml"),
           "trainer": {"max_steps": args.total, "max_epochs": -1, "limit_val_batches": 0, "num_sanity_val_steps": 0,
                       "enable_progress_bar": False, "default_root_dir": str(run), "callbacks": callbacks},
           "model": {"model": {"text_tower": {"init_args": {"tokenizer": str(data / "tokenizer")}}},
                     "scheduler": {"total_steps": args.total}},
           "data": {"train": str(data / "train"), "val": None, "batch_size": args.batch, "num_workers": workers,
                    "eval_sets": None}}
    path = run / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fit(cfg: Path, *extra: str) -> int:
    env = dict(os.environ, PYTHONPATH=f"{Path(__file__).parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               PYTHONWARNINGS="ignore")
    cmd = [str(Path(sys.executable).parent / "dualenc"), "fit", "--config", str(cfg), *extra]
    proc = subprocess.run(cmd, cwd=cfg.parent, env=env, capture_output=True, text=True)
    if proc.returncode not in (0, -signal.SIGKILL):
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return proc.returncode


def _keys(run: Path) -> dict[int, str]:
    return {int(step): keys for _, step, keys in (line.split("\t", 2) for line in
                                                   (run / "keys.tsv").read_text().splitlines())}


def _max_abs_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(a / "export" / "model.safetensors"), load_file(b / "export" / "model.safetensors")
    return max((x[k].float() - y[k].float()).abs().max().item() for k in x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="the demo data (train/ and tokenizer/), e.g. data/demo")
    p.add_argument("--out", type=Path, default=Path("runs/resume_sweep"))
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    p.add_argument("--steps", type=int, nargs="+", default=[14, 21, 28, 35], help="checkpoint steps resumed from")
    p.add_argument("--total", type=int, default=60)
    p.add_argument("--every", type=int, default=7)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    data = args.data.resolve()
    print("| loader workers | checkpoint step resumed from | batches equal to the uninterrupted run | "
          "final weights, max abs diff |\n|---|---|---|---|", flush=True)
    for workers in args.workers:
        root = args.out.resolve() / f"workers{workers}"
        ref, killed = root / "ref", root / "killed"
        _fit(_config(ref, data, workers, args, None))
        assert _fit(_config(killed, data, workers, args, max(args.steps) + 1)) == -signal.SIGKILL
        want = _keys(ref)
        for step in args.steps:
            run = root / f"resume{step}"
            ckpt = killed / "ckpt" / f"epoch=0-step={step}.ckpt"
            _fit(_config(run, data, workers, args, None), "--ckpt_path", str(ckpt))
            got = _keys(run)
            same = got == {s: k for s, k in want.items() if s > step}
            bad = [s for s in sorted(got) if got[s] != want.get(s)]
            print(f"| {workers} | {step} | {'yes' if same else f'no, from step {bad[0]} on' if bad else 'no'} | "
                  f"{_max_abs_diff(ref, run):.3g} |", flush=True)


if __name__ == "__main__":
    main()
