"""dualenc plugins: maps between embedding spaces, fitted stand-alone or learned during training.

Registries (``dualenc.plugins.registry``), both extendable by entry points of other packages:

* ``PLUGINS`` (group ``dualenc.plugins``): ``procrustes``, ``whitening``, ``mnn_procrustes``,
  ``vec2vec`` (map fitters, with ``fit_embeddings``; map kinds load with ``load_map``) and
  ``learned_q`` (a training plugin for ``DualEncoderModule(plugins=[...])``).
* ``TARGETS`` (group ``dualenc.targets``): ``dualenc``, ``open_clip``, ``hf_clip``, ``precomputed``.

Heavy libraries (open_clip, transformers, scipy) are imported only when used.
"""

from typing import Any

import torch
from torch import nn

from dualenc.plugins.checks import FewAnchorsWarning
from dualenc.plugins.learned_q import LearnedQ
from dualenc.plugins.mapfile import MapMeta, MapMismatchError, ModelId, fingerprint_module
from dualenc.plugins.maps import EmbeddingMap, load_map
from dualenc.plugins.procrustes import OrthogonalMap, fit_procrustes
from dualenc.plugins.registry import PLUGINS, TARGETS, EntryPointRegistry
from dualenc.plugins.targets import (DualencTarget, HFClipTarget, OpenClipTarget, PrecomputedTarget, Target,
                                     build_target)
from dualenc.plugins.translate import Vec2VecMap, train_vec2vec
from dualenc.plugins.unpaired import MNNProcrustes, fit_mnn_procrustes
from dualenc.plugins.whitening import Whitening, fit_whitening

PLUGINS.register("procrustes", OrthogonalMap)
PLUGINS.register("whitening", Whitening)
PLUGINS.register("mnn_procrustes", MNNProcrustes)
PLUGINS.register("vec2vec", Vec2VecMap)
PLUGINS.register("learned_q", LearnedQ)


def build_plugin(name: str, **kwargs):  # noqa: ANN201 - returns whatever the plugin's factory builds
    """A plugin by registry name with checked keyword arguments, e.g. ``build_plugin("learned_q", target=...)``."""
    return PLUGINS.build(name, kwargs)


class NamedPlugin(nn.Module):
    """A training plugin chosen by registry name (built-in or a third party's entry point) in YAML::

        plugins:
          - class_path: dualenc.plugins.NamedPlugin
            init_args: {name: learned_q, args: {target: dualenc, target_args: {path: ...}, embed_dim: 128}}

    ``args`` are checked against the plugin's signature (a typo fails listing the valid names).
    """

    def __init__(self, name: str, args: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.plugin = build_plugin(name, **(args or {}))
        if not callable(getattr(self.plugin, "training_losses", None)):
            raise TypeError(f"plugin {name!r} is not a training plugin (no training_losses); "
                            f"use it stand-alone with `dualenc align fit --method {name}`")

    def bind_model(self, model: nn.Module) -> None:
        if callable(getattr(self.plugin, "bind_model", None)):
            self.plugin.bind_model(model)

    def training_losses(self, batch: dict[str, Any], output: Any) -> dict[str, torch.Tensor]:
        return self.plugin.training_losses(batch, output)


from dualenc.plugins import baselines as _baselines  # noqa: F401,E402 - registers linear, mlp, sinkhorn_procrustes
from dualenc.plugins.baselines import (  # noqa: E402
    LinearMap, MLPMap, fit_linear, fit_mlp, fit_sinkhorn_procrustes,
)

__all__ = [
    "PLUGINS", "TARGETS", "DualencTarget", "EmbeddingMap", "EntryPointRegistry", "FewAnchorsWarning", "HFClipTarget",
    "LearnedQ", "MNNProcrustes", "MapMeta", "NamedPlugin", "MapMismatchError", "ModelId", "OpenClipTarget",
    "OrthogonalMap",
    "PrecomputedTarget", "Target", "Vec2VecMap", "Whitening", "build_plugin", "build_target", "fingerprint_module",
    "fit_mnn_procrustes", "fit_procrustes", "fit_whitening", "load_map", "train_vec2vec",
    "LinearMap", "MLPMap", "fit_linear", "fit_mlp", "fit_sinkhorn_procrustes",
]
