"""Reading tar shards as streams of raw samples, without extracting or decoding anything."""

from __future__ import annotations

import os
import subprocess
import tarfile
from collections import Counter
from typing import IO, Callable, Iterator

from dualenc.data.sources import REMOTE_PREFIXES


def open_shard(url: str) -> IO[bytes]:
    """A readable byte stream for a local path, a ``pipe:`` command or an fsspec URL (s3://, gs://, http...)."""
    if url.startswith("pipe:"):
        proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE, bufsize=1 << 20)
        return proc.stdout  # type: ignore[return-value]
    if url.startswith(REMOTE_PREFIXES):
        try:
            import fsspec
        except ImportError as e:
            raise ImportError(f"reading {url!r} needs fsspec and its protocol package "
                              "(e.g. `pip install fsspec s3fs` or `gcsfs`)") from e
        return fsspec.open(url, "rb").open()
    return open(os.path.expanduser(url), "rb", buffering=1 << 20)


def split_name(name: str) -> tuple[str, str]:
    """``dir/abc.def.jpg`` -> (``dir/abc``, ``def.jpg``): webdataset's key/extension convention."""
    base = os.path.basename(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return os.path.join(os.path.dirname(name), stem), ext.lower()


def iter_samples(url: str, wanted: Callable[[str], bool], skipped: Counter[str],
                 opener: Callable[[str], IO[bytes]] = open_shard) -> Iterator[dict[str, bytes | str]]:
    """Samples of one shard: ``{"__key__", "__url__", ext: bytes}`` for members ``wanted(name)`` accepts.

    Members of a sample must be adjacent (img2dataset and webdataset write them so). A truncated or
    unreadable shard ends early with ``skipped["corrupt_tar"]``; a key seen twice in a shard is
    dropped with ``skipped["duplicate_key"]``. Unwanted members are never read into memory.
    """
    seen: set[str] = set()
    current: dict[str, bytes | str] | None = None

    def finish(sample: dict[str, bytes | str] | None) -> Iterator[dict[str, bytes | str]]:
        if sample is None:
            return
        key = str(sample["__key__"])
        if key in seen:
            skipped["duplicate_key"] += 1
            return
        seen.add(key)
        if len(sample) > 2:  # more than __key__/__url__: it has members we use
            yield sample

    try:
        with opener(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = split_name(info.name)
                if current is None or key != current["__key__"]:
                    yield from finish(current)
                    current = {"__key__": key, "__url__": url}
                if not wanted(info.name):
                    continue
                f = tar.extractfile(info)
                if f is None:
                    continue
                if ext in current:
                    skipped["duplicate_member"] += 1
                current[ext] = f.read()
    except (tarfile.TarError, EOFError, OSError, ValueError):
        skipped["corrupt_tar"] += 1
        current = None  # the sample being read when the shard broke is incomplete
    yield from finish(current)

