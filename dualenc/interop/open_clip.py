"""dualenc <-> open_clip: a timm image tower + HF text tower DualEncoder is an open_clip ``CustomTextCLIP``.

The mapping (open_clip 2.24+ / 3.x, ``timm_model.py``, ``hf_model.py``, ``model.py``):

============================  =====================================================================
dualenc                       open_clip
============================  =====================================================================
``image_tower.trunk.*``       ``visual.trunk.*``: ``timm.create_model(timm_model_name)`` with its
                              classifier reset to 0 and its own global pool (``timm_pool: ""``)
``image_proj.weight``         ``visual.head.proj.weight`` (``timm_proj: linear``, no bias)
``text_tower.encoder.*``      ``text.transformer.*``: ``AutoModel.from_config`` of ``hf_model_name``,
                              no pooler layer
pooling ``cls`` / ``mean``    ``hf_pooler_type``: ``cls_last_hidden_state_pooler`` / ``mean_pooler``
``text_proj.weight``          ``text.proj.weight`` (``hf_proj_type: linear``, no bias)
``logit_scale``/``logit_bias``  the same names (``init_logit_bias`` set when the model has a bias)
============================  =====================================================================

open_clip derives the attention mask from the token ids (``ids != pad_token_id``); for BERT-style
tokenizers that is exactly the tokenizer's mask, since the pad token never occurs in text.

An export is a directory open_clip reads with its ``local-dir:`` schema: ``open_clip_config.json``
(``model_cfg`` + ``preprocess_cfg``), ``open_clip_model.safetensors``, and the HF text config and
tokenizer files, which ``hf_model_name`` / ``hf_tokenizer_name`` name by absolute path (open_clip
resolves them with transformers, relative to the working directory), so moving the directory means
editing those two fields.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from dualenc.errors import UserError
from dualenc.fileio import staged_directory
from dualenc.model import DualEncoder

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
POOLERS = {"cls": "cls_last_hidden_state_pooler", "mean": "mean_pooler"}
# (dualenc prefix, open_clip prefix): every key is renamed by its prefix, nothing else changes.
PREFIXES = (("image_tower.trunk.", "visual.trunk."), ("image_proj.", "visual.head.proj."),
            ("text_tower.encoder.", "text.transformer."), ("text_proj.", "text.proj."),
            ("logit_scale", "logit_scale"), ("logit_bias", "logit_bias"))


def _rename(state: dict[str, torch.Tensor], pairs: tuple[tuple[str, str], ...], what: str) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        for src, dst in pairs:
            if k.startswith(src):
                out[dst + k[len(src):]] = v
                break
        else:
            raise UserError(f"{what}: key {k!r} has no counterpart (known prefixes: "
                            f"{', '.join(s for s, _ in pairs)})")
    return out


def to_open_clip_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``DualEncoder`` state dict under open_clip ``CustomTextCLIP`` names."""
    return _rename(state, PREFIXES, "dualenc -> open_clip")


def from_open_clip_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip ``CustomTextCLIP`` (timm + HF towers) state dict under ``DualEncoder`` names."""
    # position_ids buffers of older transformers are not state in newer ones.
    state = {k: v for k, v in state.items() if not k.endswith("embeddings.position_ids")}
    return _rename(state, tuple((b, a) for a, b in PREFIXES), "open_clip -> dualenc")


def check_exportable(model: DualEncoder) -> None:
    """Refuse, naming the option, what open_clip's timm/HF adapters cannot express."""
    from dualenc.towers import HFTextTower, TimmImageTower

    img, txt = model.image_tower, model.text_tower
    if not isinstance(img, TimmImageTower) or not isinstance(txt, HFTextTower):
        raise UserError(f"open_clip export needs a timm image tower and an HF text tower; this model has "
                        f"{type(img).__name__} + {type(txt).__name__}")
    if model.config.get("embed_dim") is None:
        raise UserError("open_clip export needs projections (embed_dim set): with embed_dim: null the towers' "
                        "outputs are used as they are, which open_clip's timm adapter has no setting for")
    extra = {k: v for k, v in img._config.get("model_kwargs", {}).items()}
    if extra:
        raise UserError(f"image tower model_kwargs {extra} cannot be exported: open_clip's timm adapter calls "
                        "timm.create_model with no extra arguments")
    if int(img.trunk.num_features) != int(img.output_dim):
        raise UserError(f"{img._config['model_name']}: pooled features ({img.output_dim}) differ from "
                        f"num_features ({img.trunk.num_features}) (a pre-logits head); open_clip's timm adapter "
                        "projects num_features")
    if txt.pooling not in POOLERS:
        raise UserError(f"text pooling {txt.pooling!r} has no open_clip pooler (known: {', '.join(POOLERS)})")


def open_clip_config(model: DualEncoder, text_dir: str | Path) -> dict[str, Any]:
    """``{"model_cfg", "preprocess_cfg"}`` as open_clip's ``open_clip_config.json`` holds them."""
    check_exportable(model)
    img, txt = model.image_tower, model.text_tower
    dc = img.data_config
    size = int(dc["input_size"][-1])
    vision = {"image_size": size, "timm_model_name": img._config["model_name"], "timm_model_pretrained": False,
              "timm_pool": "", "timm_proj": "linear", "timm_proj_bias": False, "timm_drop": 0.0}
    if img._config.get("drop_path_rate") is not None:
        vision["timm_drop_path"] = img._config["drop_path_rate"]
    text = {"hf_model_name": str(Path(text_dir).resolve()), "hf_tokenizer_name": str(Path(text_dir).resolve()),
            "hf_model_pretrained": False, "hf_proj_type": "linear", "hf_pooler_type": POOLERS[txt.pooling],
            "context_length": int(txt.context_length), "vocab_size": int(txt.encoder.config.vocab_size)}
    model_cfg: dict[str, Any] = {"embed_dim": int(model.embed_dim), "custom_text": True, "vision_cfg": vision,
                                 "text_cfg": text}
    if model.logit_bias is not None:
        model_cfg["init_logit_bias"] = float(model.logit_bias.detach())
    preprocess = {"size": size, "mean": [float(v) for v in dc["mean"]], "std": [float(v) for v in dc["std"]],
                  "interpolation": dc.get("interpolation", "bicubic"), "resize_mode": "shortest"}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess}


def export_open_clip(model: DualEncoder, out_dir: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
                     allow_crop_change: bool = False) -> Path:
    """Write an open_clip ``local-dir:`` model directory (see the module docstring), atomically.

    open_clip's transforms resize the shorter side to the input size and center-crop it (timm's
    ``crop_pct`` 1.0). A model whose evaluation crops tighter is refused, since open_clip would see
    other pixels, unless ``allow_crop_change`` (then the open_clip preprocessing is crop_pct 1.0).
    """
    check_exportable(model)
    crop = float(model.image_tower.data_config.get("crop_pct", 1.0))
    if crop != 1.0 and not allow_crop_change:
        raise UserError(f"this model evaluates at crop_pct {crop} but open_clip's transforms have no crop_pct (they "
                        "resize and center-crop at 1.0), so open_clip would preprocess differently. Build the image "
                        "tower with crop_pct: 1.0 (and evaluate it so), or pass --allow-crop-change to export anyway")
    out_dir = Path(out_dir).resolve()
    with staged_directory(out_dir) as tmp:
        text = model.text_tower
        text.encoder.config.save_pretrained(str(tmp))  # config.json: the HF text model, read by open_clip
        text.tokenizer.save_pretrained(str(tmp))
        cfg = open_clip_config(model, out_dir)  # paths name the final directory
        cfg["dualenc"] = {"crop_pct": crop, "exported_from": "dualenc"}
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
        state = state_dict if state_dict is not None else model.state_dict()
        state = {k: v.detach().to("cpu").contiguous() for k, v in to_open_clip_state_dict(state).items()}
        save_file(state, str(tmp / WEIGHTS_FILE))
    return out_dir
