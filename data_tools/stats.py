"""Dataset statistics of shards: counts, image-size / aspect-ratio / caption-length histograms,
most repeated captions; JSON plus PNG plots, and ``sizes.json`` beside the shards when missing."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from dualenc.progress import progress, sample_total

from .filter import normalize_caption, words
from .shards import expand_shards, image_size, iter_tar_samples, require
from .writer import SIZES_FILE, write_json_atomic


def _image_or_caption(name: str) -> bool:
    return name.lower().endswith((".txt", ".jpg", ".jpeg", ".png", ".webp"))

STATS_FILE = "stats.json"
# Bin edges; the last bin is open-ended ("None" in the JSON). 200 px and 3:1 are ALIGN's cut-offs.
SIDE_EDGES: tuple[float, ...] = (0, 32, 64, 128, 200, 256, 384, 512, 768, 1024, 2048)
ASPECT_EDGES: tuple[float, ...] = (1, 1.25, 1.5, 2, 2.5, 3, 4, 6)
MAX_WORDS_BIN = 40  # caption lengths >= this share the last bin


def histogram(values: list[float] | np.ndarray, edges: tuple[float, ...], *, integer: bool = False) -> dict[str, Any]:
    """Counts in [edges[i], edges[i+1]) with the last bin [edges[-1], inf).

    ``integer``: the bins are consecutive integers, labelled by their value.
    """
    idx = np.searchsorted(np.asarray(edges, dtype=float), np.asarray(values, dtype=float), side="right") - 1
    counts = np.bincount(np.clip(idx, 0, len(edges) - 1), minlength=len(edges))
    if integer:
        labels = [_fmt(a) for a in edges[:-1]]
    else:
        labels = [f"{_fmt(a)}-{_fmt(b)}" for a, b in zip(edges, edges[1:])]
    labels.append(f">={_fmt(edges[-1])}")
    return {"edges": [*map(float, edges), None], "labels": labels, "counts": counts.tolist()}


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    a = np.asarray(values, dtype=float)
    return {"min": float(a.min()), "median": float(np.median(a)), "mean": round(float(a.mean()), 3),
            "max": float(a.max())}


def shard_stats(
    shards: str | os.PathLike | list[str],
    out_dir: str | os.PathLike | None = None,
    *,
    top_k: int = 20,
    write_sizes: bool | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """Compute statistics of ``shards``; with ``out_dir``, write ``stats.json`` and PNG plots there.

    ``write_sizes``: None writes ``sizes.json`` beside the shards only where it is missing; True
    also merges the counted sizes into an existing one; False never writes it. Image sizes come
    from the image headers only (no decoding).
    """
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if out_dir is not None and plots:
        require("matplotlib", "matplotlib", "plotting stats (pass plots=False / --no-plots to skip)")
    paths = expand_shards(shards)

    per_shard: dict[str, int] = {}
    problems: Counter[str] = Counter()
    sides: list[int] = []
    aspects: list[float] = []
    n_words: list[int] = []
    captions: Counter[str] = Counter()
    # Only the image and caption members are read (the rest is passed with a seek).
    for sample in progress(iter_tar_samples(paths, problems, wanted=_image_or_caption), total=sample_total(paths),
                           desc="stats", unit="sample"):
        per_shard[sample.shard] = per_shard.get(sample.shard, 0) + 1
        ext = sample.image_ext
        if ext is None:
            problems["missing_image"] += 1
        else:
            try:
                w, h = image_size(sample.open(ext))
            except Exception:  # noqa: BLE001 - any parser failure means an unusable image
                problems["unreadable_image"] += 1
            else:
                sides.append(min(w, h))
                aspects.append(max(w, h) / min(w, h))
        caption, problem = sample.caption()
        if problem:
            problems[problem] += 1
        else:
            n_words.append(len(words(caption)))
            captions[normalize_caption(caption)] += 1
    for p in paths:
        per_shard.setdefault(p, 0)  # a tar with no samples still counts as a shard

    stats: dict[str, Any] = {
        "shards": len(paths),
        "samples": sum(per_shard.values()),
        "problems": dict(sorted(problems.items())),
        "shorter_side": {"summary": _summary(sides), "histogram": histogram(sides, SIDE_EDGES)},
        "aspect_ratio": {"summary": _summary(aspects), "histogram": histogram(aspects, ASPECT_EDGES)},
        "caption_words": {
            "summary": _summary(n_words),
            "histogram": histogram(n_words, tuple(range(MAX_WORDS_BIN + 1)), integer=True),
        },
        "captions": {
            "distinct": len(captions),
            "shared_by_more_than_10": sum(1 for n in captions.values() if n > 10),
            "top": [{"caption": c, "count": n}
                    for c, n in sorted(captions.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]],
        },
        "sizes_json": _sizes_json(per_shard, write_sizes),
    }
    if write_sizes is not False:
        stats["usable_json"] = _usable_json(paths, write_sizes)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / STATS_FILE, stats)
        if plots:
            stats["plots"] = _plot(stats, out)
    return stats


def _sizes_json(per_shard: dict[str, int], write: bool | None) -> dict[str, Any]:
    """Check / write ``sizes.json`` per shard directory; returns what was found and done."""
    by_dir: dict[Path, dict[str, int]] = {}
    for path, n in per_shard.items():
        by_dir.setdefault(Path(path).parent, {})[Path(path).name] = n
    result: dict[str, Any] = {}
    for folder, counts in sorted(by_dir.items()):
        f = folder / SIZES_FILE
        existing: dict[str, int] | None = None
        if f.is_file():
            try:
                existing = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"cannot read {f}: {e}; fix or delete it, or rerun with --write-sizes") from e
            if not isinstance(existing, dict):
                raise ValueError(f"{f} is not a JSON object; delete it or rerun with --write-sizes")
        wrong = {name: {"listed": existing.get(name), "counted": n}
                 for name, n in counts.items() if existing is not None and existing.get(name) != n}
        written = (write is True or (write is None and existing is None)) and (existing is None or bool(wrong))
        if written:
            # Merge: entries for shards of this folder that were not counted here are kept.
            write_json_atomic(f, {**(existing or {}), **counts})
        entry: dict[str, Any] = {"existed": existing is not None, "written": written}
        if wrong and not written:
            entry["mismatch"] = wrong
            entry["hint"] = "sizes.json disagrees with the shards; rerun with --write-sizes to fix it"
        result[str(folder)] = entry
    return result


def _usable_json(paths: list[str], write: bool | None) -> dict[str, Any]:
    """Write ``usable.json`` per shard directory (missing, or always with ``write``): the samples training's
    decoder accepts (default decoder: ``.txt`` captions, default ``max_pixels``). Training's epoch counts
    these, not the slots of sizes.json, so an epoch is one pass over what it can use."""
    from dualenc.data.decode import SampleDecoder
    from dualenc.data.sources import USABLE_FILE
    from dualenc.data.tario import iter_slots

    by_dir: dict[Path, list[str]] = {}
    for p in paths:
        by_dir.setdefault(Path(p).parent, []).append(p)
    result: dict[str, Any] = {}
    for folder, shards in sorted(by_dir.items()):
        f = folder / USABLE_FILE
        if f.is_file() and write is not True:
            result[str(folder)] = {"existed": True, "written": False}
            continue
        decoder = SampleDecoder()
        counts = {}
        for path in shards:
            counts[Path(path).name] = sum(1 for _, slot in iter_slots(path, decoder.wanted)
                                          if not slot.get("__drop__") and decoder(slot) is not None)
        existed = f.is_file()
        existing = json.loads(f.read_text(encoding="utf-8")) if existed else {}
        write_json_atomic(f, {**existing, **counts})
        result[str(folder)] = {"existed": existed, "written": True, "usable": sum(counts.values()),
                               "skipped": dict(decoder.skipped)}
    return result


def _plot(stats: dict[str, Any], out: Path) -> list[str]:
    # Figure + FigureCanvasAgg: renders with Agg without touching pyplot's global backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    specs = [
        ("shorter_side", "image shorter side (px)"),
        ("aspect_ratio", "aspect ratio (long / short side)"),
        ("caption_words", "caption length (unigrams)"),
    ]
    files = []
    for name, title in specs:
        hist = stats[name]["histogram"]
        fig = Figure(figsize=(7, 3.5), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        x = np.arange(len(hist["counts"]))
        ax.bar(x, hist["counts"], color="#4c72b0")
        step = max(1, len(x) // 12)  # keep tick labels readable for the 41 word bins
        ax.set_xticks(x[::step], [hist["labels"][i] for i in x[::step]], rotation=45, ha="right")
        ax.set_title(f"{title}, n={sum(hist['counts'])}")
        ax.set_ylabel("samples")
        fig.tight_layout()
        path = out / f"{name}.png"
        tmp = out / f".{name}.png.tmp"
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
        files.append(path.name)
    return files
