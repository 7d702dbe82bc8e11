"""A deterministic, resumable stream of training batches from tar shards.

Everything a worker yields is a pure function of (seed, epoch, rank, world size, worker, number of
workers) and the shards' sample counts: the shard order, the shard split, the shuffle buffer, the
source mixing and the augmentation of each sample. A worker counts the raw slots it has emitted
(before decoding, so corrupt samples count too); given that count for the last batch the trainer
consumed, a resumed worker replays the shuffle on (shard, index) tokens from the counts alone, then
reads only the samples the shuffle buffer still holds (seeking past the others) and goes on exactly
where it stopped: no sample twice, none skipped, the same augmentation. Neither webdataset nor
open_clip can resume mid-epoch; this is why the reading loop is ours.

Shards are split over (rank, worker) slots by their sample counts; empty shards are skipped (and
counted once per epoch); with fewer non-empty shards than slots, slots share a shard by taking every
k-th sample. Every worker yields the same number of batches, cycling its samples if it runs out.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from dualenc.data.tario import count_slots, iter_slots

Raw = dict[str, Any]
Token = tuple  # (source, cycle, part, index); part -1 marks an empty shard


@dataclass
class Source:
    """One data source: shard URLs, their sample counts if known, and its weight when mixed."""

    urls: list[str]
    weight: float = 1.0
    counts: list[int | None] | None = None


@dataclass
class StreamState:
    """Where each worker of this rank stopped: raw slots emitted, batches yielded, skips counted."""

    epoch: int = 0
    positions: dict[int, int] = field(default_factory=dict)
    batches: dict[int, int] = field(default_factory=dict)
    skipped: dict[int, dict[str, int]] = field(default_factory=dict)


@dataclass
class Part:
    """Indices ``phase, phase + stride, ...`` of one shard's slots."""

    url: str
    count: int | None
    stride: int = 1
    phase: int = 0


def _rng(*parts: int | str) -> random.Random:
    # random.Random seeded with a tuple's string is stable across processes and Python versions.
    return random.Random("-".join(map(str, parts)))


def sample_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 over them): cheap enough to run per sample."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x >> 1


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Python's and torch's CPU RNG seeded for one sample's augmentation, then put back as they were,
    so augmentation never depends on (or disturbs) what ran before it, dropout included."""
    py, th = random.getstate(), torch.default_generator.get_state()
    random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        torch.default_generator.set_state(th)


def split_shards(urls: list[str], counts: list[int | None], slots: int) -> tuple[list[list[Part]], list[list[str]]]:
    """Each slot's parts and the empty shards it reports, from the shards' counts (None: unknown).

    A shard larger than a slot's share (all samples / slots) is cut into ``k`` interleaved pieces
    (every k-th sample), so a few big shards or fewer shards than slots still feed every slot; the
    pieces then go to the least loaded slot, largest first (unknown counts weigh as the mean known
    count). Each slot keeps its pieces in the given shard order.
    """
    known = [c for c in counts if c]
    mean = sum(known) / len(known) if known else 1.0
    empty: list[list[str]] = [[] for _ in range(slots)]
    for k, u in enumerate(u for u, c in zip(urls, counts) if c == 0):
        empty[k % slots].append(u)
    live = [(i, c if c is not None else mean) for i, c in enumerate(counts) if c != 0]
    parts: list[list[Part]] = [[] for _ in range(slots)]
    if not live:
        return parts, empty
    share = sum(w for _, w in live) / slots
    cuts = {}
    for i, w in live:
        cuts[i] = max(1, round(w / share))
        if counts[i] is not None:
            cuts[i] = min(cuts[i], counts[i])
    while sum(cuts.values()) < slots:  # every slot needs a piece: cut the largest pieces further
        cand = [(w / cuts[i], i) for i, w in live if counts[i] is None or cuts[i] < counts[i]]
        if not cand:
            break
        cuts[max(cand)[1]] += 1
    pieces = [(w / cuts[i], i, cuts[i], p) for i, w in live for p in range(cuts[i])]  # (weight, shard, k, phase)
    heap = [(0.0, s) for s in range(slots)]
    mine: list[list[tuple[int, int, int]]] = [[] for _ in range(slots)]
    for w, i, k, p in sorted(pieces, key=lambda x: (-x[0], x[1], x[3])):
        load, s = heapq.heappop(heap)
        mine[s].append((i, k, p))
        heapq.heappush(heap, (load + w, s))
    for s in range(slots):
        parts[s] = [Part(urls[i], counts[i], k, p) for i, k, p in sorted(mine[s])]
    return parts, empty


class _Shuffle:
    """Buffered shuffle over one pass; ``buf`` is exactly what it holds, for a resume to read back."""

    def __init__(self, items: Iterator[Token], size: int, rng: random.Random) -> None:
        self.items, self.size, self.rng = items, size, rng
        self.buf: list[Token] = []

    def __iter__(self) -> Iterator[Token]:
        buf, rand = self.buf, self.rng.random
        for item in self.items:
            if len(buf) < self.size:
                buf.append(item)
                continue
            i = int(rand() * len(buf))
            buf[i], item = item, buf[i]
            yield item
        self.rng.shuffle(buf)
        while buf:
            yield buf.pop()


@dataclass
class _Ctx:
    """One source's reading state in a worker: live reading or replay, and slots read ahead."""

    live: bool = True
    store: dict[Token, Raw] = field(default_factory=dict)
    needed: set[Token] = field(default_factory=set)
    parts: list[Part] = field(default_factory=list)
    part: tuple[int, int] = (0, -1)  # (cycle, part) being generated
    shuffle: _Shuffle | None = None


class ShardStream(IterableDataset):
    """Yields ``batches_per_worker`` collated batches from each loader worker, every epoch.

    Args:
        sources: shard lists (mixed by weight when there are several), with counts where known.
        decode: raw sample -> decoded sample or None (skip); counts its skips into ``skipped``.
        wanted: which tar members to read.
        skipped: the skip counter shared with ``decode`` and ``collate`` (per epoch, per worker).
        transform: image transform applied to decoded samples, seeded per sample.
        collate: list of samples -> batch dict.
        batch_size: samples per batch.
        batches_per_worker: exact batches each worker yields per epoch (cycling its shards if needed),
            so every rank takes the same number of steps.
        rank / world_size: this process's place among data-parallel ranks.
        shuffle_buffer: in-memory sample shuffle (0 disables; evaluation).
        resampled: draw shards with replacement (for huge datasets or many ranks) instead of splitting.
        seed: base seed for all shuffling and augmentation.
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
        self.replay_reads = False  # benchmarks only: replay by reading every byte, as before counts
        self._scanned: dict[str, int] = {}

    # -- which shards a worker reads -----------------------------------------------------------
    def _counts(self, source: int) -> list[int | None]:
        src = self.sources[source]
        return list(src.counts) if src.counts is not None else [None] * len(src.urls)

    def _count(self, part: Part) -> int:
        if part.count is not None:
            return part.count
        if part.url not in self._scanned:
            self._scanned[part.url] = count_slots(part.url)
        return self._scanned[part.url]

    def plan(self, source: int, worker: int, workers: int, cycle: int,
             scan: bool = False) -> tuple[list[Part], list[str]]:
        """This worker's parts for one pass, and the empty shards it reports (first pass only)."""
        urls, counts = list(self.sources[source].urls), self._counts(source)
        if scan:
            counts = [self._count(Part(u, c)) for u, c in zip(urls, counts)]
        epoch = self.state.epoch
        if self.resampled:
            live = [u for u, c in zip(urls, counts) if c != 0] or urls
            rng = _rng(self.seed, epoch, source, self.rank, worker, cycle)
            count = dict(zip(urls, counts))
            n = max(1, len(urls) // (self.world_size * workers))
            return [Part(u, count[u]) for u in (rng.choice(live) for _ in range(n))], []
        order = list(range(len(urls)))
        if self.shuffle_buffer:
            _rng(self.seed, epoch, source).shuffle(order)  # same permutation on every rank
        parts, empty = split_shards([urls[i] for i in order], [counts[i] for i in order], self.world_size * workers)
        slot = self.rank * workers + worker
        mine = parts[slot]
        if cycle and self.shuffle_buffer:
            _rng(self.seed, epoch, source, self.rank, worker, cycle).shuffle(mine)
        return mine, (empty[slot] if cycle == 0 else [])

    # -- tokens, and the slots they stand for --------------------------------------------------
    def _tokens(self, source: int, cycle: int, parts: list[Part], empty: list[str], ctx: _Ctx) -> Iterator[Token]:
        for k, url in enumerate(empty):
            t = (source, cycle, -1, k)
            ctx.store[t] = {"__key__": url, "__url__": url, "__skipped__": {"empty_shard": 1}, "__drop__": True}
            yield t
        for p, part in enumerate(parts):
            ctx.part = (cycle, p)
            nxt, n = part.phase, float("inf")  # next index of this part to hand on; its slots
            if not ctx.live:  # replaying: the counts say which tokens come, nothing is read
                n = self._count(part)
                while nxt < n and not ctx.live:
                    yield (source, cycle, p, nxt)
                    nxt += part.stride
                if nxt >= n and not any(t[1:3] == (cycle, p) for t in ctx.needed):
                    continue
            tail = nxt < n  # tokens still to hand on (not only buffered ones to read back)
            here = {t[3] for t in ctx.needed if t[1:3] == (cycle, p)}
            last = max(here) if here else -1
            start, stride, phase = nxt, part.stride, part.phase

            def select(i: int, start=start, stride=stride, phase=phase, here=here) -> bool:
                return i in here or (i >= start and (i - phase) % stride == 0)

            for i, slot in iter_slots(part.url, self.wanted, part.count, select):
                t = (source, cycle, p, i)
                if i in here:
                    ctx.store[t] = slot
                    ctx.needed.discard(t)
                elif tail and i >= start and (i - phase) % stride == 0:
                    ctx.store[t] = slot
                    yield t
                if not tail and i >= last:
                    break
        ctx.part = (cycle, len(parts))  # done: buffered tokens of any part are read back by _go_live

    def _source_stream(self, source: int, worker: int, workers: int, ctx: _Ctx) -> Iterator[Token]:
        cycle, scan = 0, False
        while True:  # cycle through this worker's shards until the epoch's batches are made
            parts, empty = self.plan(source, worker, workers, cycle, scan)
            got = 0
            tokens = self._tokens(source, cycle, parts, empty, ctx)
            shuffle = _Shuffle(tokens, self.shuffle_buffer, _rng(self.seed, self.state.epoch, "shuffle", source,
                                                                  self.rank, worker, cycle))
            ctx.shuffle = shuffle
            # The buffer is flushed at the end of each pass, so one pass ends before the next begins:
            # a sample never appears twice within a pass even when the buffer exceeds the data.
            ctx.parts = parts
            for t in shuffle if self.shuffle_buffer else tokens:
                got += t[2] >= 0 and not ctx.store.get(t, {}).get("__drop__")
                yield t
            if got == 0:
                if not scan:  # counts unknown and this worker's shards held nothing: share all shards
                    scan = True
                    continue
                raise RuntimeError(f"worker {worker} of rank {self.rank} read no sample from the shards of "
                                   f"source {source}; check that the shards are readable and non-empty")
            cycle += 1

    def _raw_stream(self, worker: int, workers: int) -> tuple[list[_Ctx], Iterator[Token]]:
        ctxs = [_Ctx() for _ in self.sources]
        streams = [self._source_stream(i, worker, workers, c) for i, c in enumerate(ctxs)]
        if len(streams) == 1:
            return ctxs, streams[0]
        pick = _rng(self.seed, self.state.epoch, "mix", self.rank, worker)
        weights = [s.weight for s in self.sources]

        def mix() -> Iterator[Token]:
            while True:
                yield next(pick.choices(streams, weights)[0])
        return ctxs, mix()

    def _go_live(self, source: int, ctx: _Ctx) -> None:
        """After a replay: read the slots the shuffle buffer holds, from parts the generator has left."""
        ctx.needed = set(ctx.shuffle.buf) if ctx.shuffle is not None else set()
        ctx.needed -= set(ctx.store)
        cycle, current = ctx.part
        done: dict[int, set[int]] = {}
        for t in ctx.needed:
            if t[2] >= 0 and (t[1], t[2]) != (cycle, current):
                done.setdefault(t[2], set()).add(t[3])
        for p, idx in done.items():
            last = max(idx)
            for i, slot in iter_slots(ctx.parts[p].url, self.wanted, ctx.parts[p].count, idx.__contains__):
                if i in idx:
                    ctx.store[(source, cycle, p, i)] = slot
                    ctx.needed.discard((source, cycle, p, i))
                if i >= last:
                    break
        ctx.live = True

    # -- batches ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        pos = self.state.positions.get(worker, 0)
        made = self.state.batches.get(worker, 0)
        self.skipped.clear()  # per epoch; a resumed worker starts from the counts it had
        self.skipped.update(self.state.skipped.get(worker, {}))
        ctxs, raw = self._raw_stream(worker, workers)
        if pos:
            for c in ctxs:
                c.live = self.replay_reads
            for _ in range(pos):  # replay to the resume point from the counts: nothing is read
                t = next(raw)
                ctxs[t[0]].store.pop(t, None)
            for i, c in enumerate(ctxs):
                if not c.live:
                    self._go_live(i, c)
        epoch, batch = self.state.epoch, []
        while made < self.batches_per_worker:
            t = next(raw)
            slot = ctxs[t[0]].store.pop(t)
            pos += 1
            self.skipped.update(slot.pop("__skipped__", {}))
            if slot.pop("__drop__", False):
                continue
            sample = self.decode(slot)
            if sample is None:
                continue
            with seeded(sample_seed(self.seed, epoch, self.rank, worker, pos)):
                sample["image"] = self.transform(sample["image"])
            batch.append(sample)
            if len(batch) == self.batch_size:
                made += 1
                out = self.collate(batch)
                out["stream"] = torch.tensor([epoch, worker, pos, made])
                yield out
                batch = []
