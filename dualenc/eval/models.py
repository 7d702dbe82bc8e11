"""Any model the alignment plugins can load, evaluated like a dualenc export.

``dualenc zeroshot/retrieval --model`` takes a dualenc export directory, an HF CLIP-style directory, or
an open_clip checkpoint (with ``--model-config``); the kind is read from the files or given with
``--model-kind`` (any name of ``dualenc.plugins.registry.TARGETS``); an open_clip ``local-dir`` model
directory (``open_clip_config.json`` + weights, as ``dualenc export --format open_clip`` writes) works
too. Non-dualenc models are wrapped in :class:`TargetModel`, which offers the small part of ``DualEncoder`` the evaluation code uses:
``encode_image``, ``encode_text``, ``embed_dim``, ``image_tower.data_config`` and
``text_tower.tokenizer_fn()``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from dualenc.errors import UserError

_HF_KINDS = ("clip", "siglip", "siglip2", "chinese_clip", "altclip", "vision-text-dual-encoder")


class _Utf8Tokens:
    """Texts as padded UTF-8 byte tensors: the eval code moves "token ids" between tokenizing and
    encoding, and a target tokenizes for itself, so the texts travel as bytes and are decoded back
    (lossless, stateless, picklable)."""

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        raw = [t.encode("utf-8") for t in texts]
        width = max((len(r) for r in raw), default=0) or 1
        ids = torch.zeros(len(raw), width, dtype=torch.uint8)
        mask = torch.zeros(len(raw), width, dtype=torch.long)
        for i, r in enumerate(raw):
            ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.uint8)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def _decode(ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    ids, mask = ids.cpu(), mask.cpu()
    return [bytes(ids[i, : int(mask[i].sum())].tolist()).decode("utf-8") for i in range(ids.shape[0])]


class TargetModel:
    """A frozen ``dualenc.plugins.targets.Target`` behind the evaluation code's model interface."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.embed_dim = int(target.embed_dim)
        self.image_tower = SimpleNamespace(data_config=target.data_config())
        self.text_tower = SimpleNamespace(tokenizer_fn=_Utf8Tokens)

    def to(self, device: torch.device | str) -> "TargetModel":
        self.target.to(device)
        return self

    def eval(self) -> "TargetModel":
        return self

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.target.encode_image(images)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.target.encode_text(_decode(input_ids, attention_mask)).to(input_ids.device)


def detect_kind(path: str, model_config: str | None = None) -> str:
    """``dualenc``, ``hf_clip`` or ``open_clip``, from what ``path`` holds."""
    p = Path(path)
    if p.is_file():
        if model_config is None:
            raise UserError(f"{path} is a weights file; for an open_clip checkpoint give its config too: "
                            "--model-config open_clip_config.json (or a built-in open_clip name like ViT-B-32)")
        return "open_clip"
    if (p / "open_clip_config.json").is_file():  # an open_clip local-dir model (e.g. dualenc export --format open_clip)
        return "open_clip"
    cfg = p / "config.json"
    if not cfg.is_file():
        raise UserError(f"--model {path!r} is neither a dualenc export, an HF model directory (config.json) nor "
                        "an open_clip checkpoint file; check the path")
    try:
        data = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg} is not valid JSON ({e}); is {path} a model directory?") from None
    if str(data.get("format", "")).startswith("dualenc-export"):
        return "dualenc"
    if data.get("model_type") in _HF_KINDS or "vision_config" in data:
        return "hf_clip"
    raise UserError(f"{cfg}: not a dualenc export and not a CLIP-style HF model (model_type "
                    f"{data.get('model_type')!r}); give --model-kind explicitly")


def load_eval_model(path: str, kind: str = "auto", model_config: str | None = None,
                    device: torch.device | str = "cpu") -> Any:
    """A ``DualEncoder`` for a dualenc export, else a :class:`TargetModel`; on ``device``, in eval mode."""
    import dualenc.plugins.targets  # noqa: F401 - registers the built-in kinds
    from dualenc.plugins.registry import TARGETS

    kind = detect_kind(path, model_config) if kind == "auto" else kind
    if kind == "dualenc":
        from dualenc.export import load_model

        return load_model(path).to(device)
    if kind == "open_clip" and Path(path).is_dir():
        weights = sorted(Path(path).glob("open_clip_*.safetensors")) + sorted(Path(path).glob("open_clip_*.bin"))
        if not weights or not (Path(path) / "open_clip_config.json").is_file():
            raise UserError(f"{path} is no open_clip model directory: it needs open_clip_config.json and "
                            "open_clip_model.safetensors (or open_clip_pytorch_model.bin)")
        kwargs: dict[str, Any] = {"checkpoint": str(weights[0]),
                                  "model_config": model_config or str(Path(path) / "open_clip_config.json")}
    elif kind == "open_clip":
        if model_config is None:
            raise UserError("an open_clip checkpoint needs --model-config (its open_clip_config.json or a built-in "
                            "architecture name)")
        kwargs = {"checkpoint": path, "model_config": model_config}
    else:  # hf_clip and third-party kinds take the model's path
        kwargs = {"path": path}
    if kind not in TARGETS:
        raise UserError(f"unknown --model-kind {kind!r}; known: auto, {', '.join(TARGETS.names())}")
    return TargetModel(TARGETS.build(kind, kwargs)).to(device)
