"""Helpers shared by the end-to-end tests (tiny demo data and a tiny training config)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def build_tiny_demo(root: Path) -> Path:
    """A small demo dataset (32 px) with its own WordPiece vocab."""
    from dualenc.data_tools.demo import build_demo
    from dualenc.data_tools.tokenizer import iter_captions, train_wordpiece

    build_demo(root, n_train=384, n_val=128, n_heldout=96, image_size=32, shard_size=96, seed=1)
    train_wordpiece(iter_captions(str(root / "train")), root / "tokenizer", vocab_size=300)
    return root


def tiny_config(tmp: Path, data: Path, **trainer) -> Path:
    """configs/demo.yaml with tiny towers, checkpoints every 2 steps and all outputs under ``tmp``."""
    cfg = {
        "__base__": str(REPO / "configs" / "demo.yaml"),
        "trainer": {"default_root_dir": str(tmp / "run"), "log_every_n_steps": 1, "enable_progress_bar": False,
                    "num_sanity_val_steps": 0, **trainer,
                    "callbacks": [
                        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                         "init_args": {"dirpath": str(tmp / "ckpt"), "save_last": True, "every_n_train_steps": 2,
                                       "save_top_k": -1}},
                        {"class_path": "dualenc.callbacks.SamplesPerSecond"},
                        {"class_path": "dualenc.callbacks.ExportOnFitEnd"}]},
        "model": {"model": {"image_tower": {"class_path": "dualenc.towers.TimmImageTower",
                                            "init_args": {"model_name": "test_efficientnet", "image_size": 32}},
                            "text_tower": {"class_path": "dualenc.towers.HFTextTower",
                                           "init_args": {"config": {"model_type": "bert", "hidden_size": 32,
                                                                    "num_hidden_layers": 2, "num_attention_heads": 2,
                                                                    "intermediate_size": 64},
                                                         "tokenizer": str(data / "tokenizer"),
                                                         "context_length": 16}},
                            "embed_dim": 16},
                  "scheduler": {"warmup_steps": 2, "total_steps": 8}},
        "data": {"train": str(data / "train"), "val": str(data / "val"), "batch_size": 32, "num_workers": 1,
                 "eval_sets": None},  # demo.yaml's held-out set is relative to the working directory
    }
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class KillAtStep(L.Callback):
    """SIGKILLs its own process once training reaches ``step``: a hard crash at a known point (only on
    global rank ``rank`` when given: one node of several dies)."""

    def __init__(self, step: int, rank: int | None = None) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), signal.SIGKILL)


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker, args: tuple, world: int, timeout_s: float) -> None:
    """Runs ``worker(rank, port, *args)`` in ``world`` spawned processes (gloo tests); a worker's exception
    is re-raised here with its traceback, and a run past ``timeout_s`` fails the test."""
    import sys
    import time

    import pytest
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    # Spawned children unpickle the worker by module name, so tests/ must be importable there; they
    # copy sys.path when they start, so it is restored right after.
    here = Path(__file__).resolve()
    saved = list(sys.path)
    sys.path[:0] = [str(here.parent), str(here.parents[1])]
    try:
        ctx = mp.start_processes(worker, args=(free_port(), *args), nprocs=world, join=False, start_method="spawn")
    finally:
        sys.path[:] = saved
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish within {timeout_s}s")
    finally:
        for p in ctx.processes:  # only our own children, and only if still running
            if p.is_alive():
                p.kill()
                p.join(5)


def tiny_hf_clip_dir(root: Path, tokenizer_src: str | Path) -> Path:
    """A tiny random HF CLIPModel saved to ``root/hf_clip`` with a real (MiniLM) tokenizer beside it."""
    from transformers import CLIPConfig, CLIPModel

    from conftest import copy_tokenizer

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=30522, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, pad_token_id=0, bos_token_id=101,
                         eos_token_id=102),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16),
        projection_dim=12)
    path = Path(root) / "hf_clip"
    CLIPModel(config).eval().save_pretrained(path)
    copy_tokenizer(tokenizer_src, path)
    return path


def read_samples(folder: Path) -> dict[str, dict[str, bytes]]:
    """Every member of the shards in ``folder``, as ``{key: {ext: bytes}}``."""
    import tarfile

    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(Path(folder).glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples
