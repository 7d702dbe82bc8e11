"""Reading shards for the data tools: shard specs, per-sample tar access, staged output dirs.

Everything here reads lazily: a sample's members are located by their tar headers and only
the members a tool asks for are read; nothing is ever unpickled or extracted to disk.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import re
import shutil
import tarfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from braceexpand import braceexpand
from PIL import Image

from dualenc.data.decode import IMAGE_EXTS
from dualenc.data.sources import REMOTE_PREFIXES, expand_urls

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
    """One sample of a shard: its members' tar headers; data is read only on request.

    Valid only while the iteration that produced it is at this sample (the tar stays open).
    """

    key: str
    shard: str
    members: dict[str, tarfile.TarInfo]
    _tar: tarfile.TarFile = field(repr=False)

    @property
    def image_ext(self) -> str | None:
        """The first image extension present (jpg, jpeg, png, webp), as the training loader picks it."""
        return next((e for e in IMAGE_EXTS if e in self.members), None)

    def open(self, ext: str) -> IO[bytes]:
        """A seekable file object over member ``key.ext`` (nothing is read until used)."""
        f = self._tar.extractfile(self.members[ext])
        if f is None:  # only regular files are collected, so this is a corrupt header
            raise OSError(f"{self.shard}: member {self.key}.{ext} has no data")
        return f

    def read(self, ext: str) -> bytes:
        return self.open(ext).read()

    def read_all(self) -> dict[str, bytes]:
        return {ext: self.read(ext) for ext in self.members}

    def caption(self, ext: str = "txt") -> tuple[str | None, str | None]:
        """(stripped caption, None) or (None, reason) with reason missing/non_utf8/empty_caption."""
        if ext not in self.members:
            return None, "missing_caption"
        try:
            text = self.read(ext).decode("utf-8").strip()
        except UnicodeDecodeError:
            return None, "non_utf8_caption"
        return (text, None) if text else (None, "empty_caption")


def iter_tar_samples(paths: Iterable[str]) -> Iterator[TarSample]:
    """Yield the samples of each tar in order; members of one sample are consecutive (WebDataset).

    Random-access mode: iterating reads the headers only, so members nobody asks for are
    skipped with a seek, never read. Non-file members and names without an extension are ignored.
    """
    for path in paths:
        with tarfile.open(path, mode="r:*") as tar:
            key: str | None = None
            members: dict[str, tarfile.TarInfo] = {}
            for info in tar:
                parts = split_member_name(info.name) if info.isfile() else None
                if parts is None:
                    continue
                k, ext = parts
                if k != key:
                    if key is not None:
                        yield TarSample(key, path, members, tar)
                    key, members = k, {}
                members[ext] = info
            if key is not None:
                yield TarSample(key, path, members, tar)


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


def copy_sample(writer: ShardWriter, sample: TarSample, key: str | None = None) -> None:
    """Write all of ``sample``'s members byte for byte (never decoded, never unpickled)."""
    data = sample.read_all()
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        check_output_dir(out, overwrite=overwrite, marker=marker, inputs=inputs)  # may have appeared meanwhile
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except OSError:
                os.replace(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
