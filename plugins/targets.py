"""Frozen target models behind one interface: ``encode_image`` / ``encode_text`` -> normalized embeddings.

Kinds (registry ``TARGETS``, extendable through the ``dualenc.targets`` entry-point group):

* ``dualenc``: another dualenc export directory (``dualenc.export.load_model``).
* ``open_clip``: an open_clip checkpoint file plus its model config (a built-in architecture name or
  a JSON file), built offline: nothing is downloaded.
* ``hf_clip``: a transformers CLIP-style directory (``save_pretrained`` of a ``CLIPModel``).
* ``hf_text``: a transformers / sentence-transformers text encoder directory (BERT, MPNet, MiniLM...),
  mean or CLS pooling; text only.
* ``precomputed``: embeddings computed earlier (``.safetensors``/``.npz``/``.npy``), looked up by sample key.

A target's weights are frozen (``requires_grad=False``) and it is a plain object, not an ``nn.Module``,
so a plugin holding one never puts it into a state dict, an export, or the optimizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dualenc.plugins.mapfile import ModelId, fingerprint_module
from dualenc.plugins.registry import TARGETS

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class Target:
    """Base class: subclasses set the attributes below and implement ``_image``/``_text``."""

    kind: ClassVar[str] = "target"
    has_image: ClassVar[bool] = True
    has_text: ClassVar[bool] = True

    name: str
    embed_dim: int
    image_size: int | None = None  # square input resolution the model expects
    image_mean: tuple[float, ...] | None = None  # normalization the model expects
    image_std: tuple[float, ...] | None = None
    image_interpolation: str = "bicubic"  # resize interpolation of the model's preprocessing

    def __init__(self) -> None:
        self._modules: list[nn.Module] = []
        self._fingerprint: str | None = None
        self.device = torch.device("cpu")

    # -- subclass hooks ----------------------------------------------------------------------------
    def _image(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _text(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def _freeze(self, module: nn.Module) -> nn.Module:
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
        self._modules.append(module)
        return module

    # -- public ------------------------------------------------------------------------------------
    def to(self, device: torch.device | str) -> "Target":
        device = torch.device(device)
        if device != self.device:
            for m in self._modules:
                m.to(device)
            self.device = device
        return self

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self._modules for p in m.parameters()]

    def fingerprint(self) -> str | None:
        if self._fingerprint is None and self._modules:
            self._fingerprint = fingerprint_module(nn.ModuleList(self._modules))
        return self._fingerprint

    def identity(self) -> ModelId:
        return ModelId(self.name, self.embed_dim, self.fingerprint())

    def data_config(self) -> dict[str, Any]:
        """timm-style eval preprocessing for this model (for ``dualenc.data.datamodule.eval_loader``)."""
        if self.image_size is None:
            raise ValueError(f"target {self.name!r} takes no images")
        return {"input_size": (3, self.image_size, self.image_size), "mean": self.image_mean or OPENAI_MEAN,
                "std": self.image_std or OPENAI_STD, "interpolation": self.image_interpolation, "crop_pct": 1.0}

    def adapt_images(self, images: torch.Tensor, input_mean: Sequence[float] | None = None,
                     input_std: Sequence[float] | None = None) -> torch.Tensor:
        """Images normalized for another model (``input_mean``/``input_std``) -> this model's input."""
        x = images.float()
        if input_mean is not None and input_std is not None and self.image_mean is not None:
            x = x * _channel(input_std, x) + _channel(input_mean, x)  # back to [0, 1] pixels
        if self.image_size is not None and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=True)
        if input_mean is not None and input_std is not None and self.image_mean is not None:
            x = (x - _channel(self.image_mean, x)) / _channel(self.image_std or OPENAI_STD, x)
        return x

    @torch.no_grad()
    def encode_image(self, images: Any, input_mean: Sequence[float] | None = None,
                     input_std: Sequence[float] | None = None) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, D) L2-normalized float32 embeddings on ``images``' device."""
        if not self.has_image:
            raise ValueError(f"target {self.name!r} has no image embeddings")
        self.to(images.device)
        return F.normalize(self._image(self.adapt_images(images, input_mean, input_std)).float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """A list of strings -> (B, D) L2-normalized float32 embeddings on the target's device."""
        if not self.has_text:
            raise ValueError(f"target {self.name!r} has no text embeddings")
        if isinstance(texts, str):
            raise TypeError("encode_text takes a list of strings, not one string")
        return F.normalize(self._text(list(texts)).float(), dim=-1)

    def encode_batch(self, batch: dict[str, Any], input_mean: Sequence[float] | None = None,
                     input_std: Sequence[float] | None = None,
                     want: tuple[bool, bool] = (True, True)) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """A training batch (``image``, ``text``) -> (image, text) embeddings on the batch's device."""
        device = batch["image"].device
        self.to(device)
        img = self.encode_image(batch["image"], input_mean, input_std) if want[0] else None
        txt = self.encode_text(batch["text"]).to(device) if want[1] else None
        return img, txt


def _channel(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(list(values), dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


# ---- dualenc ---------------------------------------------------------------------------------------
@TARGETS.register("dualenc")
class DualencTarget(Target):
    """Another dualenc model, from its export directory."""

    kind = "dualenc"

    def __init__(self, path: str, name: str | None = None) -> None:
        super().__init__()
        from dualenc.export import load_model

        self.model = self._freeze(load_model(path))
        self.tokenize = self.model.text_tower.tokenizer_fn()
        dc = self.model.image_tower.data_config
        self.image_size = int(dc["input_size"][-1])
        self.image_mean, self.image_std = tuple(dc["mean"]), tuple(dc["std"])
        self.embed_dim = int(self.model.embed_dim)
        self.name = name or f"dualenc:{path}"
        self._dc = dc

    def data_config(self) -> dict[str, Any]:
        return dict(self._dc)

    def _image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def _text(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenize(texts)
        return self.model.encode_text(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))


# ---- open_clip -------------------------------------------------------------------------------------
@TARGETS.register("open_clip")
class OpenClipTarget(Target):
    """An open_clip model from a local checkpoint and a config; never downloads.

    Args:
        checkpoint: ``.safetensors``/``.bin``/``.pt`` weights of the whole CLIP model.
        model_config: a built-in open_clip architecture name (``ViT-B-32``...) or a JSON file holding
            either the model config or ``{"model_cfg": ..., "preprocess_cfg": ...}`` (open_clip_config.json).
        context_length: tokenizer length (default: the config's).
    """

    kind = "open_clip"

    def __init__(self, checkpoint: str, model_config: str, context_length: int | None = None,
                 name: str | None = None) -> None:
        super().__init__()
        import copy

        import open_clip
        from open_clip.model import CLIP, CustomTextCLIP

        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"open_clip checkpoint {checkpoint!r} does not exist (a local weights file)")
        preprocess: dict[str, Any] = {}
        if model_config.endswith(".json") or Path(model_config).is_file():
            raw = json.loads(Path(model_config).read_text())
            cfg = raw.get("model_cfg", raw)
            preprocess = raw.get("preprocess_cfg", {})
        else:
            cfg = open_clip.get_model_config(model_config)
            if cfg is None:
                raise ValueError(f"{model_config!r} is neither a JSON config file nor a built-in open_clip model "
                                 "(see open_clip.list_models())")
        cfg = copy.deepcopy(cfg)
        text_cfg = cfg.get("text_cfg", {})
        if "timm_model_name" in cfg.get("vision_cfg", {}):
            cfg["vision_cfg"]["timm_model_pretrained"] = False  # never fetch timm weights; the checkpoint has them
        if "hf_model_name" in text_cfg:
            text_cfg["hf_model_pretrained"] = False  # the checkpoint holds the weights
        custom = cfg.pop("custom_text", False) or "hf_model_name" in text_cfg
        if "multimodal_cfg" in cfg:
            raise ValueError("CoCa-style open_clip models are not supported as targets")
        model = (CustomTextCLIP if custom else CLIP)(**cfg)
        open_clip.load_checkpoint(model, checkpoint, strict=True, weights_only=True)  # never unpickles
        self.model = self._freeze(model)
        ctx = context_length or text_cfg.get("context_length", 77)
        if text_cfg.get("hf_tokenizer_name"):
            from open_clip.tokenizer import HFTokenizer

            self.tokenizer = HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=ctx)
        else:
            self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=ctx)  # bundled BPE vocab
        size = model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.image_mean = tuple(preprocess.get("mean", OPENAI_MEAN))
        self.image_std = tuple(preprocess.get("std", OPENAI_STD))
        self.image_interpolation = preprocess.get("interpolation", "bicubic")
        self.embed_dim = int(cfg["embed_dim"])
        self.name = name or f"open_clip:{Path(checkpoint).name}"

    def _image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def _text(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device))


# ---- transformers CLIP ---------------------------------------------------------------------------
def _features(out: Any) -> torch.Tensor:
    # transformers < 5 returns the projected features; 5 returns an output with them as pooler_output.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@TARGETS.register("hf_clip")
class HFClipTarget(Target):
    """A transformers CLIP-style model (``CLIPModel``, ``SiglipModel``...) saved with ``save_pretrained``.

    Args:
        path: the local model directory (config.json + weights, tokenizer files).
        tokenizer: a separate local tokenizer directory (default: ``path``).
        context_length: tokens per text (default: the text config's ``max_position_embeddings``).
    """

    kind = "hf_clip"

    def __init__(self, path: str, tokenizer: str | None = None, context_length: int | None = None,
                 name: str | None = None) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        if not Path(path).is_dir():
            raise FileNotFoundError(f"HF model directory {path!r} does not exist (dualenc never downloads)")
        model = AutoModel.from_pretrained(path, local_files_only=True)
        if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
            raise TypeError(f"{path}: {type(model).__name__} is not a CLIP-style dual encoder "
                            "(no get_image_features/get_text_features)")
        self.model = self._freeze(model)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or path, local_files_only=True)
        cfg = model.config
        self.context_length = context_length or int(cfg.text_config.max_position_embeddings)
        self.image_size = int(cfg.vision_config.image_size)
        pre = Path(path) / "preprocessor_config.json"
        pp = json.loads(pre.read_text()) if pre.is_file() else {}
        self.image_mean = tuple(pp.get("image_mean", OPENAI_MEAN))
        self.image_std = tuple(pp.get("image_std", OPENAI_STD))
        self.embed_dim = int(getattr(cfg, "projection_dim", None) or cfg.text_config.hidden_size)
        self.name = name or f"hf_clip:{path}"

    def _image(self, pixels: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=pixels))

    def _text(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.context_length,
                             return_tensors="pt")
        kwargs = {"input_ids": enc["input_ids"].to(self.device)}
        if "attention_mask" in enc:
            kwargs["attention_mask"] = enc["attention_mask"].to(self.device)
        return _features(self.model.get_text_features(**kwargs))


# ---- transformers / sentence-transformers text encoder ---------------------------------------------
def _st_pooling(path: Path) -> str | None:
    """The pooling a sentence-transformers directory declares (``1_Pooling/config.json``), if any."""
    modules = path / "modules.json"
    pool_dirs = [path / "1_Pooling"]
    if modules.is_file():
        pool_dirs = [path / m.get("path", "") for m in json.loads(modules.read_text())
                     if str(m.get("type", "")).endswith("Pooling")] or pool_dirs
    for d in pool_dirs:
        cfg = d / "config.json"
        if cfg.is_file():
            c = json.loads(cfg.read_text())
            if c.get("pooling_mode_cls_token"):
                return "cls"
            if c.get("pooling_mode_mean_tokens"):
                return "mean"
    return None


@TARGETS.register("hf_text")
class HFTextTarget(Target):
    """A text encoder from a local transformers directory (e.g. a sentence-transformers model), text only.

    Args:
        path: the model directory (config.json, weights, tokenizer files); never downloads.
        pooling: ``mean`` (attention-masked mean of the last hidden states) or ``cls`` (the first token);
            default: what the directory's sentence-transformers ``1_Pooling/config.json`` declares, else mean.
        max_length: tokens per text (default 128, capped by the model's position embeddings).
    """

    kind = "hf_text"
    has_image = False

    def __init__(self, path: str, pooling: str | None = None, max_length: int = 128, name: str | None = None) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        d = Path(path)
        if not d.is_dir() or not (d / "config.json").is_file():
            raise FileNotFoundError(f"text encoder directory {path!r} does not exist or has no config.json "
                                    "(a local transformers/sentence-transformers model; dualenc never downloads)")
        pooling = pooling or _st_pooling(d) or "mean"
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.pooling = pooling
        self.model = self._freeze(AutoModel.from_pretrained(str(d), local_files_only=True))
        self.tokenizer = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        cfg = self.model.config
        limit = int(getattr(cfg, "max_position_embeddings", max_length) or max_length)
        self.max_length = min(int(max_length), limit - 2 if limit > 2 else limit)
        self.embed_dim = int(cfg.hidden_size)
        self.name = name or f"hf_text:{d.name}"

    def _text(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        h = self.model(**enc).last_hidden_state
        if self.pooling == "cls":
            return h[:, 0]
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


# ---- precomputed -----------------------------------------------------------------------------------
@TARGETS.register("precomputed")
class PrecomputedTarget(Target):
    """Embeddings computed earlier, looked up by sample key (the batch's ``key``).

    ``encode_image``/``encode_text`` take *keys* (a list of str) instead of pixels/texts.

    Args:
        path: an embedding file (``.safetensors`` from ``save_embeddings``, ``.npz`` with ``image``,
            ``text``, ``keys``) whose rows are named by keys.
        keys: a text file with one key per line, for files that carry none (``.npy``).
        model: the model's name, when the file does not record it.
    """

    kind = "precomputed"

    def __init__(self, path: str, keys: str | None = None, model: str | None = None) -> None:
        super().__init__()
        from dualenc.plugins.embeddings import load_embeddings

        self.data = load_embeddings(path, model)
        if keys is not None:
            lines = [ln.strip() for ln in Path(keys).read_text().splitlines() if ln.strip()]
            self.data.keys = lines
        rows = self.data.index()  # fails clearly without keys
        n = {int(v.shape[0]) for v in self.data.arrays.values()}
        if n != {len(rows)}:
            raise ValueError(f"{path}: {len(rows)} keys but {sorted(n)} embedding rows")
        self.rows = rows
        self.arrays = {k: F.normalize(v.float(), dim=-1) for k, v in self.data.arrays.items()}
        self.has_image = self.data.maybe("image") is not None  # type: ignore[misc]
        self.has_text = self.data.maybe("text") is not None  # type: ignore[misc]
        self.embed_dim = int(self.data.model.dim or 0)
        self.name = self.data.model.name

    def fingerprint(self) -> str | None:
        return self.data.model.fingerprint

    def _lookup(self, keys: Sequence[str], modality: str) -> torch.Tensor:
        missing = [k for k in keys if k not in self.rows]
        if missing:
            raise KeyError(f"precomputed target {self.name!r} has no embeddings for {len(missing)} key(s), "
                           f"e.g. {missing[:3]}")
        idx = torch.tensor([self.rows[k] for k in keys])
        src = self.arrays.get(modality, self.arrays.get("embeddings"))
        return src[idx]

    def to(self, device: torch.device | str) -> "PrecomputedTarget":
        device = torch.device(device)
        if device != self.device:
            self.arrays = {k: v.to(device) for k, v in self.arrays.items()}
            self.device = device
        return self

    @torch.no_grad()
    def encode_image(self, images: Any, input_mean: Any = None, input_std: Any = None) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            raise TypeError("a precomputed target looks embeddings up by sample key: pass a list of keys "
                            "(in training it reads batch['key'])")
        if not self.has_image:
            raise ValueError(f"precomputed target {self.name!r} has no image embeddings")
        return self._lookup(images, "image")

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        if not self.has_text:
            raise ValueError(f"precomputed target {self.name!r} has no text embeddings")
        return self._lookup(texts, "text")

    def encode_batch(self, batch: dict[str, Any], input_mean: Any = None, input_std: Any = None,
                     want: tuple[bool, bool] = (True, True)) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if batch.get("key") is None:
            raise ValueError("a precomputed target needs batch['key'] to find each sample's embeddings")
        self.to(batch["image"].device if "image" in batch else "cpu")
        keys = list(batch["key"])
        return (self.encode_image(keys) if want[0] else None, self.encode_text(keys) if want[1] else None)


def build_target(kind: str, **kwargs: Any) -> Target:
    """A target by registry name, e.g. ``build_target("dualenc", path="runs/demo/export")``."""
    t = TARGETS.build(kind, kwargs)
    if not isinstance(t, Target):
        raise TypeError(f"target {kind!r} built a {type(t).__name__}, not a dualenc.plugins.targets.Target")
    return t
