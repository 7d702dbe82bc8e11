"""Strategy fragments in configs/strategy/ load, and DDP trains with 2 CPU processes."""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests_helpers import tiny_config  # noqa: E402  (tests/ is on sys.path under pytest's rootdir)

REPO = Path(__file__).resolve().parents[1]
FRAGMENTS = sorted((REPO / "configs" / "strategy").glob("*.yaml"))


@pytest.mark.parametrize("path", FRAGMENTS, ids=lambda p: p.stem)
def test_strategy_fragment_is_valid(path: Path) -> None:
    trainer = yaml.safe_load(path.read_text())["trainer"]
    from lightning import Trainer

    Trainer.__init__  # the fragment only sets Trainer arguments
    allowed = set(inspect.signature(Trainer.__init__).parameters)
    assert set(trainer) <= allowed, set(trainer) - allowed
    strategy = trainer.get("strategy")
    if isinstance(strategy, dict):
        module, _, name = strategy["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        inspect.signature(cls.__init__).bind(None, **strategy.get("init_args", {}))


def test_ddp_two_cpu_processes(tmp_path: Path, demo_data: Path) -> None:
    cfg = tiny_config(tmp_path, demo_data, max_steps=4)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [str(Path(sys.executable).parent / "dualenc"), "fit", "--config", str(cfg),
           "--config", str(REPO / "configs" / "strategy" / "ddp.yaml"),
           "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--data.num_workers", "0",
           "--trainer.sync_batchnorm", "false"]  # SyncBatchNorm runs on GPUs only
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()
