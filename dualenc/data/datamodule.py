"""LightningDataModule over WebDataset shards of image/alt-text pairs (img2dataset layout)."""

from __future__ import annotations

import warnings
from typing import Any, Callable

import lightning as L
import torch
import webdataset as wds

from dualenc.data.decode import SampleDecoder
from dualenc.data.sources import count_samples, expand_urls
from dualenc.data.transforms import Collate, image_transform


class _Apply:
    """Picklable map stage: decode, drop skipped samples, transform the image."""

    def __init__(self, decoder: SampleDecoder, transform: Callable) -> None:
        self.decoder = decoder
        self.transform = transform

    def __call__(self, source):
        for raw in source:
            sample = self.decoder(raw)
            if sample is not None:
                sample["image"] = self.transform(sample["image"])
                yield sample


class WebDataModule(L.LightningDataModule):
    """Reads ``.jpg|.jpeg|.png|.webp`` + ``.txt`` samples from tar shards.

    Image transforms come from the image tower's timm data config and the tokenizer from the text
    tower, taken from the model being trained (or given with ``set_preprocessing``).

    Args:
        train / val: shard specs: paths, ``dir/{00000..00099}.tar``, globs, directories, ``pipe:`` or
            fsspec URLs; ``::`` joins several.
        batch_size: per-device batch size.
        num_workers: loader processes per device.
        epoch_samples: samples per epoch over all ranks; defaults to the shards' ``sizes.json`` counts.
        shuffle_buffer: in-memory sample shuffle (train only); shards are shuffled too.
        caption_key: extension of the caption member.
        crop_scale / hflip / color_jitter: training augmentation (timm's random resized crop).
        seed: shuffling seed.
    """

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        batch_size: int = 256,
        num_workers: int = 4,
        epoch_samples: int | None = None,
        val_samples: int | None = None,
        shuffle_buffer: int = 2000,
        caption_key: str = "txt",
        crop_scale: tuple[float, float] = (0.08, 1.0),
        hflip: float = 0.5,
        color_jitter: float | None = None,
        max_pixels: int = 89_478_485,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.train_spec, self.val_spec = train, val
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.epoch_samples, self.val_samples = epoch_samples, val_samples
        self.shuffle_buffer = shuffle_buffer
        self.caption_key = caption_key
        self.aug = dict(scale=tuple(crop_scale), hflip=hflip, color_jitter=color_jitter)
        self.max_pixels = max_pixels
        self.seed = seed
        self.data_config: dict[str, Any] | None = None
        self.tokenize: Callable | None = None
        # Fail at construction, not hours later, when a pattern matches nothing.
        self.train_urls = expand_urls(train) if train else []
        self.val_urls = expand_urls(val) if val else []

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

    def _loader(self, urls: list[str], train: bool, samples: int | None, name: str) -> wds.WebLoader:
        _, world = self._world()
        if len(urls) < world:
            raise ValueError(f"{name}: {len(urls)} shard(s) cannot feed {world} ranks; every rank needs at "
                             "least one shard (write more, smaller shards)")
        # Each worker reads whole shards, so more workers than shards per rank would sit idle.
        num_workers = min(self.num_workers, len(urls) // world)
        workers = max(1, num_workers)
        samples = samples or count_samples(urls)
        if samples is None:
            raise ValueError(f"{name}: no sizes.json beside the shards to count samples; set "
                             f"data.{'epoch_samples' if train else 'val_samples'}")
        # Every worker of every rank yields exactly this many full batches (cycling its shards if
        # needed), so all ranks take the same number of steps and DDP never waits on a finished rank.
        per_worker = samples // (self.batch_size * world * workers)
        if per_worker == 0:
            raise ValueError(f"{name}: {samples} samples are fewer than one batch of {self.batch_size} per "
                             f"worker on {world} rank(s) x {workers} worker(s); lower batch_size or num_workers")
        decoder = SampleDecoder(caption_key=self.caption_key, max_pixels=self.max_pixels)

        def on_tar_error(exc: Exception) -> bool:
            decoder.skipped["corrupt_tar"] += 1
            return True  # keep going with the next member/shard

        stages: list[Any] = [wds.SimpleShardList(urls)]
        if train:
            stages.append(wds.detshuffle(bufsize=len(urls), initial=len(urls), seed=self.seed))
        stages += [
            wds.split_by_node,
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=on_tar_error, select_files=decoder.wanted),
        ]
        if train:
            stages.append(wds.detshuffle(self.shuffle_buffer, initial=self.shuffle_buffer // 2, seed=self.seed))
        transform = image_transform(self.data_config, train=train, **self.aug)
        stages += [_Apply(decoder, transform),
                   wds.batched(self.batch_size, collation_fn=Collate(self.tokenize, decoder.skipped), partial=False)]
        pipeline = wds.DataPipeline(*stages).repeat().with_epoch(nbatches=per_worker)
        loader = wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers,
                               persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())
        with warnings.catch_warnings():  # it warns that __len__ is informative; ours is exact
            warnings.simplefilter("ignore", UserWarning)
            return loader.with_length(per_worker * workers)

    def train_dataloader(self) -> wds.WebLoader:
        if not self.train_urls:
            raise ValueError("no training shards: set data.train")
        return self._loader(self.train_urls, True, self.epoch_samples, "train")

    def val_dataloader(self) -> wds.WebLoader | list:
        if not self.val_urls:
            return []
        return self._loader(self.val_urls, False, self.val_samples, "val")


def eval_loader(spec: str | list[str], data_config: dict[str, Any], batch_size: int = 256, num_workers: int = 2,
                label_key: str | None = "cls", caption_key: str | None = None,
                tokenize: Callable | None = None) -> wds.WebLoader:
    """One ordered pass over evaluation shards (e.g. CLIP_benchmark layout: ``.jpg`` + ``.cls``)."""
    urls = expand_urls(spec)
    decoder = SampleDecoder(caption_key=caption_key, label_key=label_key)

    def on_tar_error(exc: Exception) -> bool:
        decoder.skipped["corrupt_tar"] += 1
        return True

    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=on_tar_error, select_files=decoder.wanted),
        _Apply(decoder, image_transform(data_config, train=False)),
        wds.batched(batch_size, collation_fn=Collate(tokenize, decoder.skipped), partial=True),
    )
    return wds.WebLoader(pipeline, batch_size=None, num_workers=min(num_workers, len(urls)))
