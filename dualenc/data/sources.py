"""Turning a shard spec (paths, brace patterns, globs, directories, pipe:/URLs) into a list of URLs."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

from braceexpand import braceexpand

USABLE_FILE = "usable.json"  # shard name -> samples that decode (written by `dualenc-data stats`)
REMOTE_PREFIXES = ("pipe:", "s3://", "gs://", "gcs://", "http://", "https://", "hf://", "az://")


def expand_urls(spec: str | list[str]) -> list[str]:
    """Expand ``spec`` into shard URLs; local patterns must match files.

    ``spec`` is a list, or a string of ``::``-separated parts; each part is a brace pattern
    (``dir/{00000..00099}.tar``), a glob, a directory (all ``*.tar`` in it) or a remote URL / ``pipe:``
    command (passed through as is; read lazily by webdataset/fsspec).
    """
    parts = spec if isinstance(spec, list) else [p for p in str(spec).split("::") if p]
    urls: list[str] = []
    for part in parts:
        if part.startswith(REMOTE_PREFIXES):
            urls.extend(braceexpand(part))
            continue
        found: list[str] = []
        for item in braceexpand(os.path.expanduser(part)):
            if os.path.isdir(item):
                found.extend(sorted(glob.glob(os.path.join(glob.escape(item), "*.tar"))))
            elif any(c in item for c in "*?["):
                found.extend(sorted(glob.glob(item)))
            elif os.path.isfile(item):
                found.append(item)
        if not found:
            raise FileNotFoundError(f"shard pattern {part!r} matches no file; check the path, or use a brace "
                                    "pattern like 'data/{00000..00099}.tar', a glob, or a directory of .tar files")
        urls.extend(found)
    return urls


def _listed_counts(urls: list[str], file: str) -> list[tuple[Path | None, int | None]]:
    """Each local shard's count in the JSON ``file`` beside it (read once per folder), with its path."""
    tables: dict[Path, dict[str, int]] = {}
    out: list[tuple[Path | None, int | None]] = []
    for url in urls:
        if url.startswith(REMOTE_PREFIXES):
            out.append((None, None))
            continue
        path = Path(url)
        if path.parent not in tables:
            f = path.parent / file
            tables[path.parent] = json.loads(f.read_text()) if f.is_file() else {}
        n = tables[path.parent].get(path.name)
        out.append((path, None if n is None else int(n)))
    return out


def shard_counts(urls: list[str]) -> list[int | None]:
    """Each shard's sample count, from ``sizes.json`` beside it or img2dataset's ``NNNNN_stats.json``
    (``successes``); None where neither says (remote shards, hand-made tars)."""
    out: list[int | None] = []
    for path, n in _listed_counts(urls, "sizes.json"):
        if n is None and path is not None:
            stats = path.with_name(path.name.split(".")[0] + "_stats.json")
            n = json.loads(stats.read_text()).get("successes") if stats.is_file() else None
        out.append(None if n is None else int(n))
    return out


def usable_counts(urls: list[str]) -> list[int | None]:
    """Each shard's usable samples (those training's decoder accepts), from the ``usable.json`` that
    ``dualenc-data stats`` writes beside the shards; None where it does not say."""
    return [n for _, n in _listed_counts(urls, USABLE_FILE)]


def count_samples(urls: list[str]) -> int | None:
    """Samples in ``urls`` (see ``shard_counts``); None unless every shard's count is known."""
    counts = shard_counts(urls)
    return None if None in counts else sum(counts)  # type: ignore[arg-type]
