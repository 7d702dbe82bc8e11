"""LightningDataModule over WebDataset-format shards of image/alt-text pairs (img2dataset layout)."""

from __future__ import annotations

import random
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dualenc.data.decode import SampleDecoder
from dualenc.data.evalsets import EvalSets, as_eval_sets
from dualenc.data.gpu_decode import byte_preprocessing, decode_batch
from dualenc.data.plan import PLAN_WARN, EpochPlan
from dualenc.data.sources import expand_urls, shard_counts, usable_counts
from dualenc.data.stream import ORDER, ShardStream, Source, StreamState
from dualenc.data.tario import iter_samples
from dualenc.data.transforms import Collate, draft_min_side, image_transform, normalize_uint8
from dualenc.errors import ConfigError


@dataclass
class SourceSpec:
    """One entry of a weighted mixture of datasets."""

    shards: str  # paths, brace patterns, globs, directories, pipe: or fsspec URLs; '::' joins several
    weight: float = 1.0


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


class StreamLoader(DataLoader):
    """DataLoader that hands the current epoch and any resume point to its stream before workers start.

    Workers are not persistent: each epoch pickles the stream afresh with its new state. Implements
    Lightning's loader ``state_dict``/``load_state_dict`` protocol: the state is what the training
    loop has consumed (recorded by ``WebDataModule.on_before_batch_transfer``, not what workers
    prefetched), each worker's skip counts, and the random state of the process (dropout), which
    is put back when the first resumed batch arrives, so a resumed run equals an uninterrupted one.
    """

    def __init__(self, stream: ShardStream, num_workers: int, epoch_fn: Callable[[], int]) -> None:
        super().__init__(stream, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                         prefetch_factor=4 if num_workers else None)
        self.stream = stream
        self.epoch_fn = epoch_fn
        self.resume: StreamState | None = None
        self._length = stream.batches_per_worker * max(1, num_workers)
        self.consumed: dict[int, tuple[int, int, dict[str, int]]] = {}
        self.repeated: dict[int, int] = {}  # per worker: samples taken again from a later pass this epoch
        self.consumed_epoch = -1
        self.next_worker = 0  # the worker whose batch the loop takes next (DataLoader's round-robin)
        self._rng_to_restore: dict[str, Any] | None = None

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.epoch_fn()
        resume, self.resume = self.resume, None
        if resume is not None and resume.epoch == epoch:
            self.stream.state = resume
            self.consumed = {w: (resume.positions[w], resume.batches.get(w, 0), dict(resume.skipped.get(w, {})))
                             for w in resume.positions}
            self.next_worker, self.repeated = resume.first, dict(resume.repeated)
        else:
            self.stream.state = StreamState(epoch=epoch)
            self.consumed, self.next_worker, self.repeated = {}, 0, {}
            if resume is not None and resume.epoch < epoch and self._rng_to_restore is not None:
                # A checkpoint of a finished epoch: the uninterrupted run went from it straight into this
                # epoch's iterator, which draws the workers' base seed from torch's RNG: restore it first.
                _set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        self.consumed_epoch = epoch
        return super().__iter__()

    def note_consumed(self, batch: dict[str, Any]) -> dict[str, int]:
        """Record a batch the loop is about to use; returns this split's skip counts so far (all workers)."""
        epoch, worker, pos, made = (int(x) for x in batch["stream"])
        if epoch != self.consumed_epoch:
            self.consumed, self.consumed_epoch, self.repeated = {}, epoch, {}
        self.consumed[worker] = (pos, made, dict(batch.get("skipped", {})))
        self.repeated[worker] = int(batch.get("repeated", 0))
        self.next_worker = (worker + 1) % max(1, self.num_workers)
        if self._rng_to_restore is not None:
            _set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        total: Counter[str] = Counter()
        for _, _, skipped in self.consumed.values():
            total.update(skipped)
        return dict(total)

    def state_dict(self) -> dict[str, Any]:
        local = {"epoch": self.consumed_epoch,
                 "positions": {w: p for w, (p, _, _) in self.consumed.items()},
                 "batches": {w: m for w, (_, m, _) in self.consumed.items()},
                 "skipped": {w: s for w, (_, _, s) in self.consumed.items()},
                 "next_worker": self.next_worker, "repeated": dict(self.repeated), "rng": _rng_state()}
        ranks = [local]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Checkpoints are written by rank 0 but every rank's position is needed to resume;
            # Lightning builds the checkpoint on every rank, so this collective is safe here.
            ranks = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, local)
        return {"ranks": ranks, "num_workers": self.num_workers, "order": ORDER}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.resume = self.resume_state(state)

    def resume_state(self, state: dict[str, Any] | None) -> StreamState | None:
        """This rank's resume point in ``state``, or None (with a warning if the layout changed)."""
        if not state:
            return None
        rank, world = self.stream.rank, self.stream.world_size
        if len(state["ranks"]) != world or state["num_workers"] != self.num_workers:
            warnings.warn(f"resuming with {world} rank(s) x {self.num_workers} worker(s), the checkpoint had "
                          f"{len(state['ranks'])} x {state['num_workers']}: the interrupted epoch's data restarts "
                          "from its beginning", stacklevel=2)
            return None
        if state.get("order", 1) != ORDER:
            warnings.warn(f"the checkpoint's loader state is of data order {state.get('order', 1)}, this dualenc "
                          f"shuffles in order {ORDER}: the interrupted epoch's data restarts from its beginning "
                          "(resuming it mid-epoch would repeat and skip samples)", stacklevel=2)
            return None
        mine = state["ranks"][rank]
        if mine["epoch"] < 0:
            return None
        self._rng_to_restore = mine.get("rng")
        batches = {int(k): v for k, v in mine["batches"].items()}
        # Older checkpoints lack next_worker: the round-robin from worker 0 asks worker (batches taken) mod W.
        first = mine.get("next_worker", sum(batches.values()) % max(1, self.num_workers))
        return StreamState(epoch=mine["epoch"], positions={int(k): v for k, v in mine["positions"].items()},
                           batches=batches, skipped={int(k): dict(v) for k, v in mine.get("skipped", {}).items()},
                           first=int(first), repeated={int(k): v for k, v in mine.get("repeated", {}).items()})


class WebDataModule(L.LightningDataModule):
    """Reads ``.jpg|.jpeg|.png|.webp`` + caption samples from tar shards; resumes exactly mid-epoch.

    Image transforms come from the image tower's timm data config and the tokenizer from the text
    tower, taken from the model being trained (or given with ``set_preprocessing``).

    Args:
        train: shard spec (paths, ``dir/{00000..00099}.tar``, globs, directories, ``pipe:`` or fsspec
            URLs; ``::`` joins several) or a list of ``{shards, weight}`` sources mixed by weight.
        val: shard spec for validation.
        batch_size: per-device batch size.
        num_workers: loader processes per device.
        epoch_samples: samples per epoch over all ranks; defaults to the shards' ``sizes.json`` (or
            img2dataset ``*_stats.json``) counts.
        shuffle_buffer: in-memory sample shuffle (train only); shard order is shuffled too. Seeded by
            (seed, epoch, rank, worker).
        resampled: draw shards with replacement instead of splitting them over ranks and workers.
        caption_key: extension of the caption member (``txt``), or ``json`` with ``caption_field``.
        caption_field: field of the JSON member holding the caption.
        crop_scale / hflip / color_jitter: training augmentation (timm's random resized crop).
        augment: ``false`` gives training images the evaluation transform (resize + center crop): the
            same pixels every epoch, which a locked tower's feature cache needs to hit
            (``model.image_feature_cache``).
        uint8_images: workers send uint8 images; they become float and are normalized with the
            tower's mean/std on the device, in ``on_after_batch_transfer`` (a quarter of the bytes
            between processes and to the GPU, and no float work in the workers). Off: float
            normalized images from the workers, as ``eval_loader`` gives.
        jpeg_draft: decode large JPEGs at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling) when the
            transform still gets its full output resolution (``transforms.draft_min_side``): for
            validation the resize target, for training the smallest crop of ``draft_crop_scale``.
        draft_crop_scale: the smallest crop fraction (of the image area) that must keep full
            resolution when drafting training images; default ``crop_scale[0]``, which never gives
            the model fewer source pixels than a full decode. Larger values (e.g. 0.25, 1.0) decode
            faster, and crops smaller than that are upsampled from the reduced image.
        interpolation: resize filter instead of the tower's data config's (``bilinear`` is cheaper
            than ``bicubic``; a pretrained tower was trained with its own).
        max_pixels: larger images are skipped (decompression bombs).
        gpu_decode: training workers only read bytes and draw crop parameters; JPEG decode (nvJPEG),
            random resized crop, resize and flip run on the device (``dualenc.data.gpu_decode``).
        seed: shuffling seed.
        test / test_samples: shards (and their sample count) whose contrastive loss ``dualenc test``
            reports as ``test/loss``, beside the eval sets.
        predict: shards ``dualenc predict`` embeds (images, and captions when present), in order.
        eval_sets: zero-shot, retrieval, linear-probe and kNN sets (``{zeroshot: [{name, data, ...}],
            retrieval: [...], linear_probe: [...], knn: [...]}``):
            run by ``EvalCallback`` during fit and reported by ``dualenc validate`` and ``dualenc test``.
            Their paths are checked when the config is loaded.
    """

    def __init__(
        self,
        train: str | list[SourceSpec] | None = None,
        val: str | None = None,
        batch_size: int = 256,
        num_workers: int = 4,
        epoch_samples: int | None = None,
        val_samples: int | None = None,
        shuffle_buffer: int = 2000,
        resampled: bool = False,
        caption_key: str = "txt",
        caption_field: str | None = None,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        hflip: float = 0.5,
        color_jitter: float | None = None,
        augment: bool = True,
        max_pixels: int = 89_478_485,
        seed: int = 0,
        uint8_images: bool = True,
        jpeg_draft: bool = True,
        draft_crop_scale: float | None = None,
        interpolation: str | None = None,
        test: str | None = None,
        test_samples: int | None = None,
        predict: str | None = None,
        eval_sets: EvalSets | None = None,
        gpu_decode: bool = False,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.epoch_samples, self.val_samples = epoch_samples, val_samples
        self.shuffle_buffer, self.resampled = shuffle_buffer, resampled
        self.decoder_args = dict(caption_key=caption_key, caption_field=caption_field, max_pixels=max_pixels)
        self.aug = dict(scale=tuple(crop_scale), hflip=hflip, color_jitter=color_jitter)
        self.augment = augment
        if gpu_decode and not augment:
            raise ValueError("augment: false is not supported with gpu_decode yet; decode on the CPU workers")
        self.seed = seed
        self.uint8_images, self.jpeg_draft, self.interpolation = uint8_images, jpeg_draft, interpolation
        if draft_crop_scale is not None and not 0 < draft_crop_scale <= 1:
            raise ValueError(f"draft_crop_scale must be in (0, 1], got {draft_crop_scale}")
        self.draft_crop_scale = draft_crop_scale
        self.gpu_decode = gpu_decode
        self._gpu_crop: Any = None  # the crop spec (size, filter) of the GPU decode path, once built
        self.data_config: dict[str, Any] | None = None
        self.tokenize: Callable | None = None
        # Fail at construction, not hours later, when a pattern matches nothing.
        specs = [SourceSpec(train)] if isinstance(train, str) else [SourceSpec(**s) if isinstance(s, dict) else s
                                                                     for s in (train or [])]
        self.train_sources = [_source(s.shards, s.weight) for s in specs]
        self.val_sources = [_source(val)] if val else []
        self.test_sources = [_source(test)] if test else []
        self.test_samples, self.predict_spec = test_samples, predict
        if predict:
            expand_urls(predict)
        self.eval_sets = as_eval_sets(eval_sets)
        if self.eval_sets:
            self.eval_sets.check_paths()
        self._resume: dict[str, Any] | None = None  # from a checkpoint of an older version
        self._train_loader: StreamLoader | None = None
        self._val_loader: StreamLoader | None = None

    def set_preprocessing(self, data_config: dict[str, Any], tokenize: Callable | None) -> None:
        self.data_config, self.tokenize = data_config, tokenize

    def setup(self, stage: str) -> None:
        if self.data_config is None:
            model = getattr(getattr(self.trainer, "lightning_module", None), "model", None)
            if model is None:
                raise RuntimeError("WebDataModule needs the model's preprocessing: run it under a Trainer "
                                   "with a DualEncoderModule, or call set_preprocessing(...) first")
            self.set_preprocessing(model.image_tower.data_config, model.text_tower.tokenizer_fn())

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _epoch(self) -> int:
        """The epoch a loader iterated now serves. Resuming from a checkpoint of a finished epoch, Lightning
        creates the train iterator (and fetches its first batch) before it counts that epoch completed, so
        ``current_epoch`` still names it then; the epochs it has processed already name the next."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0
        progress = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_progress", None), "current", None)
        return max(int(trainer.current_epoch), int(getattr(progress, "processed", 0)))

    def _loader(self, sources: list, train: bool, samples: int | None, name: str) -> StreamLoader:
        rank, world = self._world()
        # Shards go to (rank, worker) slots by their sample counts; with fewer shards than slots the
        # slots share shards sample by sample (stream.split_shards), so no worker or rank sits idle.
        num_workers = self.num_workers
        workers = max(1, num_workers)
        counts = [c for s in sources for c in (s.counts or [None])]
        slots = None if None in counts else sum(counts)  # type: ignore[arg-type]
        usable = [c for s in sources for c in (s.usable or [None])]
        usable_total = None if None in usable else sum(usable)  # type: ignore[arg-type]
        known = usable_total if usable_total is not None else slots
        covers = samples is None or (known is not None and samples >= known)
        counted = ("epoch_samples" if samples is not None else
                   "usable.json" if usable_total is not None else "sizes.json")
        if samples is None:  # usable.json (what decodes) when `dualenc-data stats` wrote it, else the slots
            samples = known
        if samples is None:
            raise ConfigError(f"{name}: no sizes.json or *_stats.json beside the shards to count samples; set "
                              f"--data.{'epoch_samples' if train else name + '_samples'} (or run dualenc-data stats "
                              "on them, which writes sizes.json)")
        # Every worker of every rank yields exactly this many full batches (cycling its shards if
        # needed), so all ranks take the same number of steps and DDP never waits on a finished rank.
        per_worker = samples // (self.batch_size * world * workers)
        if per_worker == 0:
            raise ConfigError(f"{name}: {samples} samples are fewer than one batch of {self.batch_size} per "
                              f"worker on {world} rank(s) x {workers} worker(s); lower --data.batch_size or "
                              "--data.num_workers")
        decoder, transform = self.preprocessing(train)
        collate = Collate(self.tokenize, decoder.skipped)
        if train and self.gpu_decode:
            decoder, transform, collate = byte_preprocessing(self.data_config, self.decoder_args, self.aug,
                                                             self.interpolation, self.tokenize)
            self._gpu_crop = transform
        stream = ShardStream(
            sources, decoder, decoder.wanted, decoder.skipped, transform,
            collate, self.batch_size, per_worker, rank, world,
            shuffle_buffer=self.shuffle_buffer if train else 0, resampled=self.resampled and train, seed=self.seed,
            index_shards=train, split=name)
        stream.finish_pass = train and covers
        if train:
            plan = EpochPlan.of(sources, samples, self.batch_size, world, workers, per_worker, counted)
            rank_zero_info(plan.text())
            if plan.waste() > PLAN_WARN:
                rank_zero_warn(plan.warning())
        return StreamLoader(stream, num_workers, self._epoch)

    def preprocessing(self, train: bool) -> tuple[SampleDecoder, Callable]:
        """The per-sample decoder and image transform the workers run."""
        if self.data_config is None:
            raise RuntimeError("call set_preprocessing(...) or run under a Trainer first")
        min_side = None
        train = train and self.augment
        if self.jpeg_draft:
            crop = self.draft_crop_scale if self.draft_crop_scale is not None else self.aug["scale"][0]
            min_side = draft_min_side(self.data_config, train, (crop, 1.0))
        decoder = SampleDecoder(**self.decoder_args, draft_min_side=min_side)
        transform = image_transform(self.data_config, train=train, **self.aug, interpolation=self.interpolation,
                                    uint8=self.uint8_images)
        return decoder, transform

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """uint8 images (``uint8_images``) -> float, normalized with the tower's mean/std, on the device."""
        if isinstance(batch, dict) and "jpeg" in batch:  # gpu_decode: encoded images -> uint8 on the device
            device = batch["input_ids"].device if "input_ids" in batch else self.trainer.strategy.root_device
            crop = self._gpu_crop
            batch["image"] = decode_batch(batch.pop("jpeg"), batch.pop("crop"), crop.size, crop.interpolation,
                                          device, batch.pop("jpeg_is_jpeg"))
        image = batch.get("image") if isinstance(batch, dict) else None
        if isinstance(image, torch.Tensor) and image.dtype == torch.uint8:
            batch["image"] = normalize_uint8(image, self.data_config["mean"], self.data_config["std"])
        return batch

    def train_dataloader(self) -> StreamLoader:
        if not self.train_sources:
            raise ConfigError("no training shards: set --data.train")
        loader = self._loader(self.train_sources, True, self.epoch_samples, "train")
        state, self._resume = self._resume, None
        loader.resume = loader.resume_state(state)  # Lightning's loader state, if any, comes after this
        self._train_loader = loader
        return loader

    def val_dataloader(self) -> StreamLoader | list:
        if not self.val_sources:
            return []
        self._val_loader = self._loader(self.val_sources, False, self.val_samples, "val")
        return self._val_loader

    def test_dataloader(self) -> StreamLoader | DataLoader:
        if self.test_sources:
            return self._loader(self.test_sources, False, self.test_samples, "test")
        module = getattr(getattr(self, "trainer", None), "lightning_module", None)
        if getattr(module, "eval_suite", lambda: None)() is None:
            raise ConfigError("nothing to test: set --data.eval_sets (zero-shot / retrieval sets) and/or "
                              "--data.test (shards whose loss is reported)")
        # Lightning runs the test hooks only with at least one batch; without test shards the eval sets
        # (read by the suite in DualEncoderModule.on_test_epoch_end) are the whole test, so one empty
        # marker batch per rank lets the loop reach that hook.
        return DataLoader([{"eval_sets_only": True}], batch_size=None)

    def predict_dataloader(self) -> DataLoader:
        if not self.predict_spec:
            raise ConfigError("nothing to predict: set --data.predict to the shards to embed")
        rank, world = self._world()
        urls = expand_urls(self.predict_spec)[rank::world]  # whole shards per rank, each in order
        if not urls:
            raise ConfigError(f"data.predict has {len(expand_urls(self.predict_spec))} shard(s) for {world} ranks; "
                              "give at least one shard per rank")
        if self.data_config is None:
            raise RuntimeError("call set_preprocessing(...) or run under a Trainer first")
        return eval_loader(urls, self.data_config, self.batch_size, self.num_workers, label_key=None,
                           caption_key=self.decoder_args["caption_key"], tokenize=self.tokenize)

    def eval_suite(self) -> Any:
        """The ``EvalSuite`` of ``eval_sets`` (None without sets)."""
        if not self.eval_sets:
            return None
        from dualenc.eval.suite import EvalSuite  # lazy: dualenc.eval imports this module

        return EvalSuite(batch_size=self.eval_sets.batch_size, num_workers=self.eval_sets.num_workers,
                         **self.eval_sets.set_kwargs())

    # -- exact resume and skip counts --------------------------------------------------------------------------
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = getattr(self, "trainer", None)
        if isinstance(batch, dict) and "stream" in batch and trainer is not None:
            loader = self._train_loader if trainer.training else self._val_loader
            if loader is not None:
                # This split's skip counts over all workers of this rank, as consumed; the module logs them.
                batch["skipped_split"] = loader.note_consumed(batch)
                batch["repeated_split"] = sum(loader.repeated.values())
        return batch

    def state_dict(self) -> dict[str, Any]:
        # The resume point is the train loader's state (Lightning's loader protocol); it is kept here too
        # because Lightning hands it to the loader only when it restarts mid-epoch, not from a checkpoint
        # of a finished epoch, whose random state (dropout) a resumed run needs as well.
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = state.get("train_loader", state) or None  # checkpoints of older versions kept it at the top


def _source(spec: str, weight: float = 1.0) -> Source:
    urls = expand_urls(spec)
    return Source(urls, weight, shard_counts(urls), usable_counts(urls))


class _EvalStream(IterableDataset):
    """One ordered pass over evaluation shards, split by worker; the last batch may be partial."""

    def __init__(self, urls: list[str], decoder: SampleDecoder, transform: Callable, collate: Callable,
                 batch_size: int) -> None:
        self.urls, self.decoder, self.transform, self.collate, self.batch_size = urls, decoder, transform, collate, batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        batch = []
        for url in self.urls[worker::workers]:
            for raw in iter_samples(url, self.decoder.wanted, self.decoder.skipped):
                sample = self.decoder(raw)
                if sample is None:
                    continue
                sample["image"] = self.transform(sample["image"])
                batch.append(sample)
                if len(batch) == self.batch_size:
                    yield self.collate(batch)
                    batch = []
        if batch:
            yield self.collate(batch)


def eval_loader(spec: str | list[str], data_config: dict[str, Any], batch_size: int = 256, num_workers: int = 2,
                label_key: str | None = "cls", caption_key: str | None = None,
                tokenize: Callable | None = None) -> DataLoader:
    """One pass over evaluation shards (e.g. CLIP_benchmark layout: ``.jpg`` + ``.cls``)."""
    urls = expand_urls(spec)
    decoder = SampleDecoder(caption_key=caption_key, label_key=label_key)
    stream = _EvalStream(urls, decoder, image_transform(data_config, train=False),
                         Collate(tokenize, decoder.skipped), batch_size)
    return DataLoader(stream, batch_size=None, num_workers=min(num_workers, len(urls)))


__all__ = ["SourceSpec", "StreamLoader", "WebDataModule", "eval_loader"]
