"""The training epoch's plan, logged once at the start of fit: how many samples and steps, each rank's
and each worker's share, and what keeping every worker and rank at the same number of batches costs
(samples left out of the epoch, samples a worker with a short share takes twice)."""

from __future__ import annotations

from dataclasses import dataclass

from dualenc.data.stream import Source, split_shards

PLAN_WARN = 0.03  # warn when more than this fraction of the epoch is left out or taken twice


@dataclass
class EpochPlan:
    """Numbers of one epoch on all ranks (shares from the unshuffled shard order: shuffled epochs differ
    by a few samples)."""

    samples: int  # the epoch's samples: epoch_samples, else usable.json's count, else sizes.json's
    counted: str  # where ``samples`` came from
    batch_size: int
    world: int
    workers: int
    batches_per_worker: int
    shards: int  # non-empty shards
    slot_min: int  # the smallest and largest share of the shards' slots of one (rank, worker)
    slot_max: int
    usable_ratio: float  # usable samples per slot (1.0 without usable.json)
    repeated: int  # about: samples workers with short shares take twice to make their batches
    usable_total: int | None = None  # usable samples in the shards, when counted

    @classmethod
    def of(cls, sources: list[Source], samples: int, batch_size: int, world: int, workers: int,
           batches_per_worker: int, counted: str) -> "EpochPlan":
        need = batches_per_worker * batch_size
        shares: list[float] = [0.0] * (world * workers)
        shards, ratio_num, ratio_den = 0, 0, 0
        for src in sources:
            counts = list(src.counts) if src.counts is not None else [None] * len(src.urls)
            shards += sum(1 for c in counts if c != 0)
            if None in counts:
                continue
            usable = src.usable if src.usable is not None and None not in src.usable else counts
            ratio_num, ratio_den = ratio_num + sum(usable), ratio_den + sum(counts)  # type: ignore[arg-type]
            parts, _ = split_shards(list(src.urls), counts, world * workers)
            for slot, ps in enumerate(parts):
                shares[slot] += sum(len(range(p.phase, p.count or 0, p.stride)) for p in ps) * src.weight / sum(
                    s.weight for s in sources)
        ratio = ratio_num / ratio_den if ratio_den else 1.0
        repeated = int(sum(max(0.0, need - share * ratio) for share in shares)) if ratio_den else 0
        return cls(samples, counted, batch_size, world, workers,
                   batches_per_worker, shards, int(min(shares)), int(max(shares)), ratio, repeated,
                   ratio_num if ratio_den else None)

    @property
    def used(self) -> int:
        return self.batches_per_worker * self.batch_size * self.workers * self.world

    @property
    def steps(self) -> int:
        return self.batches_per_worker * self.workers

    def waste(self) -> float:
        """The fraction of the epoch left out or taken twice to keep workers and ranks equal (an epoch asked
        to be larger than the data repeats samples by design: those repeats are not counted)."""
        wanted = max(0, self.used - self.usable_total) if self.usable_total is not None else 0
        return (self.samples - self.used + max(0, self.repeated - wanted)) / max(1, self.samples)

    def text(self) -> str:
        return (f"epoch plan: {self.used} of {self.samples} samples ({self.counted}) in {self.steps} steps of "
                f"{self.batch_size} x {self.world} rank(s); per rank {self.used // self.world}, per worker "
                f"{self.batches_per_worker * self.batch_size} ({self.batches_per_worker} batches) from "
                f"{self.slot_min}-{self.slot_max} shard slots ({self.shards} non-empty shards, "
                f"{self.workers * self.world} worker slots, {self.usable_ratio:.1%} of slots usable); "
                f"left out to keep ranks and workers equal: {self.samples - self.used}; "
                f"taken twice by workers with short shares: about {self.repeated} (logged as data/repeated)")

    def warning(self) -> str:
        return (f"the epoch loses {self.waste():.1%} to keeping {self.workers} worker(s) x {self.world} rank(s) "
                f"equal ({self.samples - self.used} of {self.samples} samples left out, about {self.repeated} "
                f"taken twice; {self.shards} non-empty shards): lower --data.num_workers or --data.batch_size, "
                "or run `dualenc-data stats` so the epoch counts only usable samples (usable.json)")
