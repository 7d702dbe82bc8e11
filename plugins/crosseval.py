"""Two models and a fitted map behind ``dualenc retrieval`` / ``dualenc zeroshot`` (``--text-model``, ``--map``).

Images are embedded by model A (``--model``), texts by model B (``--text-model``), and the map moves one
side into the other's space: A's images into B's when the map was fitted A -> B, B's texts into A's
when it was fitted B -> A. The map's metadata (weight fingerprints of both exports) decides the
direction, so a map of two other models is refused rather than silently applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dualenc.plugins.mapfile import MapMismatchError, ModelId
from dualenc.plugins.maps import EmbeddingMap, Modality, load_map


@dataclass
class CrossModel:
    """``image_model`` embeds the images, ``text_model`` the texts; ``mapped`` says which side ``emb_map`` moves."""

    image_model: nn.Module
    text_model: nn.Module
    emb_map: EmbeddingMap
    mapped: Modality
    setup: dict[str, Any]  # recorded in the results JSON

    def _move(self, x: torch.Tensor, modality: Modality) -> torch.Tensor:
        if modality != self.mapped:
            return x
        return self.emb_map.apply(x.double().cpu(), modality, normalize=True).float()

    def image(self, x: torch.Tensor) -> torch.Tensor:
        """Image embeddings of ``image_model``, in the common space (normalized)."""
        return self._move(x, "image")

    def text(self, x: torch.Tensor) -> torch.Tensor:
        """Text embeddings of ``text_model``, in the common space (normalized)."""
        return self._move(x, "text")

    @property
    def name(self) -> str:
        s = self.setup
        return f"images {s['image_model']} + texts {s['text_model']} via {s['map']}"


def _fits(m: EmbeddingMap, source: ModelId, target: ModelId) -> bool:
    try:
        m.check(source=source, target=target)
    except MapMismatchError:
        return False
    return True


def load_cross_model(image_model: str, text_model: str, map_path: str,
                     device: torch.device | str = "cpu") -> CrossModel:
    """Load two dualenc exports and a map between them; the map's direction is read from its metadata."""
    from dualenc.plugins.targets import DualencTarget

    a, b = DualencTarget(image_model), DualencTarget(text_model)
    m = load_map(map_path)
    if m.meta.target is None:
        raise MapMismatchError(f"{map_path} is a {m.meta.kind!r} map of one space (no target model): a cross-model "
                               "evaluation needs a map between the two models (e.g. `dualenc align fit --method "
                               "procrustes`)")
    ida, idb = a.identity(), b.identity()
    if _fits(m, ida, idb):
        mapped: Modality = "image"
    elif _fits(m, idb, ida):
        mapped = "text"
    else:
        raise MapMismatchError(f"{map_path} maps {m.meta.source.name!r} (weights {m.meta.source.fingerprint}) -> "
                               f"{m.meta.target.name!r} (weights {m.meta.target.fingerprint}); it is not a map between "
                               f"--model {image_model} (weights {ida.fingerprint}) and --text-model {text_model} "
                               f"(weights {idb.fingerprint}) in either direction")
    a.to(device)
    b.to(device)
    setup = {"image_model": str(image_model), "text_model": str(text_model), "map": str(map_path),
             "map_kind": m.meta.kind, "mapped": mapped, "space": "text_model" if mapped == "image" else "image_model",
             "map_source": m.meta.source.name, "map_target": m.meta.target.name, "map_anchors": m.meta.anchors}
    return CrossModel(a.model, b.model, m, mapped, setup)
