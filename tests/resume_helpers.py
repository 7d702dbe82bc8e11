"""Helpers of the resume tests: running `dualenc fit` in a subprocess, its config, and callbacks that
record each step's keys and loss (per rank) and the final weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
import yaml

from tests_helpers import tiny_config

TESTS = Path(__file__).resolve().parent


def fit(cfg: Path, cwd: Path, *extra: str, env: dict[str, str] | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    """``dualenc fit --config cfg *extra`` in ``cwd``, with tests/ importable (the callbacks below)."""
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1", PYTHONWARNINGS="default", **(env or {}))
    cmd = [str(Path(sys.executable).parent / "dualenc"), "fit", "--config", str(cfg), *extra]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def config(tmp: Path, data: Path, workers: int, keys: Path, kill_at: int | None, every: int = 5,
           total_steps: int = 24, kill_rank: int | None = None, callbacks: tuple = (), **data_args) -> Path:
    """The tiny config of one epoch with keys, losses (keys' sibling losses.tsv) and final weights (weights.pt)
    recorded, checkpoints every ``every`` steps (all kept), and a SIGKILL at ``kill_at``."""
    base = tiny_config(tmp, data, max_epochs=1)
    cfg = yaml.safe_load(base.read_text())
    cfg["trainer"].pop("max_steps", None)
    cfg["trainer"]["limit_val_batches"] = 0
    cfg["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = every
    cfg["trainer"]["callbacks"].append({"class_path": "dualenc.callbacks.SampleKeyLogger",
                                        "init_args": {"path": str(keys)}})
    for name, path in (("LossLogger", "losses.tsv"), ("SaveWeightsOnEnd", "weights.pt"), ("RankKeyLogger", "keys")):
        cfg["trainer"]["callbacks"].append({"class_path": f"resume_helpers.{name}",
                                            "init_args": {"path": str(keys.with_name(path))}})
    if kill_at is not None:
        cfg["trainer"]["callbacks"].append({"class_path": "tests_helpers.KillAtStep",
                                            "init_args": {"step": kill_at, "rank": kill_rank}})
    cfg["trainer"]["callbacks"] += list(callbacks)
    cfg["data"].update(num_workers=workers, batch_size=16, shuffle_buffer=64, **data_args)
    cfg["model"]["scheduler"]["total_steps"] = total_steps
    path = tmp / f"resume_{kill_at}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def steps(path: Path) -> dict[int, list[str]]:
    """``SampleKeyLogger``'s file: step -> keys."""
    out: dict[int, list[str]] = {}
    for line in path.read_text().splitlines():
        _, step, keys = line.split("\t")
        out[int(step)] = keys.split()
    return out


def losses(path: Path) -> dict[int, float]:
    return {int(s): float(v) for s, v in (line.split("\t") for line in path.read_text().splitlines())}


def max_abs_diff(a: Path, b: Path) -> float:
    """Largest difference between two saved state dicts (same keys)."""
    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert x.keys() == y.keys()
    return max((x[k].float() - y[k].float()).abs().max().item() for k in x)


def _ranked(path: Path, trainer: L.Trainer) -> Path:
    # One file per rank when there are several (ranks would interleave their lines in one).
    return path if trainer.world_size == 1 else path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")


class LossLogger(L.Callback):
    """Appends ``step<TAB>loss`` (full float precision) per training step to ``path`` (``.rankR`` under DDP)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        with _ranked(self.path, trainer).open("a") as f:
            f.write(f"{trainer.global_step}\t{float(loss)!r}\n")


class RankKeyLogger(L.Callback):
    """Appends ``step<TAB>keys`` per training step to ``<path>.rankR.tsv``: every rank's batch."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with self.path.with_name(f"{self.path.name}.rank{trainer.global_rank}.tsv").open("a") as f:
            f.write(f"{trainer.current_epoch}\t{trainer.global_step}\t{' '.join(batch['key'])}\n")


class SaveWeightsOnEnd(L.Callback):
    """Saves the module's state dict to ``path`` when training ends (rank 0: DDP's ranks hold the same)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            torch.save({k: v.detach().cpu() for k, v in pl_module.state_dict().items()}, self.path)


class GlobalBatchCheck(L.Callback):
    """At the first step: every rank's loss against the batch gathered from all ranks, and the loss one
    process computes on the concatenated batch (same weights, eval mode), written by rank 0 as JSON."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != 0:
            return
        model, dist = pl_module.model, torch.distributed
        was = model.training
        model.eval()
        with torch.no_grad():
            out = model(batch["image"], batch["input_ids"], batch["attention_mask"])
            local = pl_module.contrastive_loss(out.image_features, out.text_features, out.logit_scale, out.logit_bias)
            world = dist.get_world_size()
            losses = [torch.zeros_like(local) for _ in range(world)]
            dist.all_gather(losses, local)
            parts = {k: [torch.zeros_like(batch[k]) for _ in range(world)]
                     for k in ("image", "input_ids", "attention_mask")}
            for k, v in parts.items():
                dist.all_gather(v, batch[k].contiguous())
            keys: list = [None] * world
            dist.all_gather_object(keys, list(batch["key"]))
            whole = model(*(torch.cat(parts[k]) for k in ("image", "input_ids", "attention_mask")))
            smoothing = {} if pl_module.loss_spec.uses_bias else {"label_smoothing": pl_module.label_smoothing}
            single = pl_module.loss_spec.fn(whole.image_features, whole.text_features, whole.logit_scale,
                                            whole.logit_bias, **smoothing)
        model.train(was)
        if trainer.is_global_zero:
            Path(self.path).write_text(json.dumps({"rank_losses": [float(x) for x in losses], "single": float(single),
                                                   "keys": keys, "world": world}))
