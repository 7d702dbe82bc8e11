"""Lightning callbacks: throughput logging and export at the end of fit."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning as L

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
