"""The one small interface both towers share.

A tower turns raw inputs (pixels, or token ids) into pooled features of size ``output_dim``.
Projection to the shared embedding space and normalization live in ``DualEncoder``, not here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


class Tower(nn.Module):
    """Base class for towers; the methods below are the whole contract."""

    output_dim: int

    def lock(self, unlocked_groups: int = 0, freeze_norm_stats: bool = True) -> None:
        """Freeze the tower (LiT-style), leaving the last ``unlocked_groups`` layer groups trainable."""
        raise NotImplementedError

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for memory by recomputing activations in the backward pass."""
        raise NotImplementedError

    def no_weight_decay(self) -> set[str]:
        """Names of parameters (relative to this tower) that must not be weight-decayed."""
        return {n for n, p in self.named_parameters() if p.ndim < 2}

    def export_config(self, out_dir: Path) -> dict[str, Any]:
        """Constructor kwargs that rebuild this tower with no outside files (weights come separately).

        May write side files (a tokenizer) into ``out_dir``; paths returned are relative to it.
        """
        raise NotImplementedError


class ImageTower(Tower):
    """Images (B, 3, H, W) -> features (B, output_dim)."""

    @property
    def data_config(self) -> dict[str, Any]:
        """timm-style data config: input_size, mean, std, interpolation, crop_pct."""
        raise NotImplementedError


class TextTower(Tower):
    """Token ids (B, L) and attention mask (B, L) -> features (B, output_dim)."""

    def tokenizer_fn(self) -> Any:
        """A picklable callable ``list[str] -> {"input_ids", "attention_mask"}`` for data workers."""
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:  # noqa: D102
        raise NotImplementedError


def freeze_module(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def last_modules_unfrozen(groups: list[list[nn.Module]], n: int) -> None:
    """Re-enable gradients for the last ``n`` groups of modules."""
    for group in groups[len(groups) - n :] if n > 0 else []:
        for m in group:
            for p in m.parameters():
                p.requires_grad_(True)
