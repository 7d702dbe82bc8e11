"""Start a DualEncoder from pretrained weights: a dualenc export, an open_clip model, an HF dual encoder.

``DualEncoder(..., init_from=PATH)`` calls :func:`load_pretrained` once the towers are built; the
towers must be configured as the source's (same timm name, same text config and pooling), and the
load is strict, so a mismatch names the keys. Sources, recognized by their files:

* a dualenc export directory (``config.json`` with ``format: dualenc-export/1`` + ``model.safetensors``);
* an open_clip timm + HF model: a ``local-dir`` directory (``open_clip_config.json`` + weights) or a
  checkpoint file whose keys start with ``visual.`` / ``text.``;
* an HF ``VisionTextDualEncoderModel`` directory: only its text side (``init_parts: [text]``): HF vision
  models have no timm counterpart, so the image tower comes from timm weights (``image_tower.weights``).
  Its text embeddings pass BERT's pooler (dense + tanh on [CLS]), which dualenc's towers do not have:
  this initializes fine-tuning, it does not reproduce the HF model's embeddings.

Separate local timm and HF weights need nothing here: ``TimmImageTower(weights=FILE)`` and
``HFTextTower(model=DIR)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from dualenc.errors import UserError
from dualenc.towers.weights import load_into, read_state_dict

PARTS = ("image", "text")
_OWNED = {"image": ("image_tower.", "image_proj."), "text": ("text_tower.", "text_proj.")}


def _from_hf_dual_encoder(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if k.startswith("text_model.") and not k.startswith("text_model.pooler."):
            out["text_tower.encoder." + k[len("text_model."):]] = v
        elif k == "text_projection.weight":
            out["text_proj.weight"] = v
        elif k == "logit_scale":
            out[k] = v
    return out


def source_state(path: str | Path) -> tuple[str, dict[str, torch.Tensor]]:
    """(kind, state dict under DualEncoder names) of a pretrained source."""
    from dualenc.interop.open_clip import from_open_clip_state_dict

    p = Path(path)
    if p.is_dir():
        if (p / "open_clip_config.json").is_file():
            files = sorted(p.glob("open_clip_*.safetensors")) + sorted(p.glob("open_clip_*.bin"))
            if not files:
                raise UserError(f"{p} has open_clip_config.json but no open_clip_model.safetensors / "
                                "open_clip_pytorch_model.bin")
            return "open_clip", from_open_clip_state_dict(read_state_dict(files[0]))
        cfg = p / "config.json"
        if not cfg.is_file():
            raise UserError(f"init_from {str(p)!r}: no config.json or open_clip_config.json; give a dualenc export, "
                            "an open_clip model directory or checkpoint, or an HF dual-encoder directory")
        meta = json.loads(cfg.read_text())
        if str(meta.get("format", "")).startswith("dualenc-export"):
            return "dualenc", read_state_dict(p / "model.safetensors")
        if meta.get("model_type") == "vision-text-dual-encoder":
            weights = next((p / n for n in ("model.safetensors", "pytorch_model.bin") if (p / n).is_file()), None)
            if weights is None:
                raise UserError(f"{p}: no model.safetensors / pytorch_model.bin (sharded HF checkpoints: merge first)")
            return "hf_dual_encoder", _from_hf_dual_encoder(read_state_dict(weights))
        raise UserError(f"init_from {str(p)!r}: model_type {meta.get('model_type')!r} cannot initialize dualenc towers "
                        "(supported: dualenc exports, open_clip timm+HF models, HF VisionTextDualEncoderModel)")
    state = read_state_dict(p)
    if any(k.startswith(("visual.trunk.", "text.transformer.")) for k in state):
        return "open_clip", from_open_clip_state_dict(state)
    if any(k.startswith("visual.") for k in state):
        raise UserError(f"{p}: an open_clip model with its own vision transformer (not a timm tower); dualenc's "
                        "image towers are timm models, so only open_clip models with timm_model_name load")
    raise UserError(f"{p}: not an open_clip checkpoint (no visual.* / text.* keys)")


@torch.no_grad()
def load_pretrained(model: nn.Module, path: str | Path, parts: Sequence[str] = PARTS) -> str:
    """Copy the pretrained weights of ``parts`` (``image``, ``text``) into ``model``, strictly; returns the kind."""
    bad = [x for x in parts if x not in PARTS]
    if bad or not parts:
        raise UserError(f"init_parts must be a non-empty subset of {list(PARTS)}, got {list(parts)}")
    kind, state = source_state(path)
    if kind == "hf_dual_encoder" and "image" in parts:
        raise UserError(f"{path} is an HF VisionTextDualEncoderModel: its vision model is no timm model, so only its "
                        "text side loads. Set init_parts: [text] and give the image tower timm weights "
                        "(image_tower weights: FILE)")
    owned = tuple(p for x in parts for p in _OWNED[x])
    scalars = {"logit_scale", "logit_bias"}
    keep = {k: v for k, v in state.items() if k.startswith(owned) or k in scalars}
    expected = {k for k in model.state_dict() if k.startswith(owned) or k in scalars}
    if kind == "hf_dual_encoder":  # the text side only: its projection and scale, not our bias
        expected = {k for k in expected if k != "logit_bias"}
    if "logit_bias" in expected and "logit_bias" not in keep:
        expected.discard("logit_bias")  # a softmax-trained source initializing a SigLIP model: keep the init
    # A locked tower with frozen batch norm (open_clip's --lock-image-freeze-bn-stats, timm's FrozenBatchNorm2d)
    # has no num_batches_tracked; the counter changes nothing once the statistics are frozen: keep ours.
    for k in expected - set(keep):
        if k.endswith(".num_batches_tracked"):
            keep[k] = model.state_dict()[k]
    sub = _Subset(model, expected)
    load_into(sub, keep, str(path), ignore_prefixes=tuple(k for k in set(keep) - expected if k in scalars))
    return kind


class _Subset(nn.Module):
    """The named entries of a model's state dict as one module for ``load_into`` (which is strict)."""

    def __init__(self, model: nn.Module, names: set[str]) -> None:
        super().__init__()
        self._model = [model]  # a list: not registered as a submodule
        self._names = names

    def state_dict(self, *args, **kwargs):  # type: ignore[override]
        full = self._model[0].state_dict()
        return {k: full[k] for k in self._names}

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):  # type: ignore[override]
        full = self._model[0].state_dict()
        for k, v in state.items():
            full[k].copy_(v)
        return None
