"""Reading shards for the data tools: shard specs, per-sample tar access, staged output dirs.

Samples come from the training loader's reader (``dualenc.data.tario``), with its skip reasons;
nothing is ever unpickled or extracted to disk.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from braceexpand import braceexpand
from PIL import Image

from dualenc.data.decode import IMAGE_EXTS
from dualenc.data.sources import REMOTE_PREFIXES, expand_urls
from dualenc.data.tario import iter_samples
from dualenc.fileio import staged_directory

from .writer import ShardWriter

# PIL's own decompression-bomb limit, as in dualenc.data.decode.SampleDecoder.
MAX_PIXELS = 89_478_485

# WebDataset's split of a member name into (key, extension): the key is everything up to the
# first '.' of the base name (webdataset.tariterators.base_plus_ext).
_MEMBER_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


class MissingDependencyError(ImportError):
    """An optional package a command needs is not installed; the message names the install."""


def require(module: str, pip_name: str, purpose: str, alternative: str = ""):  # -> module
    """Import ``module`` lazily, or fail with a message naming ``pip install pip_name``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        alt = f", or {alternative}" if alternative else ""
        raise MissingDependencyError(
            f"{purpose} needs {pip_name}, which is not installed; run `pip install {pip_name}`{alt}"
        ) from e


def expand_shards(shards: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Resolve shard specs to a list of existing local tar files.

    Uses :func:`dualenc.data.sources.expand_urls` (the spec syntax of training configs: files,
    directories, globs, brace patterns, ``::``-separated parts), but stricter, since a data tool
    that silently skipped a shard would produce a silently incomplete dataset: every file a
    brace pattern names must exist, and remote URLs are refused (download them first).
    """
    specs = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    parts = [p for spec in specs for p in os.fspath(spec).split("::") if p]
    if not parts:
        raise FileNotFoundError("no shards given; pass a file, directory, glob or brace pattern")
    paths: list[str] = []
    for part in parts:
        if part.startswith(REMOTE_PREFIXES):
            raise ValueError(f"shard {part!r} is remote; the data tools read local shards only, so download it first")
        for item in braceexpand(os.path.expanduser(part)):
            if not glob.has_magic(item) and not os.path.exists(item):
                raise FileNotFoundError(f"shard {item!r} (from {part!r}) does not exist; check the path or pattern")
        try:
            found = [p for p in expand_urls([part]) if os.path.isfile(p)]
        except FileNotFoundError:
            found = []
        if not found:
            raise FileNotFoundError(f"shards pattern {part!r} matched no shard file; check the path or pattern")
        paths.extend(found)
    return paths


def split_member_name(name: str) -> tuple[str, str] | None:
    """``"dir/000001.seg.jpg"`` -> ``("dir/000001", "seg.jpg")``; None for names without an extension."""
    m = _MEMBER_RE.match(name)
    return (m.group(1), m.group(2)) if m else None


@dataclass
class TarSample:
    """One sample of a shard, read by the training loader's reader (``dualenc.data.tario``): its
    members' bytes by extension (never decoded, never unpickled)."""

    key: str
    shard: str
    members: dict[str, bytes]

    @property
    def image_ext(self) -> str | None:
        """The first image extension present (jpg, jpeg, png, webp), as the training loader picks it."""
        return next((e for e in IMAGE_EXTS if e in self.members), None)

    def open(self, ext: str) -> IO[bytes]:
        """A seekable file object over member ``key.ext``."""
        return io.BytesIO(self.members[ext])

    def read(self, ext: str) -> bytes:
        return self.members[ext]

    def read_all(self) -> dict[str, bytes]:
        return dict(self.members)

    def caption(self, ext: str = "txt") -> tuple[str | None, str | None]:
        """(stripped caption, None) or (None, reason) with reason missing/non_utf8/empty_caption."""
        if ext not in self.members:
            return None, "missing_caption"
        try:
            text = self.read(ext).decode("utf-8").strip()
        except UnicodeDecodeError:
            return None, "non_utf8_caption"
        return (text, None) if text else (None, "empty_caption")


def iter_tar_samples(paths: Iterable[str], skipped: Counter[str] | None = None,
                     wanted: Callable[[str], bool] = lambda name: True) -> Iterator[TarSample]:
    """Yield the samples of each tar in order through the one shard reader every command uses.

    Members of a sample are consecutive (WebDataset); members ``wanted`` rejects are passed with a
    seek, never read. A truncated tar, one without its end-of-archive marker or with a bad header
    (``corrupt_tar``), a key seen twice in a shard (``duplicate_key``) and a member seen twice
    (``duplicate_member``, the first kept) are counted in ``skipped``, as the training loader does.
    Members without an extension are ignored.
    """
    counts: Counter[str] = skipped if skipped is not None else Counter()
    for path in paths:
        for sample in iter_samples(path, wanted, counts):
            members = {ext: data for ext, data in sample.items() if not ext.startswith("__") and ext}
            yield TarSample(str(sample["__key__"]), path, members)


def decode_image(f: IO[bytes] | bytes) -> tuple[int, int]:
    """(width, height) after a full decode; raises on truncated, corrupt or decompression-bomb images."""
    w, h = image_size(f)
    fp = io.BytesIO(f) if isinstance(f, (bytes, bytearray)) else f
    fp.seek(0)
    with Image.open(fp) as img:
        img.load()  # every pixel: a truncated JPEG fails here, not in training
    return w, h


def image_size(f: IO[bytes] | bytes) -> tuple[int, int]:
    """(width, height) from the image header only; raises on unreadable or decompression-bomb images."""
    fp = io.BytesIO(f) if isinstance(f, (bytes, bytearray)) else f
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(fp) as img:  # lazy: parses the header, decodes no pixels
            w, h = img.size
    if w < 1 or h < 1 or w * h > MAX_PIXELS:
        raise ValueError(f"bad image size {w}x{h}")
    return w, h


def copy_sample(writer: ShardWriter, sample: TarSample, key: str | None = None,
                keep: Iterable[str] | None = None) -> None:
    """Write ``sample``'s members (only the image and extensions in ``keep``, if given) byte for
    byte (never decoded, never unpickled)."""
    data = sample.read_all()
    if keep is not None:
        keep = set(keep) | {sample.image_ext}
        data = {ext: v for ext, v in data.items() if ext in keep}
    image_ext = sample.image_ext
    if image_ext is None:
        raise ValueError(f"{sample.shard}: sample {sample.key!r} has no image member")
    image = data.pop(image_ext)
    writer.write(key or sample.key, image, None, image_ext=image_ext, extra=data)


def check_key(key: str, shard: str, seen: set[str]) -> None:
    """Fail fast (before any output) on keys a ShardWriter would reject mid-way."""
    if "/" in key:
        raise ValueError(f"{shard}: sample key {key!r} contains '/'; the data tools write flat keys, "
                         "so rewrite the shard with keys without directories")
    if key in seen:
        raise ValueError(f"duplicate sample key {key!r} (again in {shard}); keys must be unique across the "
                         "input shards, so process shards with clashing keys separately")
    seen.add(key)


# -- output directories ----------------------------------------------------------------------
def check_output_dir(out: Path, *, overwrite: bool, marker: str, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """``out`` may be missing, empty, or (with overwrite) an earlier output of the same tool.

    Never lets an output directory contain (and so later delete or shadow) an input.
    """
    resolved = out.resolve()
    for p in inputs:
        rp = Path(p).resolve()
        if rp == resolved or resolved in rp.parents:
            raise ValueError(f"output directory {out} contains the input {p}; choose an output directory "
                             "outside the input (tools never modify their input)")
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; choose another output path")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{out} is not empty; pass overwrite=True (CLI: --overwrite) or choose another directory")
    if not (out / marker).is_file():
        raise FileExistsError(f"{out} is not empty and has no {marker}, so it is not an earlier output of this "
                              "tool; refusing to delete it. Choose another directory")


@contextlib.contextmanager
def staged_output(out_dir: str | os.PathLike, *, overwrite: bool, marker: str,
                  inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a hidden sibling directory to write into; on success it replaces ``out_dir``.

    So ``out_dir`` is either the complete new output or left as it was (an interrupted run
    leaves no half-written output under the real name).
    """
    out = Path(out_dir)
    inputs = list(inputs)
    check_output_dir(out, overwrite=overwrite, marker=marker, inputs=inputs)
    with staged_directory(out) as tmp:
        yield tmp
        check_output_dir(out, overwrite=overwrite, marker=marker, inputs=inputs)  # may have appeared meanwhile
