"""Learned orthogonal Q during training: align a dual encoder to a frozen target model's space.

While the contrastive loss trains the towers, a frozen target embeds the same batch and this plugin
adds (each weighted, each optional):

* ``align_image`` / ``align_text``: ``|| Q (f - mean f) - (f_t - mean f_t) ||^2`` per sample, the same
  orthogonal ``Q`` for both towers, each modality centred with its own batch means (as the closed form);
* ``align_kernel``: agreement of the image-text kernel ``<f(x), g(y)>`` with the target's.

``Q`` is ``torch.nn.utils.parametrizations.orthogonal`` on a bias-free Linear (semi-orthogonal when the
dims differ). The target is held outside the module tree: it never enters ``state_dict`` (so neither
checkpoints nor exports) nor ``parameters()`` (so never the optimizer), and its weights are frozen.

YAML (under ``model.plugins``)::

    - class_path: dualenc.plugins.LearnedQ
      init_args:
        target: dualenc
        target_args: {path: runs/teacher/export}
        embed_dim: 128
        kernel_weight: 1.0
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrizations

from dualenc.distributed import world_info
from dualenc.plugins.mapfile import MapMeta, ModelId
from dualenc.plugins.procrustes import OrthogonalMap, procrustes_q
from dualenc.plugins.synthetic import random_orthogonal
from dualenc.plugins.targets import Target, build_target


class LearnedQ(nn.Module):
    """Training plugin: a shared orthogonal map from this model's space to a frozen target's.

    Args:
        target: a target kind (``dualenc``, ``open_clip``, ``hf_clip``, ``precomputed``, or a third
            party's) or a ``Target`` instance.
        target_args: constructor arguments of that kind (e.g. ``{path: ...}``).
        embed_dim: this model's embedding size (default: read from the model it trains with, in
            ``bind_model``; the target's until then).
        image_weight / text_weight: weights of the feature-alignment terms (0 disables).
        kernel_weight: weight of the image-text kernel agreement term (0 disables).
        center: centre each side with its batch means (the global shift between models is free).
        train_towers: let the alignment terms also move the towers; False trains only ``Q``.
        image_mean / image_std: the normalization of ``batch["image"]``; given (or taken from the
            model by ``bind_model``), images are renormalized for the target. Images are always
            resized to the target's resolution.
        init: where ``Q`` starts. ``first_batch`` (default): the closed-form Procrustes fit on the
            first training batch (broadcast from rank 0 under DDP); ``identity``; ``random`` (seeded);
            or the path of a fitted ``procrustes`` map file (``dualenc align fit``). For square ``Q``
            the start matters beyond speed: the parametrization never changes ``det Q``, so a start
            with the wrong sign (a reflection between the models) can never reach the right ``Q``.
        mean_momentum: EMA rate of the running means kept for ``to_map()`` (means of the global batch:
            under DDP the ranks' batch means are averaged, so every rank keeps the same).
    """

    def __init__(
        self,
        target: str | Target,
        target_args: dict[str, Any] | None = None,
        embed_dim: int | None = None,
        image_weight: float = 1.0,
        text_weight: float = 1.0,
        kernel_weight: float = 0.0,
        center: bool = True,
        train_towers: bool = True,
        image_mean: tuple[float, float, float] | None = None,
        image_std: tuple[float, float, float] | None = None,
        init: str = "first_batch",
        mean_momentum: float = 0.01,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if min(image_weight, text_weight, kernel_weight) < 0:
            raise ValueError("loss weights must be >= 0")
        if image_weight == text_weight == kernel_weight == 0:
            raise ValueError("all LearnedQ loss weights are 0: enable image_weight, text_weight or kernel_weight")
        if (image_mean is None) != (image_std is None):
            raise ValueError("give both image_mean and image_std (the batch images' normalization), or neither")
        if init not in ("first_batch", "identity", "random") and not init.endswith(".safetensors"):
            raise ValueError(f"init must be 'first_batch', 'identity', 'random' or a .safetensors map file, "
                             f"got {init!r}")
        self._target_spec = (target, dict(target_args or {})) if isinstance(target, str) else None
        if not isinstance(target, str) and target_args:
            raise ValueError("target_args only apply when target is a kind name")
        t = target if isinstance(target, Target) else build_target(target, **(target_args or {}))
        self._target: Target | None = t  # a plain attribute: not a submodule, not in state_dict
        need_img = image_weight > 0 or kernel_weight > 0
        need_txt = text_weight > 0 or kernel_weight > 0
        if (need_img and not t.has_image) or (need_txt and not t.has_text):
            raise ValueError(f"target {t.name!r} lacks the {'image' if need_img and not t.has_image else 'text'} "
                             "embeddings these loss weights need; set that weight to 0")
        self.weights = {"image": float(image_weight), "text": float(text_weight), "kernel": float(kernel_weight)}
        self.center, self.train_towers = center, train_towers
        self.image_mean, self.image_std = image_mean, image_std
        self.mean_momentum = mean_momentum
        self.target_dim = int(t.embed_dim)
        self.target_id = t.identity()
        self.init, self.seed = init, seed
        self._dim_given = embed_dim is not None
        self._build(int(embed_dim or t.embed_dim))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self._fresh: bool | None = None  # no training step yet (read from `steps` once: no per-step sync)

    def _build(self, source_dim: int) -> None:
        """``Q`` (target_dim x source_dim) at its start, and the running means of both sides."""
        self.source_dim = source_dim
        init, seed = self.init, self.seed
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):  # the parametrization draws random numbers: keep the global RNG intact
            torch.manual_seed(seed)
            lin = nn.Linear(self.source_dim, self.target_dim, bias=False)
            self.map = parametrizations.orthogonal(lin)
            with torch.no_grad():
                if init == "random":
                    self.map.weight = random_orthogonal(self.target_dim, self.source_dim, g, torch.float32)
                elif init.endswith(".safetensors"):
                    self.map.weight = self._q_from_file(init)
                else:  # identity, and the placeholder until the first batch arrives
                    self.map.weight = torch.eye(self.target_dim, self.source_dim)  # goes through right_inverse
        for m in ("image", "text"):
            self.register_buffer(f"{m}_source_mean", torch.zeros(self.source_dim))
            self.register_buffer(f"{m}_target_mean", torch.zeros(self.target_dim))

    def _q_from_file(self, path: str) -> torch.Tensor:
        from dualenc.plugins.maps import load_map

        m = load_map(path, target=self.target_id)
        if not isinstance(m, OrthogonalMap):
            raise ValueError(f"init map {path} is a {m.meta.kind!r} map, not an orthogonal (procrustes) one")
        if tuple(m.q.shape) != (self.target_dim, self.source_dim):
            raise ValueError(f"init map {path} has Q of shape {tuple(m.q.shape)}, this plugin needs "
                             f"{(self.target_dim, self.source_dim)}")
        return m.q.float()

    @torch.no_grad()
    def _init_from_batch(self, f: torch.Tensor, ft: torch.Tensor) -> None:
        # Closed form on the first batch: also picks the right connected component (det sign) of O(d).
        x = f.detach().double().cpu()
        y = ft.detach().double().cpu()
        q = procrustes_q(x - x.mean(0), y - y.mean(0), use_scipy=False).float().to(f.device)
        distributed = world_info()[1] > 1
        if distributed:
            torch.distributed.broadcast(q, 0)  # every rank starts from rank 0's fit
        orth = self.map.parametrizations.weight[0]
        self._set_q(q)
        if distributed and getattr(orth, "base", None) is not None:
            # A non-square Q is completed to a square one with random columns (drawn from each rank's own
            # RNG): share rank 0's, so every rank holds the same state, whatever DDP does with buffers.
            torch.distributed.broadcast(orth.base, 0)

    @torch.no_grad()
    def _set_q(self, q: torch.Tensor) -> None:
        """Set ``Q`` in place. ``self.map.weight = q`` would swap the parameter's storage (``set_``) and
        the parametrization's ``base`` buffer for new tensors, which DDP, holding references to the old
        ones, never sees: its gradient hook on Q stops firing and its buffer broadcast sends a stale copy."""
        plist = self.map.parametrizations.weight
        orth = plist[0]
        base = getattr(orth, "base", None)
        with torch.random.fork_rng(devices=[]):  # right_inverse draws the completion of a non-square Q
            value = orth.right_inverse(q.to(plist.original.dtype))
        if base is not None and orth.base is not base:
            base.copy_(orth.base)
            orth.base = base
        plist.original.copy_(value)

    # A pickled copy (e.g. in Lightning hyperparameters) must not drag the target model along, and
    # torch refuses to pickle parametrized modules: store Q's state dict and rebuild it on unpickling.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_target"] = None
        state["_modules"] = {k: v for k, v in self._modules.items() if k != "map"}
        state["_map_state"] = {k: v.detach().cpu().clone() for k, v in self.map.state_dict().items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        map_state = state.pop("_map_state")
        super().__setstate__(state)
        with torch.random.fork_rng(devices=[]):
            self.map = parametrizations.orthogonal(nn.Linear(self.source_dim, self.target_dim, bias=False))
        self.map.load_state_dict(map_state)

    @property
    def target(self) -> Target:
        if self._target is None:
            if self._target_spec is None:
                raise RuntimeError("this LearnedQ was unpickled without its target (it was given as an instance)")
            self._target = build_target(self._target_spec[0], **self._target_spec[1])
        return self._target

    def bind_model(self, model: nn.Module) -> None:
        """Take what this plugin can learn from the model it trains with: the images' normalization
        (so the target gets correctly normalized pixels) and a check of the embedding size."""
        dim = getattr(model, "embed_dim", None)
        if dim is not None and int(dim) != self.source_dim and not self._dim_given:
            self._build(int(dim))  # embed_dim was not given: size Q for the model, not the target
        if dim is not None and int(dim) != self.source_dim:
            raise ValueError(f"LearnedQ was built for {self.source_dim}-dim embeddings (embed_dim) but the model's "
                             f"embed_dim is {dim}")
        tower = getattr(model, "image_tower", None)
        dc = getattr(tower, "data_config", None) if tower is not None else None
        if self.image_mean is None and isinstance(dc, dict) and "mean" in dc and "std" in dc:
            self.image_mean, self.image_std = tuple(dc["mean"]), tuple(dc["std"])

    @property
    def q(self) -> torch.Tensor:
        """The current (semi-)orthogonal matrix, shape (target_dim, source_dim)."""
        return self.map.weight

    def _update_means(self, name: str, mean: torch.Tensor) -> None:
        buf = getattr(self, name)
        if self._fresh:
            buf.copy_(mean.detach())
        else:
            buf.lerp_(mean.detach().to(buf.dtype), self.mean_momentum)

    def training_losses(self, batch: dict[str, Any], output: Any) -> dict[str, torch.Tensor]:
        f, g = output.image_features.float(), output.text_features.float()
        if f.shape[-1] != self.source_dim:
            raise ValueError(f"LearnedQ was built for {self.source_dim}-dim features (embed_dim) but the model "
                             f"gives {f.shape[-1]}")
        if not self.train_towers:
            f, g = f.detach(), g.detach()
        want = (self.weights["image"] > 0 or self.weights["kernel"] > 0,
                self.weights["text"] > 0 or self.weights["kernel"] > 0)
        with torch.no_grad():  # the target is frozen; its outputs are constants
            ft, gt = self.target.encode_batch(batch, self.image_mean, self.image_std, want=want)
        if self.training and self._fresh is None:
            self._fresh = int(self.steps) == 0  # False after resuming from a checkpoint
        if self.init == "first_batch" and self.training and self._fresh:
            src0, tgt0 = (f, ft) if ft is not None else (g, gt)
            self._init_from_batch(src0, tgt0)
        q = self.q
        out: dict[str, torch.Tensor] = {}
        batch_means: dict[str, torch.Tensor] = {}
        for m, src, tgt in (("image", f, ft), ("text", g, gt)):
            if tgt is None:
                continue
            tgt = tgt.to(src.device, src.dtype)
            mu_s, mu_t = (src.mean(0), tgt.mean(0)) if self.center else (src.new_zeros(src.shape[1]),
                                                                         tgt.new_zeros(tgt.shape[1]))
            if self.training:
                batch_means[f"{m}_source_mean"], batch_means[f"{m}_target_mean"] = mu_s, mu_t
            if self.weights[m] > 0:
                resid = (src - mu_s) @ q.T - (tgt - mu_t)
                out[f"align_{m}"] = self.weights[m] * resid.pow(2).sum(-1).mean()
        if self.weights["kernel"] > 0:
            kt = ft.to(f.device) @ gt.to(f.device).T
            out["align_kernel"] = self.weights["kernel"] * (f @ g.T - kt).pow(2).mean()
        if self.training:
            self._update_all_means(batch_means)
            self.steps += 1
            self._fresh = False
        return out

    @torch.no_grad()
    def _update_all_means(self, batch_means: dict[str, torch.Tensor]) -> None:
        """Running means from the global batch: under DDP the ranks' batch means are averaged (one
        all-reduce), so every rank keeps the same means whether or not DDP broadcasts buffers."""
        if not batch_means:
            return
        flat = torch.cat([v.detach().float().reshape(-1) for v in batch_means.values()])
        world = world_info()[1]
        if world > 1:
            torch.distributed.all_reduce(flat)
            flat /= world
        for name, part in zip(batch_means, flat.split([v.numel() for v in batch_means.values()])):
            self._update_means(name, part)

    @torch.no_grad()
    def to_map(self, source: ModelId | str | None = None, anchors: int | None = None) -> OrthogonalMap:
        """The learned ``Q`` with the running means, as a map file-able like the closed form."""
        src = ModelId(source, self.source_dim) if isinstance(source, str) else (
            source or ModelId("learned_q.source", self.source_dim))
        means = {f"{m}_{side}": getattr(self, f"{m}_{side}_mean").detach().double().cpu()
                 for m in ("image", "text") for side in ("source", "target")}
        meta = MapMeta(kind=OrthogonalMap.kind, source=src, target=self.target_id,
                       anchors=int(anchors if anchors is not None else self.steps),
                       extra={"method": "learned_q", "steps": int(self.steps), "weights": self.weights})
        return OrthogonalMap(self.q.detach().double().cpu(), means, meta)
