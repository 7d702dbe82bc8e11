"""Callbacks for the resume tests: each step's loss, and the final weights."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


class LossLogger(L.Callback):
    """Appends ``step<TAB>loss`` (full float precision) per training step to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        with self.path.open("a") as f:
            f.write(f"{trainer.global_step}\t{float(loss)!r}\n")


class SaveWeightsOnEnd(L.Callback):
    """Saves the module's state dict to ``path`` when training ends."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save({k: v.detach().cpu() for k, v in pl_module.state_dict().items()}, self.path)
