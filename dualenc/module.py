"""The LightningModule: receives its model, picks a loss by name, one shared step."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from dualenc.distributed import gather_features, world_info
from dualenc.gradcache import grad_cache_backward
from dualenc.losses import get_loss
from dualenc.model import DualEncoder, DualEncoderOutput


@dataclass
class OptimizerConfig:
    """AdamW. Norms, biases, the temperature and the logit bias get no weight decay."""

    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    fused: bool | None = None  # None: fused on CUDA, plain elsewhere
    foreach: bool | None = None  # multi-tensor kernels (torch's default when not fused); exclusive with fused


@dataclass
class SchedulerConfig:
    """Linear warmup to ``lr`` then cosine decay to ``lr * min_lr_ratio`` (ALIGN: linear decay)."""

    warmup_steps: int = 0
    decay: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.0
    total_steps: int | None = None  # default: the Trainer's estimate


def lr_lambda(step: int, warmup: int, total: int, decay: str, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * shape


class DualEncoderModule(L.LightningModule):
    """Trains a ``DualEncoder`` with a contrastive loss chosen by name.

    Args:
        model: the dual encoder (towers, projections, temperature).
        loss: ``contrastive`` (aliases ``clip``, ``align``) or ``siglip``.
        label_smoothing: for the softmax loss (ALIGN used 0.1).
        optimizer / scheduler: see ``OptimizerConfig`` / ``SchedulerConfig``.
        lock_image / lock_text: freeze a tower LiT-style; the value is how many of its last layer
            groups stay trainable (0 = fully frozen, and run in eval mode: no dropout); ``None`` trains
            the whole tower.
        grad_checkpointing: recompute activations in backward to save memory.
        plugins: training plugins (e.g. from ``dualenc.plugins``): modules with
            ``training_losses(batch, output) -> dict[str, Tensor]`` whose terms (already weighted) are
            added to the loss and logged; their trainable parameters are optimized with the model.
        compile_towers: ``torch.compile`` each tower (in place, so checkpoint keys do not change).
        grad_cache_chunks: gradient cache: embed the batch in this many chunks and recompute each
            chunk's graph in backward, so the contrastive batch can exceed activation memory while
            gradients equal the full batch's. Uses manual optimization: set the clipping value with
            ``grad_cache_clip`` (Lightning's ``gradient_clip_val`` must stay unset).
        grad_cache_clip: gradient-norm clipping under the gradient cache.
        compile_step: ``torch.compile`` the whole forward of the training step (towers, projections,
            the cross-rank gather and the loss) as one graph instead of each tower on its own, so the
            loss and the normalization fuse with the towers' tails. Exclusive with ``compile_towers``.
        compile_mode: ``torch.compile`` mode for ``compile_towers`` / ``compile_step``: ``default``,
            ``reduce-overhead`` (CUDA graphs: needs static shapes, i.e. a fixed batch size and text
            length; the tokenizer pads to ``context_length``, keep ``drop_last``-style full batches) or
            ``max-autotune``.
        fused_loss: compute the contrastive loss in one pass (one logits matrix for both directions on
            a single process, log-sum-exp instead of ``cross_entropy``; ``siglip``: softplus without
            the label matrix). Same value and gradients as the default path.
        image_feature_cache: a folder for a fully locked image tower's features (``lock_image: 0``):
            each distinct input image goes through the tower once, later epochs and runs reuse it
            (``dualenc.featcache``; keyed by the pixels and the tower's weights, so never stale).
            Hits need the same pixels every epoch: ``data.augment: false``.
        text_feature_cache: the same for a fully locked text tower (``lock_text: 0``), keyed by token ids
            and mask: with both caches, a LiT run with both towers locked trains only the projections.
    """

    def __init__(
        self,
        model: DualEncoder,
        loss: str = "contrastive",
        label_smoothing: float = 0.0,
        optimizer: OptimizerConfig | None = None,
        scheduler: SchedulerConfig | None = None,
        lock_image: int | None = None,
        lock_text: int | None = None,
        grad_checkpointing: bool = False,
        plugins: list[nn.Module] | None = None,
        compile_towers: bool = False,
        grad_cache_chunks: int | None = None,
        grad_cache_clip: float | None = None,
        compile_step: bool = False,
        compile_mode: str | None = None,
        fused_loss: bool = False,
        image_feature_cache: str | None = None,
        text_feature_cache: str | None = None,
    ) -> None:
        super().__init__()
        # Modules are not hyperparameters: they must not be pickled into checkpoints.
        self.save_hyperparameters(ignore=["model", "plugins"])
        self.model = model
        self.loss_name = loss
        self.loss_spec = get_loss(loss)
        if self.loss_spec.uses_bias and model.logit_bias is None:
            raise ValueError(f"loss {loss!r} needs a learnable logit bias: set model.init_logit_bias "
                             f"(e.g. {self.loss_spec.init_logit_bias})")
        if label_smoothing and self.loss_spec.uses_bias:
            raise ValueError(f"label_smoothing applies to the softmax loss only; set it to 0 for loss {loss!r}")
        self.label_smoothing = label_smoothing
        self.optim_cfg = optimizer or OptimizerConfig()
        self.sched_cfg = scheduler or SchedulerConfig()
        if self.sched_cfg.decay not in ("cosine", "linear", "constant"):
            raise ValueError(f"scheduler.decay must be cosine, linear or constant, got {self.sched_cfg.decay!r}")
        if lock_image is not None:
            model.image_tower.lock(lock_image)
        if lock_text is not None:
            model.text_tower.lock(lock_text)
        if grad_checkpointing:
            model.image_tower.set_grad_checkpointing(True)
            model.text_tower.set_grad_checkpointing(True)
        self.plugins = nn.ModuleList(plugins or [])
        for p in self.plugins:
            if not callable(getattr(p, "training_losses", None)):
                raise TypeError(f"plugin {type(p).__name__} has no training_losses(batch, output) method")
            if callable(getattr(p, "bind_model", None)):
                p.bind_model(model)  # e.g. image normalization and embedding size for a target model
        if grad_cache_chunks is not None:
            if grad_cache_chunks < 1:
                raise ValueError(f"grad_cache_chunks must be >= 1, got {grad_cache_chunks}")
            if len(self.plugins):
                raise ValueError("grad_cache_chunks cannot be combined with training plugins yet")
            self.automatic_optimization = False
        self.grad_cache_chunks = grad_cache_chunks
        self.grad_cache_clip = grad_cache_clip
        if compile_step and (compile_towers or grad_cache_chunks is not None):
            raise ValueError("compile_step compiles the whole step: it cannot be combined with compile_towers "
                             "or grad_cache_chunks (set only one)")
        if compile_mode not in (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
            raise ValueError(f"compile_mode must be default, reduce-overhead, max-autotune or "
                             f"max-autotune-no-cudagraphs, got {compile_mode!r}")
        if compile_mode is not None and not (compile_towers or compile_step):
            raise ValueError("compile_mode needs compile_towers or compile_step")
        self.compile_step, self.compile_mode, self.fused_loss = compile_step, compile_mode, fused_loss
        self._compiled_step: Any = None  # built on first use (a compiled function does not pickle)
        if compile_towers:
            model.image_tower.compile(mode=compile_mode)
            model.text_tower.compile(mode=compile_mode)
        self._skipped: dict[str, dict[int, dict[str, int]]] = {"train": {}, "val": {}, "test": {}}
        for kind, cache, lock in (("image", image_feature_cache, lock_image), ("text", text_feature_cache, lock_text)):
            if cache is not None and lock != 0:
                raise ValueError(f"{kind}_feature_cache needs a fully locked {kind} tower (lock_{kind}: 0), got "
                                 f"lock_{kind}: {lock}; a trained tower's features change every step")
            if cache is not None and (compile_step or grad_cache_chunks is not None):
                raise ValueError(f"{kind}_feature_cache cannot be combined with compile_step or grad_cache_chunks")
        self.cache_dirs = {"image": image_feature_cache, "text": text_feature_cache}
        self.fully_locked = {"image": lock_image == 0, "text": lock_text == 0}
        self._caches: dict[str, Any] = {}  # built at fit start, from the weights the towers then hold
        self._repeated: int | None = None  # this epoch's samples taken twice (WebDataModule's train loader)

    def forward(self, batch: dict[str, Any]) -> Any:
        return self.model(batch["image"], batch["input_ids"], batch["attention_mask"])

    def contrastive_loss(self, image_features: torch.Tensor, text_features: torch.Tensor,
                         logit_scale: torch.Tensor, logit_bias: torch.Tensor | None) -> torch.Tensor:
        """The configured loss of this rank's rows against the batch gathered from all ranks."""
        all_img, all_txt, offset = gather_features(image_features, text_features)
        kwargs: dict[str, Any] = {"label_smoothing": self.label_smoothing} if not self.loss_spec.uses_bias else {}
        if self.fused_loss:
            kwargs["fused"] = True
        return self.loss_spec.fn(image_features, text_features, logit_scale, logit_bias,
                                 all_image_features=all_img, all_text_features=all_txt, offset=offset, **kwargs)

    def _forward_loss(self, image: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor) -> tuple[torch.Tensor, DualEncoderOutput]:
        out = self.model(image, input_ids, attention_mask)
        return self.contrastive_loss(out.image_features, out.text_features, out.logit_scale, out.logit_bias), out

    def _cached_forward_loss(self, image: torch.Tensor, input_ids: torch.Tensor,
                             attention_mask: torch.Tensor) -> tuple[torch.Tensor, DualEncoderOutput]:
        m = self.model

        def feats(kind: str, tower: nn.Module, proj: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
            if kind not in self._caches:
                return tower(*inputs)
            x = self._caches[kind].features(tower, *inputs)
            return x.to(next(proj.parameters(), x).dtype)  # bf16-true weights take bf16 inputs

        text = m.text_proj(feats("text", m.text_tower, m.text_proj, input_ids, attention_mask))
        out = DualEncoderOutput(m.project_image(feats("image", m.image_tower, m.image_proj, image)),
                                torch.nn.functional.normalize(text, dim=-1), m.scale(), m.logit_bias)
        return self.contrastive_loss(out.image_features, out.text_features, out.logit_scale, out.logit_bias), out

    def on_train_start(self) -> None:
        # A fully locked tower is a fixed feature extractor (LiT): eval mode, so no dropout noise on its features
        # and cached and computed features agree. Lightning restores this mode after each validation.
        for kind, locked in self.fully_locked.items():
            if locked:
                (self.model.image_tower if kind == "image" else self.model.text_tower).eval()

    def on_fit_start(self) -> None:
        from dualenc.featcache import FeatureCache, tower_fingerprint

        for kind, folder in self.cache_dirs.items():
            if folder is not None and kind not in self._caches:
                tower = self.model.image_tower if kind == "image" else self.model.text_tower
                self._caches[kind] = FeatureCache(folder, tower_fingerprint(tower))

    def _step_forward(self, batch: dict[str, Any], train: bool) -> tuple[torch.Tensor, DualEncoderOutput]:
        """Model + loss; under ``compile_step`` one compiled graph (training only: eval stays eager)."""
        args = (batch["image"], batch["input_ids"], batch["attention_mask"])
        if train and self._caches:
            return self._cached_forward_loss(*args)
        if not (self.compile_step and train):
            return self._forward_loss(*args)
        if self._compiled_step is None:
            self._compiled_step = torch.compile(self._forward_loss, mode=self.compile_mode)
        graphs = self.compile_mode in ("reduce-overhead", "max-autotune")
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()  # a new step: earlier graph outputs may be overwritten
        loss, out = self._compiled_step(*args)
        if graphs:  # CUDA-graph outputs live in its pool until the next replay: keep our own copies
            loss = loss.clone()
            out = DualEncoderOutput(out.image_features.clone(), out.text_features.clone(), out.logit_scale.clone(),
                                    None if out.logit_bias is None else out.logit_bias.clone())
        return loss, out

    def _shared_step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        loss, out = self._step_forward(batch, stage == "train")
        bs = batch["image"].shape[0]
        for plugin in self.plugins:
            for name, term in plugin.training_losses(batch, out).items():
                self.log(f"{stage}/{name}", term, batch_size=bs, sync_dist=stage != "train")
                loss = loss + term
        self._log_step(stage, loss, bs)
        self._note_skips(stage, batch)
        return loss

    def _note_skips(self, stage: str, batch: dict[str, Any]) -> None:
        # WebDataModule sums its workers' counts itself ("skipped_split"); other loaders send each
        # worker's cumulative counts. Kept per split: validation never overwrites training's.
        if "skipped_split" in batch:
            self._skipped[stage] = {-1: batch["skipped_split"]}
            if stage == "train" and "repeated_split" in batch:
                self._repeated = int(batch["repeated_split"])
        else:
            self._skipped[stage][batch.get("worker", 0)] = batch.get("skipped", {})

    def _log_step(self, stage: str, loss: torch.Tensor, batch_size: int) -> None:
        # Values are logged as tensors: Lightning reduces them at log time, not with a host sync per step.
        train = stage == "train"
        # Not on the progress bar while training: Lightning turns bar metrics into Python floats after
        # every batch (a host sync per step), even with the bar disabled.
        self.log(f"{stage}/loss", loss, prog_bar=not train, batch_size=batch_size, sync_dist=not train)
        if train:
            scale = self.model.scale().detach()
            self.log("train/temperature", 1.0 / scale, batch_size=batch_size)
            self.log("train/logit_scale", scale, batch_size=batch_size)
            if self.model.logit_bias is not None:
                self.log("train/logit_bias", self.model.logit_bias.detach(), batch_size=batch_size)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self.grad_cache_chunks is None:
            return self._shared_step(batch, "train")
        return self._grad_cache_step(batch)

    def _grad_cache_step(self, batch: dict[str, Any]) -> torch.Tensor:
        opt, sched = self.optimizers(), self.lr_schedulers()
        ddp = getattr(self.trainer.model, "no_sync", None)
        # Several backward passes per step: keep DDP from reducing after each, then average once.
        with ddp() if ddp is not None else contextlib.nullcontext():
            loss = grad_cache_backward(self.model, batch["image"], batch["input_ids"], batch["attention_mask"],
                                       self.grad_cache_chunks, self.contrastive_loss, self.manual_backward)
        _, world = world_info()
        if world > 1:
            for p in self.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad.div_(world)
        if self.grad_cache_clip:
            self.clip_gradients(opt, gradient_clip_val=self.grad_cache_clip, gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        self._log_step("train", loss, batch["image"].shape[0])
        self._note_skips("train", batch)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if batch.get("eval_sets_only"):  # the data module's marker: no test shards, eval sets only
            return None
        return self._shared_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_eval_sets("test")


    def eval_suite(self) -> Any:
        """The eval sets of ``data.eval_sets``, else those of an ``EvalCallback`` (None if neither)."""
        try:
            trainer = self.trainer
        except RuntimeError:  # not attached to a Trainer
            return None
        if trainer is None:
            return None
        make = getattr(trainer.datamodule, "eval_suite", None)
        suite = make() if callable(make) else None
        if suite is None:
            from dualenc.eval.callback import EvalCallback

            suite = next((c.suite for c in trainer.callbacks if isinstance(c, EvalCallback) and c.suite), None)
        return suite

    def _log_eval_sets(self, stage: str) -> None:
        suite = self.eval_suite()
        if suite is None:
            return
        suite.check()
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                metrics = suite.run(self.model, self.device)  # a collective; the same values on every rank
        finally:
            self.model.train(was_training)
        for key, value in metrics.items():
            self.log(f"{stage}/{key}", value)  # every rank has these values: no sync needed

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Normalized embeddings of the batch's images and, when it has captions, of its texts."""
        out: dict[str, Any] = {"key": list(batch.get("key") or []),
                               "image_embeddings": self.model.encode_image(batch["image"])}
        if "input_ids" in batch:
            out["text_embeddings"] = self.model.encode_text(batch["input_ids"], batch["attention_mask"])
        return out

    def on_train_epoch_start(self) -> None:
        self._skipped["train"] = {}
        self._repeated = None

    def on_validation_epoch_start(self) -> None:
        self._skipped["val"] = {}

    def on_train_epoch_end(self) -> None:
        self._log_skips("train", "data/skipped_")
        for kind, cache in self._caches.items():
            self.log(f"train/{kind}_cache_hit_rate", cache.hit_rate())
            cache.hits = cache.misses = 0  # a rate per epoch
            cache.save(self.global_rank)
        if self._repeated is not None:  # re-reads of workers that cycle: not skips, not counted among them
            self.log("data/repeated", float(self._repeated), sync_dist=True, reduce_fx="sum")

    def on_validation_epoch_end(self) -> None:
        self._log_skips("val", "data/val_skipped_")
        # `dualenc validate` reports the eval sets; during fit EvalCallback runs them on its own schedule.
        if self.trainer.state.fn == "validate":
            self._log_eval_sets("val")

    def _log_skips(self, stage: str, prefix: str) -> None:
        """This epoch's skip counts of one split, summed over workers here and over ranks by the log."""
        totals: dict[str, int] = {}
        for counts in self._skipped[stage].values():
            for reason, n in counts.items():
                totals[reason] = totals.get(reason, 0) + n
        reasons = sorted(totals)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every rank must log the same keys (a key only some ranks reduce would hang them).
            every: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(every, reasons)
            reasons = sorted({r for rs in every for r in rs})
        for reason in reasons:
            self.log(f"{prefix}{reason}", float(totals.get(reason, 0)), sync_dist=True, reduce_fx="sum")

    def configure_optimizers(self) -> Any:
        cfg = self.optim_cfg
        no_decay = self.model.no_weight_decay()
        decay, plain = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (plain if name in no_decay else decay).append(p)
        for p in self.plugins.parameters():  # plugin maps (e.g. an orthogonal Q) are not decayed
            if p.requires_grad:
                plain.append(p)
        fused = cfg.fused if cfg.fused is not None else (torch.cuda.is_available() and not cfg.foreach)
        if fused and cfg.foreach:
            raise ValueError("optimizer.fused and optimizer.foreach are exclusive: set one of them")
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": plain, "weight_decay": 0.0}],
            lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None, foreach=cfg.foreach,
        )
        s = self.sched_cfg
        total = s.total_steps or int(self.trainer.estimated_stepping_batches)
        sched = LambdaLR(opt, lambda step: lr_lambda(step, s.warmup_steps, total, s.decay, s.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
