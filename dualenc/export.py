"""Export a trained DualEncoder as safetensors + a JSON config, and load it back with one call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dualenc.fileio import staged_directory
from dualenc.model import DualEncoder
from dualenc.towers import TOWERS, tower_name

FORMAT = "dualenc-export/1"


def export_model(model: DualEncoder, out_dir: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (+ side files such as the tokenizer) into ``out_dir``.

    ``state_dict`` overrides ``model.state_dict()``: sharded strategies (FSDP, DeepSpeed) pass the
    gathered full state here.

    The directory is assembled under a temporary name and renamed into place, so a crash never
    leaves a half-written export; an existing export at ``out_dir`` is replaced.
    """
    out_dir = Path(out_dir)
    with staged_directory(out_dir) as tmp:
        config = {
            "format": FORMAT,
            "image_tower": {"name": tower_name(model.image_tower), "kwargs": model.image_tower.export_config(tmp)},
            "text_tower": {"name": tower_name(model.text_tower), "kwargs": model.text_tower.export_config(tmp)},
            "model": model.config,
            # What the image tower expects (image size, crop_pct, interpolation, mean/std), so that any
            # reader of the export preprocesses as dualenc's evaluation did.
            "preprocess": preprocess_config(model),
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        state = state_dict if state_dict is not None else model.state_dict()
        state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
    return out_dir


def preprocess_config(model: DualEncoder) -> dict[str, Any]:
    """The image tower's eval preprocessing as plain JSON values."""
    dc = model.image_tower.data_config
    out = {"image_size": list(dc["input_size"][-2:]), "crop_pct": float(dc.get("crop_pct", 1.0)),
           "crop_mode": dc.get("crop_mode", "center"), "interpolation": dc.get("interpolation", "bicubic"),
           "mean": [float(v) for v in dc["mean"]], "std": [float(v) for v in dc["std"]]}
    return out


def _resolve_paths(kwargs: dict[str, Any], root: Path) -> dict[str, Any]:
    # Side files (e.g. "tokenizer") are stored relative to the export directory.
    out = dict(kwargs)
    for key in ("tokenizer", "model"):
        if isinstance(out.get(key), str) and (root / out[key]).exists():
            out[key] = str(root / out[key])
    return out


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> DualEncoder:
    """Rebuild a ``DualEncoder`` from an ``export_model`` directory (no network, no unpickling)."""
    root = Path(path)
    cfg_file, weights = root / "config.json", root / "model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{root} is not a dualenc export: it needs config.json and model.safetensors "
                                "(made by `dualenc export` or the ExportOnFitEnd callback)")
    config = json.loads(cfg_file.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{cfg_file}: format {config.get('format')!r}, expected {FORMAT!r}")
    towers = {}
    for side in ("image_tower", "text_tower"):
        spec = config[side]
        towers[side] = TOWERS.get(spec["name"])(**_resolve_paths(spec["kwargs"], root))
    model = DualEncoder(towers["image_tower"], towers["text_tower"], **config["model"])
    state = load_file(str(weights), device=str(map_location))
    model.load_state_dict(state, strict=True)
    return model.eval()
