"""A deterministic, resumable stream of training batches from tar shards.

Everything a worker yields is a pure function of (seed, epoch, rank, world size, worker, number of
workers) and the shards' sample counts: the shard order, the shard split, the shuffle buffer, the
source mixing and the augmentation of each sample. A worker counts the raw slots it has emitted
(before decoding, so corrupt samples count too); given that count for the last batch the trainer
consumed, a resumed worker computes the shuffle's state there from the counts alone (the shuffle's
draws are counter-based, so this is a few numpy calls, not a step per position), then
reads only the samples the shuffle buffer still holds (seeking past the others) and goes on exactly
where it stopped: no sample twice, none skipped, the same augmentation. Neither webdataset nor
open_clip can resume mid-epoch; this is why the reading loop is ours.

Shards are split over (rank, worker) slots by their sample counts; empty shards are skipped (and
counted once per epoch); with fewer non-empty shards than slots, slots share a shard by taking every
k-th sample. Every worker yields the same number of batches, cycling its samples if it runs out; skips
count in its first pass only (a later pass's samples are counted as repeated), so an epoch counts each
bad sample once whatever the number of workers.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import random
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from dualenc.data.tario import count_slots, iter_slots, read_slots, slot_index
from dualenc.errors import UserError

Raw = dict[str, Any]
Token = tuple  # (source, cycle, part, index); part -1 marks an empty shard
# The data order's version, saved in the loader state: a checkpoint of another order is not resumed
# mid-epoch (1: Python's random per shuffle step; 2: counter-based draws, replayed in numpy).
ORDER = 2
_SHUFFLE, _MIX = 1, 2  # tags of the counter-based draw streams
# What to do about each reason a sample is skipped, for the error a pass with no usable sample raises.
SKIP_FIXES = {
    "corrupt_image": "corrupt_image: the images do not decode; rebuild the shards (`dualenc-data build`) or keep "
                     "the decodable samples (`dualenc-data filter --shards DIR --out NEW`).",
    "missing_image": "missing_image: no .jpg/.jpeg/.png/.webp member in the samples; check the member names.",
    "missing_caption": "missing_caption: no caption member; set --data.caption_key to its extension (txt by "
                       "default; json with --data.caption_field).",
    "bad_json": "bad_json: the caption's JSON member does not parse; check --data.caption_key.",
    "empty_caption": "empty_caption: the captions are empty; check --data.caption_key / --data.caption_field.",
    "non_utf8_caption": "non_utf8_caption: the captions are not UTF-8 text.",
    "too_many_pixels": "too_many_pixels: the images exceed --data.max_pixels (a decompression-bomb guard); "
                       "raise it if they are genuine.",
    "corrupt_tar": "corrupt_tar: the tar files are damaged; re-download or rebuild them.",
    "missing_sample": "missing_sample: the shards hold fewer samples than sizes.json / *_stats.json say; "
                      "delete the wrong counts (`dualenc-data stats --shards DIR --out OUT` writes a new sizes.json).",
}
_M64 = 0xFFFFFFFFFFFFFFFF


@dataclass
class Source:
    """One data source: shard URLs, their sample counts if known, and its weight when mixed."""

    urls: list[str]
    weight: float = 1.0
    counts: list[int | None] | None = None  # slots per shard (sizes.json): what the split and a resume use
    usable: list[int | None] | None = None  # samples that decode per shard (usable.json): the epoch's length


@dataclass
class StreamState:
    """Where each worker of this rank stopped: raw slots emitted, batches yielded, skips counted, and
    ``first``: the worker the loader asks next (loader process 0 plays it, 1 the one after, ...)."""

    epoch: int = 0
    positions: dict[int, int] = field(default_factory=dict)
    batches: dict[int, int] = field(default_factory=dict)
    skipped: dict[int, dict[str, int]] = field(default_factory=dict)
    first: int = 0
    repeated: dict[int, int] = field(default_factory=dict)  # samples a worker took again from a later pass


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


def uniforms(key: int, start: int, n: int) -> np.ndarray:
    """Draws ``start .. start + n - 1`` of the counter-based stream ``key``: floats in [0, 1).

    Draw ``k`` is splitmix64 of ``key + k``: a pure function of its index, so a resume computes the
    draws of a million shuffle steps in one numpy call instead of stepping an RNG through them.
    """
    with np.errstate(over="ignore"):
        z = np.arange(start + 1, start + n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z += np.uint64(key & _M64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _draws(key: int, start: int = 0, chunk: int = 4096) -> Iterator[float]:
    """The stream ``key`` from draw ``start`` on, computed a chunk at a time."""
    while True:
        yield from uniforms(key, start, chunk).tolist()
        start += chunk


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
    """Buffered shuffle over one pass; ``buf`` is exactly what it holds, for a resume to read back.

    Step ``k`` (the ``k``-th item once the buffer is full) swaps the item into slot
    ``floor(u_k * size)`` of the counter-based draws ``u`` of ``key`` and yields what was there; at
    the end of the pass the buffer is shuffled by ``flush`` and emptied. ``at`` resumes a pass:
    the buffer as it was, the step reached, whether it was flushing.
    """

    def __init__(self, items: Iterator[Token], size: int, key: int, flush: random.Random,
                 at: tuple[list[Token], int, bool] | None = None) -> None:
        self.items, self.size, self.key, self.flush = items, size, key, flush
        self.buf, self.step, self.flushing = at if at is not None else ([], 0, False)

    def __iter__(self) -> Iterator[Token]:
        buf, size = self.buf, self.size
        if not self.flushing:
            draws = _draws(self.key, self.step)
            for item in self.items:
                if len(buf) < size:
                    buf.append(item)
                    continue
                i = int(next(draws) * size)
                self.step += 1
                buf[i], item = item, buf[i]
                yield item
            self.flush.shuffle(buf)
            self.flushing = True
        while buf:
            yield buf.pop()

    @staticmethod
    def held(size: int, key: int, steps: int, chunk: int = 0) -> np.ndarray:
        """Which item of the pass each slot holds after ``steps`` steps (the buffer was full): the one
        that entered at the last step choosing that slot, else the one that filled it. Steps are
        drawn backwards a chunk at a time until every slot is decided (about size * ln(size) steps,
        not all of them)."""
        chunk = chunk or max(8 * size, 4096)
        last = np.full(size, -1, dtype=np.int64)
        hi = steps
        while hi > 0 and (last < 0).any():
            lo = max(0, hi - chunk)
            slots = (uniforms(key, lo, hi - lo) * size).astype(np.int64)
            here = np.full(size, -1, dtype=np.int64)
            np.maximum.at(here, slots, np.arange(lo, hi, dtype=np.int64))
            last = np.where(last < 0, here, last)
            hi = lo
        return np.where(last >= 0, last + size, np.arange(size))


@dataclass
class _Ctx:
    """One source's reading state in a worker: live reading or replay, and slots read ahead."""

    live: bool = True
    store: dict[Token, Raw] = field(default_factory=dict)
    needed: set[Token] = field(default_factory=set)
    parts: list[Part] = field(default_factory=list)
    part: tuple[int, int] = (0, -1)  # (cycle, part) being generated
    shuffle: _Shuffle | None = None
    usable: int = 0  # samples that decoded (so a pass giving none is caught, not cycled forever)
    stream: Iterator[Token] | None = None  # this source's tokens (the mix draws from it)
    last: Token | None = None  # the last token taken


def _until(slots: Iterator[tuple[int, Raw]], last: int) -> Iterator[tuple[int, Raw]]:
    for i, slot in slots:
        yield i, slot
        if i >= last:
            return


def _empty_slot(url: str) -> Raw:
    return {"__key__": url, "__url__": url, "__skipped__": {"empty_shard": 1}, "__drop__": True}


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
        index_shards: cache each local shard's slot offsets after reading it whole (``tario.slot_index``),
            so a resume seeks to the samples its shuffle buffer holds instead of walking headers.
        split: the split's name in error messages.
    """

    def __init__(self, sources: list[Source], decode: Callable[[Raw], Raw | None], wanted: Callable[[str], bool],
                 skipped: Counter[str], transform: Callable, collate: Callable[[list[Raw]], dict[str, Any]],
                 batch_size: int, batches_per_worker: int, rank: int = 0, world_size: int = 1,
                 shuffle_buffer: int = 0, resampled: bool = False, seed: int = 0, index_shards: bool = True,
                 split: str = "train") -> None:
        super().__init__()
        self.sources = sources
        self.decode, self.wanted, self.skipped = decode, wanted, skipped
        self.transform, self.collate = transform, collate
        self.batch_size, self.batches_per_worker = batch_size, batches_per_worker
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.resampled, self.seed = shuffle_buffer, resampled, seed
        self.index_shards, self.split = index_shards, split
        # The epoch covers the data: once its batches are made a worker reads the rest of its first pass,
        # only to count its skips (set by the data module when the epoch's samples are the shards' count).
        self.finish_pass = False
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
    def _tokens(self, source: int, cycle: int, parts: list[Part], empty: list[str], ctx: _Ctx,
                skip: int = 0) -> Iterator[Token]:
        """The pass's tokens, from its ``skip``-th on (a fast resume: the buffered ones are read back)."""
        for k, url in enumerate(empty):
            if k < skip:
                continue
            t = (source, cycle, -1, k)
            ctx.store[t] = _empty_slot(url)
            yield t
        skip = max(0, skip - len(empty))
        for p, part in enumerate(parts):
            ctx.part = (cycle, p)
            nxt, n = part.phase, float("inf")  # next index of this part to hand on; its slots
            if skip:
                m = len(range(part.phase, self._count(part), part.stride))
                if skip >= m:
                    skip -= m
                    continue
                nxt, skip = part.phase + skip * part.stride, 0
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
            index = slot_index(part.url, part.count) if self.index_shards and (here or start > phase) else None
            if index is not None:  # a resume into an indexed shard: seek to what it needs
                for i, slot in read_slots(part.url, self.wanted, sorted(here), index):
                    ctx.store[(source, cycle, p, i)] = slot
                    ctx.needed.discard((source, cycle, p, i))
                if not tail:
                    continue
                mine = lambda i, s=stride, f=phase: (i - f) % s == 0  # noqa: E731
                for i, slot in iter_slots(part.url, self.wanted, part.count, mine, first=start, index=index):
                    if (i - phase) % stride == 0:
                        ctx.store[(source, cycle, p, i)] = slot
                        yield (source, cycle, p, i)
                continue

            def select(i: int, start=start, stride=stride, phase=phase, here=here) -> bool:
                return i in here or (i >= start and (i - phase) % stride == 0)

            for i, slot in iter_slots(part.url, self.wanted, part.count, select, record=self.index_shards):
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

    def _shuffle_key(self, source: int, worker: int, cycle: int) -> tuple[int, random.Random]:
        """The counter-based stream of a pass's shuffle steps, and the RNG of its final flush."""
        return (sample_seed(self.seed, self.state.epoch, _SHUFFLE, source, self.rank, worker, cycle),
                _rng(self.seed, self.state.epoch, "shuffle", source, self.rank, worker, cycle))

    def _source_stream(self, source: int, worker: int, workers: int, ctx: _Ctx,
                       start: tuple[int, int, Any] | None = None) -> Iterator[Token]:
        cycle, scan = 0, False
        skip, at = 0, None  # a fast resume's place in its pass: tokens passed, the shuffle's state
        if start is not None:
            cycle, skip, at = start
        while True:  # cycle through this worker's shards until the epoch's batches are made
            parts, empty = self.plan(source, worker, workers, cycle, scan)
            got = int(bool(skip))  # a resumed pass had samples before the resume point
            resumed, usable = bool(skip), ctx.usable
            tokens = self._tokens(source, cycle, parts, empty, ctx, skip)
            shuffle = _Shuffle(tokens, self.shuffle_buffer, *self._shuffle_key(source, worker, cycle), at=at)
            skip, at = 0, None
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
                raise UserError(f"worker {worker} of rank {self.rank} read no sample from the shards of "
                                f"source {source}; check that the shards are readable and non-empty")
            if ctx.usable == usable and not resumed:  # a whole pass, all skipped: cycling would never end
                raise UserError(self._nothing_usable(source, worker, parts))
            cycle += 1

    def _nothing_usable(self, source: int, worker: int, parts: list[Part]) -> str:
        urls = sorted({p.url for p in parts})
        shown = ", ".join(urls[:4]) + (f" and {len(urls) - 4} more" if len(urls) > 4 else "")
        counts = dict(self.skipped.most_common())
        fixes = [fix for reason, fix in SKIP_FIXES.items() if reason in counts]
        return (f"no usable sample in a whole pass over the {len(urls)} shard(s) of {self.split} source {source} "
                f"read by loader worker {worker} of rank {self.rank} ({shown}): every sample was skipped; skip "
                f"counts of this worker so far: {counts or 'none'}. "
                + (" ".join(fixes) if fixes else "Check the shards with `dualenc-data stats --shards DIR --out OUT`."))

    def _mix(self, worker: int) -> tuple[int, list[float]]:
        cum, total = [], 0.0
        for s in self.sources:
            total += s.weight
            cum.append(total)
        return sample_seed(self.seed, self.state.epoch, _MIX, self.rank, worker), cum

    def _raw_stream(self, worker: int, workers: int, ctxs: list[_Ctx], starts: list | None = None,
                    pos: int = 0) -> Iterator[Token]:
        """Raw position ``pos`` on of the worker's tokens; ``starts``: each source's place there."""
        streams = [self._source_stream(i, worker, workers, c, starts[i] if starts else None)
                   for i, c in enumerate(ctxs)]
        for c, s in zip(ctxs, streams):
            c.stream = s
        if len(streams) == 1:
            return streams[0]
        key, cum = self._mix(worker)
        last = len(cum) - 1

        def mix() -> Iterator[Token]:  # the source of raw position k: weighted by counter-based draw k
            for u in _draws(key, pos):
                yield next(streams[min(bisect.bisect(cum, u * cum[-1]), last)])
        return mix()

    def _seek(self, source: int, worker: int, workers: int, consumed: int) -> tuple | None:
        """Where the source's stream is after ``consumed`` tokens, from the counts alone (numpy, no
        stepping through them): (start for ``_source_stream``, parts, part reached, buffer), or None
        where a pass of this worker has no sample (the stream must be replayed step by step)."""
        size, cycle = self.shuffle_buffer, 0
        while True:
            parts, empty = self.plan(source, worker, workers, cycle)
            sizes = [len(range(p.phase, self._count(p), p.stride)) for p in parts]
            if not any(sizes):
                return None
            n = len(empty) + sum(sizes)
            if consumed < n:
                break
            consumed, cycle = consumed - n, cycle + 1
        starts = list(itertools.accumulate([len(empty)] + sizes[:-1]))

        def token(i: int) -> Token:
            if i < len(empty):
                return (source, cycle, -1, i)
            p = bisect.bisect(starts, i) - 1
            return (source, cycle, p, parts[p].phase + parts[p].stride * (i - starts[p]))

        buf: list[Token] = []
        skip, at = consumed, None
        if size and consumed:
            key, flush = self._shuffle_key(source, worker, cycle)
            steps = n - min(size, n)  # steps of the pass once its buffer is full
            if consumed <= steps:
                buf = [token(i) for i in _Shuffle.held(size, key, consumed).tolist()]
                skip, at = size + consumed, (buf, consumed, False)
            else:  # in the final flush: some of the shuffled buffer is popped already
                buf = [token(i) for i in (_Shuffle.held(size, key, steps).tolist() if steps else range(n))]
                flush.shuffle(buf)
                del buf[len(buf) - (consumed - steps):]
                skip, at = n, (buf, steps, True)
        current = next((p for p in range(len(parts)) if skip < starts[p] + sizes[p]), len(parts))
        return (cycle, skip, at), parts, empty, (cycle, current), buf

    def _go_live(self, source: int, ctx: _Ctx, held: list[Token]) -> None:
        """After a replay: read the slots the shuffle buffer holds, from parts the generator has left."""
        ctx.needed = set(held) - set(ctx.store)
        cycle, current = ctx.part
        done: dict[int, set[int]] = {}
        for t in ctx.needed:
            if t[2] >= 0 and (t[1], t[2]) != (cycle, current):
                done.setdefault(t[2], set()).add(t[3])
        for p, idx in done.items():
            part, last = ctx.parts[p], max(idx)
            index = slot_index(part.url, part.count) if self.index_shards else None
            if index is not None:  # seek straight to the buffered samples
                slots = read_slots(part.url, self.wanted, sorted(idx), index)
            else:  # walk the shard's headers up to the last one the buffer holds
                slots = _until(iter_slots(part.url, self.wanted, part.count, idx.__contains__), last)
            for i, slot in slots:
                if i in idx:
                    ctx.store[(source, cycle, p, i)] = slot
                    ctx.needed.discard((source, cycle, p, i))
        ctx.live = True

    def _resume(self, worker: int, workers: int, pos: int) -> tuple[list[_Ctx], Iterator[Token]] | None:
        """The raw stream at ``pos``, its shuffle state computed from counts (see ``_seek``), or None."""
        if len(self.sources) == 1:
            per_source = [pos]
        else:
            key, cum = self._mix(worker)
            picked = np.searchsorted(np.asarray(cum), uniforms(key, 0, pos) * cum[-1], side="right")
            per_source = np.bincount(np.minimum(picked, len(cum) - 1), minlength=len(cum)).tolist()
        seeks = [self._seek(i, worker, workers, n) for i, n in enumerate(per_source)]
        if any(s is None for s in seeks):
            return None
        ctxs = [_Ctx() for _ in self.sources]
        for i, (ctx, (_, parts, empty, part, buf)) in enumerate(zip(ctxs, seeks)):
            ctx.parts, ctx.part = parts, part
            for t in buf:
                if t[2] < 0:
                    ctx.store[t] = _empty_slot(empty[t[3]])
            self._go_live(i, ctx, buf)
        return ctxs, self._raw_stream(worker, workers, ctxs, [s[0] for s in seeks], pos)

    # -- batches ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        # A DataLoader asks its processes round-robin from process 0; a resumed epoch must go on with the
        # worker the uninterrupted run would have asked next, so process k plays worker first + k.
        worker = (worker + self.state.first) % workers
        pos = self.state.positions.get(worker, 0)
        made = self.state.batches.get(worker, 0)
        self.skipped.clear()  # per epoch; a resumed worker starts from the counts it had
        self.skipped.update(self.state.skipped.get(worker, {}))
        resumed = self._resume(worker, workers, pos) if pos and not self.replay_reads else None
        if resumed is not None:
            ctxs, raw = resumed
        else:
            ctxs = [_Ctx() for _ in self.sources]
            raw = self._raw_stream(worker, workers, ctxs)
        if pos and resumed is None:  # step by step (``replay_reads``: by reading every byte, as before)
            for c in ctxs:
                c.live = self.replay_reads
            for _ in range(pos):
                t = next(raw)
                ctxs[t[0]].usable += 1  # not decoded: taken as usable (no pass before the resume fails)
                ctxs[t[0]].store.pop(t, None)
            for i, c in enumerate(ctxs):
                if not c.live:
                    self._go_live(i, c, c.shuffle.buf if c.shuffle is not None else [])
        epoch, batch = self.state.epoch, []
        repeated = self.state.repeated.get(worker, 0)
        while made < self.batches_per_worker:
            t = next(raw)
            pos += 1
            sample = self._take(t, ctxs)
            if sample is None:
                continue
            repeated += t[1] > 0
            with seeded(sample_seed(self.seed, epoch, self.rank, worker, pos)):
                sample["image"] = self.transform(sample["image"])
            batch.append(sample)
            if len(batch) == self.batch_size:
                made += 1
                if made == self.batches_per_worker and self.finish_pass:
                    self._finish_first_pass(ctxs)  # before collate: the last batch carries the full counts
                out = self.collate(batch)
                out["stream"] = torch.tensor([epoch, worker, pos, made])
                out["worker"], out["repeated"] = worker, repeated
                yield out
                batch = []

    def _take(self, t: Token, ctxs: list[_Ctx]) -> Raw | None:
        """The decoded sample of token ``t``, or None (skipped). Skips count in the first pass only: a later
        pass re-reads samples this worker has counted already (its count would depend on the worker count)."""
        ctx = ctxs[t[0]]
        slot = ctx.store.pop(t)
        ctx.last = t
        if t[1] == 0:
            self.skipped.update(slot.pop("__skipped__", {}))
            sample = None if slot.pop("__drop__", False) else self.decode(slot)
        else:
            before = self.skipped.copy()
            sample = None if slot.get("__drop__") else self.decode(slot)
            self.skipped.clear()  # in place: the decoder holds this counter
            self.skipped.update(before)
        ctx.usable += sample is not None
        return sample

    def _first_pass_over(self, ctx: _Ctx) -> bool:
        t = ctx.last
        if t is None:
            return False
        if t[1] > 0:
            return True
        if self.shuffle_buffer and ctx.shuffle is not None:
            return ctx.shuffle.flushing and not ctx.shuffle.buf
        if not ctx.parts:
            return True
        p = t[2]
        return p == len(ctx.parts) - 1 and t[3] + ctx.parts[p].stride >= self._count(ctx.parts[p])

    def _finish_first_pass(self, ctxs: list[_Ctx]) -> int:
        """Decode (no transform) what is left of each source's first pass once the worker's batches are made,
        so each bad sample of the epoch is counted once whatever the worker count; returns the usable samples
        so passed over. Only when the epoch covers the data (``finish_pass``): then this is a small tail."""
        dropped = 0
        for ctx in ctxs:
            while ctx.stream is not None and not self._first_pass_over(ctx):
                t = next(ctx.stream)
                if t[1] > 0:  # the pass had ended with the last token taken
                    ctx.store.pop(t, None)
                    break
                dropped += self._take(t, ctxs) is not None
        return dropped
