"""Lightning callbacks: throughput logging, export at the end of fit, prediction writing, sample audit."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from dualenc.export import export_model


class SamplesPerSecond(L.Callback):
    """Logs training samples/s over each logging window.

    Lightning's ThroughputMonitor synchronizes CUDA after every batch; over a window of many steps
    the asynchronous queue's lag is negligible, so this one never syncs inside the step.
    """

    def __init__(self) -> None:
        self._t0: float | None = None
        self._samples = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self._samples += len(batch["image"]) * trainer.world_size
        now = time.perf_counter()
        if self._t0 is None:  # the first step includes start-up costs: start the clock after it
            self._t0, self._samples = now, 0
            return
        if (trainer.global_step % trainer.log_every_n_steps == 0) and now > self._t0:
            pl_module.log("train/samples_per_sec", self._samples / (now - self._t0), rank_zero_only=True)
            self._t0, self._samples = now, 0


class ExportOnFitEnd(L.Callback):
    """Writes the trained model as a dualenc export (safetensors + config) when ``fit`` ends."""

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath  # default: <trainer.default_root_dir>/export

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted:
            return
        # Collective under FSDP/DeepSpeed (gathers the full state), so every rank calls it.
        full = trainer.strategy.lightning_module_state_dict()
        if trainer.is_global_zero:
            state = {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}
            path = export_model(pl_module.model, Path(self.dirpath or Path(trainer.default_root_dir) / "export"), state)
            print(f"exported model to {path}")


class SampleKeyLogger(L.Callback):
    """Appends ``epoch<TAB>step<TAB>key key ...`` per training step to a file (rank 0's batch).

    An audit trail of which samples each step saw: used to check data order, resumption and
    duplicates. Each line is flushed and fsynced, so it survives the process being killed.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if not trainer.is_global_zero or "key" not in batch:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{trainer.current_epoch}\t{trainer.global_step}\t{' '.join(map(str, batch['key']))}\n")
            f.flush()
            os.fsync(f.fileno())


class PredictionWriter(BasePredictionWriter):
    """Writes ``dualenc predict``'s embeddings as embedding directories (``dualenc embed``'s format).

    ``<dirpath>/image`` holds the image embeddings keyed by sample key and, for shards with captions,
    ``<dirpath>/text`` the caption embeddings keyed ``KEY#0``, so ``dualenc retrieval --images
    DIR/image --texts DIR/text`` scores them. Under DDP each rank writes ``image-rank{R}`` /
    ``text-rank{R}`` (ranks read disjoint shards). Every ``shard_size`` rows become one file, so
    memory stays bounded. ``dualenc predict`` adds this writer when the config has none.

    Args:
        dirpath: output folder; default ``<trainer.default_root_dir>/predictions``.
        shard_size: rows per output file.
        file_format: ``npy`` or ``safetensors``.
    """

    def __init__(self, dirpath: str | None = None, shard_size: int = 10000, file_format: str = "npy") -> None:
        super().__init__(write_interval="batch")
        self.dirpath, self.shard_size, self.file_format = dirpath, shard_size, file_format
        self._writers: dict[str, Any] = {}
        self._rows: dict[str, list[Any]] = {}
        self._ids: dict[str, list[str]] = {}
        self._count: dict[str, int] = {}

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from dualenc.eval.store import EmbeddingWriter

        root = Path(self.dirpath or Path(trainer.default_root_dir) / "predictions")
        suffix = f"-rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        source = str(getattr(trainer.datamodule, "predict_spec", None))
        model = str(trainer.ckpt_path or type(pl_module).__name__)
        self._writers = {kind: EmbeddingWriter(root / f"{kind}{suffix}", kind, model, source, self.file_format,
                                               params={"shard_size": self.shard_size}, overwrite=True)
                         for kind in ("image", "text")}
        self._rows = {k: [] for k in self._writers}
        self._ids = {k: [] for k in self._writers}
        self._count = {k: 0 for k in self._writers}
        self.root = root

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        keys = [str(k) for k in prediction["key"]]
        self._add("image", prediction["image_embeddings"], keys)
        if "text_embeddings" in prediction:
            self._add("text", prediction["text_embeddings"], [f"{k}#0" for k in keys])

    def _add(self, kind: str, rows: Any, ids: list[str]) -> None:
        self._rows[kind].append(rows.detach().float().cpu())
        self._ids[kind] += ids
        if len(self._ids[kind]) >= self.shard_size:
            self._flush(kind)

    def _flush(self, kind: str) -> None:
        if not self._ids[kind]:
            return
        name = f"pred-{len(self._writers[kind].manifest['shards']):05d}"
        self._writers[kind].write(name, torch.cat(self._rows[kind]), self._ids[kind])
        self._count[kind] += len(self._ids[kind])
        self._rows[kind], self._ids[kind] = [], []

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for kind, writer in self._writers.items():
            self._flush(kind)
            if self._count[kind]:
                writer.finish()
                print(f"wrote {self._count[kind]} {kind} embeddings to {writer.dir}")
            else:  # e.g. shards without captions: no empty text directory
                shutil.rmtree(writer.dir, ignore_errors=True)
