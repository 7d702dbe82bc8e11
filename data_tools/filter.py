"""ALIGN-style frequency filtering of image/alt-text shards (Jia et al. 2021, section 3).

Two passes over the input: the first counts caption repeats, image repeats (by a digest of the
image bytes) and unigram/bigram frequencies over the raw data (ALIGN computes them on the
unfiltered corpus), the second applies the rules and copies kept samples byte for byte into new
shards. The input is only ever read.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from dualenc.progress import progress, sample_total

from .shards import (
    TarSample,
    check_key,
    check_output_dir,
    copy_sample,
    expand_shards,
    decode_image,
    iter_tar_samples,
    staged_output,
)
from .writer import ShardWriter, write_json_atomic

REPORT_FILE = "filter_report.json"

# Web boilerplate that says nothing about the image. Matched case-insensitively with re.search.
DEFAULT_BOILERPLATE: tuple[str, ...] = (
    # Ends in an image file extension: "IMG_1234.jpg", "dsc 0042 jpg",
    # "file frankfurt airport skyline 2017 05 jpg".
    r"(?:^|[\s._-])(?:jpe?g|png|gif|bmp|webp|tiff?|heic)\s*$",
    # Camera file names: "DSC00042", "IMG_1234 at the beach", "IMG_20190501_123456", "P1010042".
    r"^\s*(?:(?:img|dsc[nf]?|dcim|pict|gopr|mvi)[\s_-]*\d{3,}|p\d{7}\b)",
    # MediaWiki file-page thumbnails: "thumbnail for version as of 21 57 29 june 2010".
    r"^\s*thumbnail for version as of\b",
)

# Rules in the order a sample is attributed to them (the first that drops it).
RULES: tuple[str, ...] = (
    "image_too_small",
    "aspect_ratio",
    "shared_image",
    "boilerplate",
    "too_few_words",
    "too_many_words",
    "shared_caption",
    "rare_tokens",
)
# Samples that cannot be judged at all; counted like rules, always applied first.
# Members filter writes besides the image: what the loaders and tools read. Anything else in a
# client's shard (.pyd, .pickle, .pth, ...) is never copied into the output.
KNOWN_MEMBERS: tuple[str, ...] = ("txt", "json", "cls")
INVALID: tuple[str, ...] = ("missing_image", "unreadable_image", "missing_caption", "non_utf8_caption", "empty_caption")

_WORD_RE = re.compile(r"[^\W_]+")
_N_EXAMPLES = 5


def words(caption: str) -> list[str]:
    """Unigrams: lowercased runs of letters/digits ("IMG_1234.jpg" -> img, 1234, jpg)."""
    return _WORD_RE.findall(caption.lower())


def ngrams(tokens: list[str]) -> list[str]:
    """Unigrams and bigrams (as "a b") of a token list."""
    return tokens + [f"{a} {b}" for a, b in zip(tokens, tokens[1:])]


def normalize_caption(caption: str) -> str:
    """Case- and whitespace-insensitive form under which alt-texts count as shared."""
    return " ".join(caption.lower().split())


def _caption_digest(caption: str) -> bytes:
    # 8-byte digests instead of the strings keep the repeat counter small on big corpora.
    return hashlib.blake2b(normalize_caption(caption).encode("utf-8"), digest_size=8).digest()


def image_digest(f: IO[bytes], chunk: int = 1 << 16) -> bytes:
    """Identity of an image: a digest of its file bytes (byte-identical copies share it)."""
    h = hashlib.blake2b(digest_size=8)
    for block in iter(lambda: f.read(chunk), b""):
        h.update(block)
    return h.digest()


@dataclass
class FilterConfig:
    """Thresholds of each rule; None disables a rule. Defaults are ALIGN's."""

    min_side: int | None = 200  # drop images whose shorter side is < min_side px
    max_aspect: float | None = 3.0  # drop images with long/short side > max_aspect
    max_caption_shares: int | None = 10  # drop alt-texts shared by more than this many images
    # Drop images (identical bytes) that come with more than this many alt-texts, counted as the
    # samples holding them, like max_caption_shares counts the samples holding a caption.
    max_image_captions: int | None = 1000
    # Keep only captions whose unigrams and bigrams are all among the top_ngrams most frequent
    # of the corpus. ALIGN used 100M on 1.8B pairs; scale it down with the corpus.
    top_ngrams: int | None = 100_000_000
    min_words: int | None = 3  # drop captions with fewer unigrams
    max_words: int | None = 20  # drop captions with more unigrams
    boilerplate: list[str] | None = field(default_factory=lambda: list(DEFAULT_BOILERPLATE))

    def __post_init__(self) -> None:
        for name in ("min_side", "max_caption_shares", "max_image_captions", "top_ngrams", "min_words",
                     "max_words"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                raise ValueError(f"{name} must be a non-negative int or None (disabled), got {v!r}")
        if self.max_aspect is not None and self.max_aspect < 1:
            raise ValueError(f"max_aspect must be >= 1 or None (disabled), got {self.max_aspect}")
        for pattern in self.boilerplate or []:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"boilerplate regex {pattern!r} is invalid: {e}") from e

    def disable(self, rules: Iterable[str]) -> None:
        """Turn off rules by name (see RULES)."""
        fields = {"image_too_small": "min_side", "aspect_ratio": "max_aspect",
                  "shared_image": "max_image_captions", "boilerplate": "boilerplate",
                  "too_few_words": "min_words", "too_many_words": "max_words",
                  "shared_caption": "max_caption_shares", "rare_tokens": "top_ngrams"}
        for rule in rules:
            if rule not in fields:
                raise ValueError(f"unknown rule {rule!r}; rules are {', '.join(RULES)}")
            setattr(self, fields[rule], None)


class _Tables:
    """Corpus statistics of pass 1 that the rules need."""

    def __init__(self, config: FilterConfig) -> None:
        self.config = config
        self.caption_counts: Counter[bytes] = Counter()
        self.image_counts: Counter[bytes] = Counter()
        self.ngram_counts: Counter[str] = Counter()
        self.vocab: set[str] | None = None  # None: every n-gram is frequent enough
        self.patterns = [re.compile(p, re.IGNORECASE) for p in (config.boilerplate or [])]

    def add_image(self, digest: bytes) -> None:
        self.image_counts[digest] += 1

    def add(self, caption: str) -> None:
        if self.config.max_caption_shares is not None:
            self.caption_counts[_caption_digest(caption)] += 1
        if self.config.top_ngrams is not None:
            self.ngram_counts.update(ngrams(words(caption)))

    def finish(self) -> dict[str, int]:
        n = self.config.top_ngrams
        distinct = len(self.ngram_counts)
        if n is not None and distinct > n:
            # Ties broken by the n-gram itself, so the vocabulary does not depend on input order.
            ranked = sorted(self.ngram_counts.items(), key=lambda kv: (-kv[1], kv[0]))
            self.vocab = {g for g, _ in ranked[:n]}
        self.ngram_counts = Counter()  # no longer needed; free it before pass 2
        return {"distinct_ngrams": distinct, "vocab_size": distinct if self.vocab is None else len(self.vocab)}

    def text_rules(self, caption: str) -> list[str]:
        """Names of the text rules that drop ``caption``, in RULES order."""
        c, hits = self.config, []
        if any(p.search(caption) for p in self.patterns):
            hits.append("boilerplate")
        toks = words(caption)
        if c.min_words is not None and len(toks) < c.min_words:
            hits.append("too_few_words")
        if c.max_words is not None and len(toks) > c.max_words:
            hits.append("too_many_words")
        if c.max_caption_shares is not None and self.caption_counts[_caption_digest(caption)] > c.max_caption_shares:
            hits.append("shared_caption")
        if self.vocab is not None and any(g not in self.vocab for g in ngrams(toks)):
            hits.append("rare_tokens")
        return hits

    def image_rules(self, w: int, h: int, digest: bytes | None = None) -> list[str]:
        """Names of the image rules that drop a ``w`` x ``h`` image with ``digest``, in RULES order."""
        c, hits = self.config, []
        if c.min_side is not None and min(w, h) < c.min_side:
            hits.append("image_too_small")
        if c.max_aspect is not None and max(w, h) / min(w, h) > c.max_aspect:
            hits.append("aspect_ratio")
        if c.max_image_captions is not None and digest is not None and self.image_counts[digest] > c.max_image_captions:
            hits.append("shared_image")
        return hits


def judge(sample: TarSample, tables: _Tables) -> tuple[list[str], str | None]:
    """(all reasons to drop ``sample``, its caption): invalid first, then RULES order; [] keeps it."""
    reasons: list[str] = []
    image_ext = sample.image_ext
    if image_ext is None:
        reasons.append("missing_image")
    else:
        try:
            w, h = decode_image(sample.read(image_ext))  # fully decoded: a truncated JPEG is dropped here
        except Exception:  # noqa: BLE001 - any parser failure means an unusable image
            reasons.append("unreadable_image")
        else:
            digest = image_digest(sample.open(image_ext)) if tables.config.max_image_captions is not None else None
            reasons += tables.image_rules(w, h, digest)
    caption, problem = sample.caption()
    if problem:
        reasons.append(problem)
    else:
        reasons += tables.text_rules(caption)
    order = {r: i for i, r in enumerate(INVALID + RULES)}
    return sorted(reasons, key=order.__getitem__), caption


def filter_shards(
    shards: str | os.PathLike | list[str],
    out_dir: str | os.PathLike,
    config: FilterConfig | None = None,
    *,
    shard_size: int = 1000,
    prefix: str = "shard",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Filter ``shards`` with ALIGN's rules into new shards under ``out_dir``; returns the report.

    The report (also ``out_dir/filter_report.json``) counts drops per rule twice: under
    ``dropped.first_rule`` each dropped sample once, under the first rule that drops it; under
    ``dropped.by_rule`` every rule that would drop it (so a rule's total impact).
    """
    config = config or FilterConfig()
    paths = expand_shards(shards)
    check_output_dir(Path(out_dir), overwrite=overwrite, marker=REPORT_FILE, inputs=paths)  # before pass 1

    # Pass 1: corpus statistics (captions, and image bytes hashed if shared_image is on; no decoding).
    tables = _Tables(config)
    keys: set[str] = set()
    n_input = 0
    reader_skipped: Counter[str] = Counter()
    for sample in progress(iter_tar_samples(paths, reader_skipped), total=sample_total(paths),
                           desc="filter: counting", unit="sample"):
        n_input += 1
        check_key(sample.key, sample.shard, keys)
        caption, _ = sample.caption()
        if caption is not None:
            tables.add(caption)
        if config.max_image_captions is not None and sample.image_ext is not None:
            tables.add_image(image_digest(sample.open(sample.image_ext)))
    del keys
    vocab_info = tables.finish()
    image_info = {"distinct": len(tables.image_counts),
                  "most_samples_per_image": max(tables.image_counts.values(), default=0)}

    # Pass 2: judge and copy.
    first: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    per_pattern: Counter[str] = Counter()
    examples: dict[str, list[dict[str, str]]] = {}
    kept = 0
    with staged_output(out_dir, overwrite=overwrite, marker=REPORT_FILE, inputs=paths) as tmp:
        with ShardWriter(tmp, prefix=prefix, max_count=shard_size) as writer:
            for sample in progress(iter_tar_samples(paths), total=sample_total(paths), desc="filter: writing",
                                   unit="sample"):
                reasons, caption = judge(sample, tables)
                if not reasons:
                    copy_sample(writer, sample, keep=KNOWN_MEMBERS)  # never .pyd/.pickle/...
                    kept += 1
                    continue
                first[reasons[0]] += 1
                totals.update(reasons)
                if "boilerplate" in reasons and caption is not None:
                    per_pattern.update(p.pattern for p in tables.patterns if p.search(caption))
                ex = examples.setdefault(reasons[0], [])
                if len(ex) < _N_EXAMPLES:
                    ex.append({"key": sample.key, "shard": sample.shard, "caption": caption or ""})
        report = {
            "input": {"shards": paths, "samples": n_input, "skipped": dict(sorted(reader_skipped.items()))},
            "kept": kept,
            "dropped": {
                "total": n_input - kept,
                "first_rule": {r: first[r] for r in INVALID + RULES if first[r]},
                "by_rule": {r: totals[r] for r in INVALID + RULES if totals[r]},
            },
            "boilerplate_patterns": {p: per_pattern[p] for p in (config.boilerplate or [])},
            "ngrams": vocab_info,
            "images": image_info,  # counted only while shared_image is on
            "config": asdict(config),
            "examples": examples,
            "output": {"dir": str(Path(out_dir)), "shards": [Path(p).name for p in writer.shards]},
        }
        write_json_atomic(tmp / REPORT_FILE, report)
    return report
