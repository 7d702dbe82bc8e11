"""DualEncoder: two towers, projections to a shared space, and the learnable temperature (and bias)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dualenc.towers.base import ImageTower, TextTower


@dataclass
class DualEncoderOutput:
    image_features: torch.Tensor  # (B, D), L2-normalized
    text_features: torch.Tensor  # (B, D), L2-normalized
    logit_scale: torch.Tensor  # 0-dim, exp of the learnable log-scale (1 / temperature), clamped
    logit_bias: torch.Tensor | None  # 0-dim, SigLIP's learnable bias; None for softmax losses


class DualEncoder(nn.Module):
    """An image tower and a text tower mapped into one embedding space.

    Args:
        image_tower: e.g. ``TimmImageTower``.
        text_tower: e.g. ``HFTextTower``.
        embed_dim: shared embedding size; each tower gets a linear projection to it (ALIGN: 640).
            ``None`` means no projections, and the towers' output sizes must already agree.
        init_logit_scale: initial log of the logit scale (CLIP/ALIGN: log(1/0.07); SigLIP: log(10)).
        max_logit_scale: the log-scale is clamped at this value (log(100) as in CLIP).
        learn_logit_scale: whether the temperature is learned.
        init_logit_bias: a learnable logit bias (SigLIP: -10); ``None`` means no bias parameter.
        init_from: start from pretrained weights: a dualenc export, an open_clip timm + HF model (directory
            or checkpoint) or an HF VisionTextDualEncoderModel directory; the towers must match it (see
            ``dualenc.interop.pretrained``). Not part of the exported config: an export holds the weights.
        init_parts: which towers (with their projections) ``init_from`` initializes: ``image``, ``text``.
    """

    def __init__(
        self,
        image_tower: ImageTower,
        text_tower: TextTower,
        embed_dim: int | None = 640,
        init_logit_scale: float = math.log(1 / 0.07),
        max_logit_scale: float = math.log(100),
        learn_logit_scale: bool = True,
        init_logit_bias: float | None = None,
        init_from: str | None = None,
        init_parts: tuple[str, ...] = ("image", "text"),
    ) -> None:
        super().__init__()
        self.image_tower = image_tower
        self.text_tower = text_tower
        if embed_dim is None:
            if image_tower.output_dim != text_tower.output_dim:
                raise ValueError(f"embed_dim is None but the towers' outputs differ ({image_tower.output_dim} "
                                 f"vs {text_tower.output_dim}); set embed_dim to add projections")
            self.image_proj: nn.Module = nn.Identity()
            self.text_proj: nn.Module = nn.Identity()
            self.embed_dim = image_tower.output_dim
        else:
            self.image_proj = nn.Linear(image_tower.output_dim, embed_dim, bias=False)
            self.text_proj = nn.Linear(text_tower.output_dim, embed_dim, bias=False)
            self.embed_dim = embed_dim
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)), requires_grad=learn_logit_scale)
        self.max_logit_scale = max_logit_scale
        self.logit_bias = None if init_logit_bias is None else nn.Parameter(torch.tensor(float(init_logit_bias)))
        self.config = dict(embed_dim=embed_dim, init_logit_scale=init_logit_scale, max_logit_scale=max_logit_scale,
                           learn_logit_scale=learn_logit_scale, init_logit_bias=init_logit_bias)
        if init_from:
            from dualenc.interop.pretrained import load_pretrained  # key mapping lives beside the model

            load_pretrained(self, init_from, tuple(init_parts))

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.project_image(self.image_tower(images), normalize)

    def project_image(self, tower_features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """The image tower's pooled features -> the shared space (e.g. features a cache kept)."""
        x = self.image_proj(tower_features)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.text_proj(self.text_tower(input_ids, attention_mask))
        return F.normalize(x, dim=-1) if normalize else x

    def scale(self) -> torch.Tensor:
        """The current logit scale (1 / temperature)."""
        return self.logit_scale.clamp(max=self.max_logit_scale).exp()

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> DualEncoderOutput:
        return DualEncoderOutput(
            image_features=self.encode_image(images),
            text_features=self.encode_text(input_ids, attention_mask),
            logit_scale=self.scale(),
            logit_bias=self.logit_bias,
        )

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay: norms, biases, temperature and logit bias."""
        names = {f"image_tower.{n}" for n in self.image_tower.no_weight_decay()}
        names |= {f"text_tower.{n}" for n in self.text_tower.no_weight_decay()}
        return names | {n for n, p in self.named_parameters() if p.ndim < 2}
