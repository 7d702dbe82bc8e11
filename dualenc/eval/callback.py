"""Lightning callback: zero-shot, retrieval, linear-probe and kNN evaluation during training, DDP-aware."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch

from dualenc.eval.report import result_record, write_json_atomic
from dualenc.eval.retrieval import DEFAULT_IMAGE_CHUNK, DEFAULT_TEXT_CHUNK
from dualenc.eval.suite import EvalSuite


class EvalCallback(L.Callback):
    """Runs :class:`~dualenc.eval.suite.EvalSuite` every N epochs and/or steps and logs its metrics.

    Metrics are written to the trainer's loggers as ``{prefix}/{set name}/{metric}`` (e.g.
    ``eval/heldout/top1``) at ``step=trainer.global_step``, and put into ``trainer.callback_metrics``
    on every rank with the same values, so they can be monitored (checkpointing, early stopping).

    The sets are normally configured as data (``data.eval_sets``, see ``dualenc.data.evalsets``), so
    a config overrides them without restating ``trainer.callbacks``; the callback then takes them from
    the data module when fit starts. Sets given to the callback itself take precedence. Without sets
    anywhere the callback does nothing.

    Args:
        zeroshot: dicts ``{name, data, classnames?, templates?, format?, split?}`` (see ``ZeroShotSet``).
        retrieval: dicts ``{name, data, caption_key?, ks?, ties?, split?}`` (see ``RetrievalSet``).
        linear_probe / knn: dicts ``{name, data, ...}`` of CLIP_benchmark roots with train and test splits
            (see ``dualenc.eval.imagesets``).
        every_n_epochs: evaluate at the end of every N-th training epoch (None: never).
        every_n_steps: evaluate after every N-th optimizer step (None: never).
        batch_size / num_workers: per rank, for the evaluation data.
        prefix: metric name prefix.
        results_dir: if set, rank 0 writes ``eval-step{global_step}.json`` there (CLIP_benchmark-like records).
        verbose: rank 0 also prints one line per evaluation (top-1 per zero-shot set, R@1 per retrieval set).
    """

    def __init__(self, zeroshot: list[dict[str, Any]] | None = None, retrieval: list[dict[str, Any]] | None = None,
                 every_n_epochs: int | None = 1, every_n_steps: int | None = None, batch_size: int = 256,
                 num_workers: int = 2, prefix: str = "eval", results_dir: str | None = None,
                 image_chunk: int = DEFAULT_IMAGE_CHUNK, text_chunk: int = DEFAULT_TEXT_CHUNK,
                 verbose: bool = True, linear_probe: list[dict[str, Any]] | None = None,
                 knn: list[dict[str, Any]] | None = None) -> None:
        for what, n in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            if n is not None and n < 1:
                raise ValueError(f"{what} must be >= 1 or None, got {n}")
        if every_n_epochs is None and every_n_steps is None:
            raise ValueError("set every_n_epochs and/or every_n_steps, or the callback never runs")
        self.suite: EvalSuite | None = (EvalSuite(zeroshot, retrieval, batch_size, num_workers, image_chunk, text_chunk,
                                                  linear_probe, knn)
                                        if zeroshot or retrieval or linear_probe or knn else None)
        self.every_n_epochs, self.every_n_steps = every_n_epochs, every_n_steps
        self.prefix = prefix
        self.results_dir = results_dir
        self.verbose = verbose
        self.last_metrics: dict[str, float] = {}
        self._last_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Sets are read here, not in __init__, so a config may name eval data that does not exist yet
        # when it is parsed; a missing or bad set still stops fit before the first step.
        if self.suite is None:
            make = getattr(trainer.datamodule, "eval_suite", None)
            self.suite = make() if callable(make) else None
        if self.suite is not None:
            self.suite.check()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.evaluate(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Run every set now and log the metrics (all ranks must call this together); returns them as logged."""
        # Gradient accumulation repeats a global step over several batches; evaluate it once.
        if self.suite is None or trainer.sanity_checking or trainer.global_step == self._last_step:
            return self.last_metrics
        self._last_step = trainer.global_step
        model = getattr(pl_module, "model", pl_module)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                metrics = self.suite.run(model, pl_module.device)
        finally:
            model.train(was_training)
        metrics = {f"{self.prefix}/{k}": v for k, v in metrics.items()}
        # Straight to the loggers, once: values logged with pl_module.log from a batch hook would be
        # re-logged at every later step of the epoch. callback_metrics (identical on every rank) makes
        # them available to ModelCheckpoint / EarlyStopping monitors.
        for key, value in metrics.items():
            trainer.callback_metrics[key] = torch.tensor(value)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            if self.verbose:
                headline = [f"{k.removeprefix(self.prefix + '/')} {v:.3f}" for k, v in metrics.items()
                            if k.endswith(("/top1", "/image_retrieval_recall@1", "/text_retrieval_recall@1",
                                           "/knn_top1@1"))]
                print(f"{self.prefix} at step {trainer.global_step}: {', '.join(headline)}", flush=True)
        self.last_metrics = metrics
        if self.results_dir and trainer.is_global_zero:
            model_name = f"{type(pl_module).__name__}@step{trainer.global_step}"
            records = [result_record(r["dataset"], model_name, r["task"], r["metrics"], r.get("details"),
                                     data=r["data"])
                       for r in self.suite.records]
            path = Path(self.results_dir) / f"eval-step{trainer.global_step:08d}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, records)
        return metrics
