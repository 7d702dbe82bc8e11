"""A deterministic, resumable stream of training batches from tar shards.

Everything a worker yields is a pure function of (seed, epoch, rank, world size, worker, number of
workers): the shard order, the shard split, the shuffle buffer and the source mixing. A worker counts
the raw samples it has emitted (before decoding, so corrupt samples count too); given that count for
the last batch the trainer consumed, a resumed worker replays its raw stream without decoding and
continues exactly where it stopped: no sample twice, none skipped. Neither webdataset nor open_clip
can resume mid-epoch; this is why the reading loop is ours.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from dualenc.data.tario import iter_samples

Raw = dict[str, Any]


@dataclass
class Source:
    """One data source: shard URLs and its sampling weight when several are mixed."""

    urls: list[str]
    weight: float = 1.0


@dataclass
class StreamState:
    """Where each worker of this rank stopped: raw samples emitted and batches yielded."""

    epoch: int = 0
    positions: dict[int, int] = field(default_factory=dict)
    batches: dict[int, int] = field(default_factory=dict)


def _mix(streams: list[Iterator[Raw]], weights: list[float], rng: random.Random) -> Iterator[Raw]:
    while True:
        yield next(rng.choices(streams, weights)[0])


def _rng(*parts: int | str) -> random.Random:
    # random.Random seeded with a tuple's string is stable across processes and Python versions.
    return random.Random("-".join(map(str, parts)))


class ShardStream(IterableDataset):
    """Yields ``batches_per_worker`` collated batches from each loader worker, every epoch.

    Args:
        sources: shard lists (mixed by weight when there are several).
        decode: raw sample -> decoded sample or None (skip); owns the skip counters.
        transform: image transform applied to decoded samples.
        collate: list of samples -> batch dict.
        batch_size: samples per batch.
        batches_per_worker: exact batches each worker yields per epoch (cycling its shards if needed),
            so every rank takes the same number of steps.
        rank / world_size: this process's place among data-parallel ranks.
        shuffle_buffer: in-memory sample shuffle (0 disables; evaluation).
        resampled: draw shards with replacement (for huge datasets or many ranks) instead of splitting.
        seed: base seed for all shuffling.
    """

    def __init__(self, sources: list[Source], decode: Callable[[Raw], Raw | None], wanted: Callable[[str], bool],
                 skipped: Counter[str], transform: Callable, collate: Callable[[list[Raw]], dict[str, Any]],
                 batch_size: int, batches_per_worker: int, rank: int = 0, world_size: int = 1,
                 shuffle_buffer: int = 0, resampled: bool = False, seed: int = 0) -> None:
        super().__init__()
        self.sources = sources
        self.decode, self.wanted, self.skipped = decode, wanted, skipped
        self.transform, self.collate = transform, collate
        self.batch_size, self.batches_per_worker = batch_size, batches_per_worker
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.resampled, self.seed = shuffle_buffer, resampled, seed
        self.state = StreamState()  # set by the loader before workers start (epoch, resume point)

    # -- raw sample streams --------------------------------------------------------------------
    def _shards(self, source: int, worker: int, workers: int, cycle: int) -> list[str]:
        urls = self.sources[source].urls
        epoch = self.state.epoch
        if self.resampled:
            rng = _rng(self.seed, epoch, source, self.rank, worker, cycle)
            return [rng.choice(urls) for _ in range(max(1, len(urls) // (self.world_size * workers)))]
        order = list(urls)
        if self.shuffle_buffer:
            _rng(self.seed, epoch, source).shuffle(order)  # same permutation on every rank
        mine = order[self.rank :: self.world_size][worker::workers]
        if cycle and self.shuffle_buffer:
            _rng(self.seed, epoch, source, self.rank, worker, cycle).shuffle(mine)
        return mine

    def _source_stream(self, source: int, worker: int, workers: int) -> Iterator[Raw]:
        cycle = 0
        while True:  # cycle through this worker's shards until the epoch's batches are made
            got = 0
            samples = (s for url in self._shards(source, worker, workers, cycle)
                       for s in iter_samples(url, self.wanted, self.skipped))
            # The buffer is flushed at the end of each pass, so one pass ends before the next begins:
            # a sample never appears twice within a pass even when the buffer exceeds the data.
            for sample in self._shuffle(samples, ("shuffle", source, self.rank, worker, cycle)):
                got += 1
                yield sample
            if got == 0:
                raise RuntimeError(f"worker {worker} of rank {self.rank} read no sample from its shards of "
                                   f"source {source}; check that the shards are readable and non-empty")
            cycle += 1

    def _shuffle(self, samples: Iterator[Raw], salt: tuple) -> Iterator[Raw]:
        if not self.shuffle_buffer:
            yield from samples
            return
        rng = _rng(self.seed, self.state.epoch, *salt)
        buf: list[Raw] = []
        for sample in samples:
            if len(buf) < self.shuffle_buffer:
                buf.append(sample)
                continue
            i = rng.randrange(len(buf))
            buf[i], sample = sample, buf[i]
            yield sample
        rng.shuffle(buf)
        yield from buf

    def _raw_stream(self, worker: int, workers: int) -> Iterator[Raw]:
        streams = [self._source_stream(i, worker, workers) for i in range(len(self.sources))]
        if len(streams) == 1:
            return streams[0]
        pick = _rng(self.seed, self.state.epoch, "mix", self.rank, worker)
        return _mix(streams, [s.weight for s in self.sources], pick)

    # -- batches ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        raw = self._raw_stream(worker, workers)
        pos = self.state.positions.get(worker, 0)
        made = self.state.batches.get(worker, 0)
        for _ in range(pos):  # replay to the resume point: read, don't decode
            next(raw)
        batch: list[Raw] = []
        while made < self.batches_per_worker:
            sample = self.decode(next(raw))
            pos += 1
            if sample is None:
                continue
            sample["image"] = self.transform(sample["image"])
            batch.append(sample)
            if len(batch) == self.batch_size:
                made += 1
                out = self.collate(batch)
                out["stream"] = torch.tensor([self.state.epoch, worker, pos, made])
                yield out
                batch = []
