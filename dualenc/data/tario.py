"""The one safe shard reader: tar shards as streams of raw samples, never extracting or decoding.

Python's tarfile reads a tar cut at a header boundary as a shorter, valid archive (it stops at the
first empty block) and cannot seek past a member without the object that read its header, so the
headers are walked here (parsed by ``tarfile.TarInfo.frombuf``): a shard must end with its
end-of-archive marker, members must lie inside the file, and a local shard's unwanted members (and
whole samples nobody asks for, on resume) are passed with a seek, never read.

A shard is a sequence of *slots*, one per sample key in it (members of a sample are adjacent, as
img2dataset and webdataset write them). A slot is a dict ``{"__key__", "__url__", ext: bytes...}``;
``"__skipped__"`` holds skip reasons to count for it and ``"__drop__"`` marks a slot with no sample
(a duplicate key, the part of a shard lost to truncation). With the shard's expected sample count
known (``sizes.json``/``_stats.json``) a shard has exactly that many slots, so a resumed stream can
replay the shuffle from counts alone.

A tar has no index, so reaching a shard's last samples walks all its headers. The training stream
therefore caches, for each local shard it has read whole without a single skip, where each slot
begins (``slot_index``: 8 bytes a sample, in a cache folder, keyed by the shard's path, size and
mtime); a resume then seeks straight to the samples its shuffle buffer holds (``read_slots``) and to
where it goes on (``iter_slots(first=...)``). A shard without an index, or changed since (a
warning), is walked as before: the index only ever saves time, the walk is always right.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import subprocess
import tarfile
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator

import numpy as np

from dualenc.data.sources import REMOTE_PREFIXES
from dualenc.fileio import shared_file_mode

Raw = dict
BLOCK = 512
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_ZERO = bytes(BLOCK)


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
    return open(os.path.expanduser(url), "rb", buffering=1 << 16)


def split_name(name: str) -> tuple[str, str]:
    """``dir/abc.def.jpg`` -> (``dir/abc``, ``def.jpg``): webdataset's key/extension convention."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :].lower()


def _octal(field: bytes) -> int:
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def parse_header(buf: bytes) -> tuple[str, int, bytes]:
    """(name, size, type) of a 512-byte tar header; raises CorruptTar on a bad checksum.

    The common ustar/pax/GNU headers are parsed here (per sample, tarfile's full TarInfo.frombuf
    is the slowest part of walking a shard); anything else (base-256 sizes) goes to tarfile.
    """
    try:
        want = _octal(buf[148:156])
    except ValueError:
        raise CorruptTar("bad tar header checksum field") from None
    got = sum(buf) - sum(buf[148:156]) + 8 * 32
    if got != want:
        try:  # signed-char checksums of old tars, and anything unusual: let tarfile decide
            info = tarfile.TarInfo.frombuf(buf, "utf-8", "surrogateescape")
        except tarfile.TarError as e:
            raise CorruptTar(f"bad tar header: {e}") from None
        return info.name, info.size, info.type
    if buf[124] & 0x80:  # base-256 size (members over 8 GiB)
        info = tarfile.TarInfo.frombuf(buf, "utf-8", "surrogateescape")
        return info.name, info.size, info.type
    try:
        size = _octal(buf[124:136])
    except ValueError:
        raise CorruptTar("bad tar header size field") from None
    name = buf[:100].split(b"\0", 1)[0]
    if buf[257:263] == b"ustar\0":  # POSIX ustar: a prefix field before the name
        prefix = buf[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape"), size, buf[156:157]


class CorruptTar(Exception):
    """The archive is cut short or has a bad header; ``in_member`` when a member's data is cut."""

    def __init__(self, why: str, in_member: bool = False) -> None:
        super().__init__(why)
        self.in_member = in_member


@dataclass
class Member:
    name: str
    offset: int  # of its data
    size: int
    cut: bool = False  # its data runs past the end of the file
    header: int = -1  # where its headers begin (a pax or long-name header before its own, if any)


class TarWalker:
    """Walks tar headers; ``seekable`` files skip data with a seek, streams read and drop it."""

    def __init__(self, f: IO[bytes], seekable: bool, size: int | None = None) -> None:
        self.f, self.seekable, self.size = f, seekable, size
        self.pos = 0
        self.end: int | None = None  # offset of the end-of-archive marker, once reached

    def _read(self, n: int) -> bytes:
        data = self.f.read(n)
        self.pos += len(data)
        return data

    def _skip_to(self, offset: int) -> None:
        if self.seekable:
            self.f.seek(offset)
            self.pos = offset
            return
        while self.pos < offset:
            if not self._read(min(offset - self.pos, 1 << 20)):
                raise CorruptTar("archive ends inside a member", in_member=True)

    def read(self, m: Member) -> bytes:
        """The data of ``m``; on a stream only the member just returned by ``next`` can be read."""
        self._skip_to(m.offset)
        data = self._read(m.size)
        if len(data) != m.size:
            raise CorruptTar("archive ends inside a member", in_member=True)
        return data

    def _block_data(self, size: int) -> bytes:
        data = self._read(size)
        if len(data) != size:
            raise CorruptTar("archive ends inside an extended header", in_member=True)
        self._skip_to(self.pos + (-size) % BLOCK)
        return data

    def members(self, start: int = 0, fast: bool = True) -> Iterator[Member]:
        """Regular-file members in order from the header at ``start``; raises CorruptTar on truncation
        or a missing end marker. ``fast``: a local shard's headers come from ``indexed_members``
        (128 at a time: off for reading a single slot)."""
        nxt = start
        if fast and self.seekable and self.size is not None:
            for listed, nxt, end in indexed_members(self.f, self.size, start=start):
                yield from listed
                if end:
                    self.end = nxt
                    return
        name = size = None  # from a preceding pax / GNU long-name header
        first = None  # where the current member's headers began
        while True:
            self._skip_to(nxt)
            if first is None:
                first = nxt
            buf = self._read(BLOCK)
            if len(buf) < BLOCK:
                raise CorruptTar("archive ends without its end-of-archive marker")
            if buf.count(0) == BLOCK:
                self.end = nxt
                return  # end-of-archive marker
            h_name, h_size, h_type = parse_header(buf)
            data_at = self.pos
            if size is not None:
                h_size = size
            nxt = data_at + h_size + (-h_size) % BLOCK
            if h_type == tarfile.XHDTYPE:  # pax header: path/size of the next member
                records = _pax(self._block_data(h_size))
                name, size = records.get("path", name), (int(records["size"]) if "size" in records else None)
                nxt = self.pos
                continue
            if h_type == tarfile.GNUTYPE_LONGNAME:
                name = self._block_data(h_size).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                nxt = self.pos
                continue
            member_name = name if name is not None else h_name
            name = size = None
            cut = self.size is not None and data_at + h_size > self.size
            if h_type in _FILE_TYPES:
                yield Member(member_name, data_at, h_size, cut, first)
            first = None
            if cut:
                raise CorruptTar("archive ends inside a member", in_member=True)


def indexed_members(f: IO[bytes], size: int, chunk: int = 128,
                    start: int = 0) -> Iterator[tuple[list[Member], int, bool]]:
    """A local shard's regular-file members from the header at ``start``, ``chunk`` headers at a time,
    each chunk with the offset of the next header and whether that is the end-of-archive marker. Stops early where anything is unusual (pax or
    GNU long names, base-256 sizes, truncation, a bad checksum): ``TarWalker`` walks on carefully
    from the last offset.

    Headers are read from a memory map (only their pages are touched) with the least work per
    header, and a chunk's checksums are verified in one numpy pass before it is handed on: ~2-3x
    faster than the careful walk, which is most of what a resume costs (it reads back the shards
    the shuffle buffer holds).
    """
    if size < BLOCK:
        return
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = np.frombuffer(mm, np.uint8)
        off = start
        try:
            while True:
                offsets: list[int] = []
                sums: list[int] = []
                out: list[Member] = []
                end = False
                while len(offsets) < chunk:
                    if off + BLOCK > size:
                        return
                    h = mm[off : off + BLOCK]
                    if h == _ZERO:
                        end = True
                        break
                    kind = h[156:157]
                    if kind in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME,
                                tarfile.GNUTYPE_LONGLINK) or h[124] & 0x80:
                        return
                    try:
                        n = _octal(h[124:136])
                        sums.append(_octal(h[148:156]))
                    except ValueError:
                        return
                    offsets.append(off)
                    if off + BLOCK + n > size:
                        return
                    if kind in _FILE_TYPES:
                        name = h[:100].split(b"\0", 1)[0]
                        if h[257:263] == b"ustar\0":
                            prefix = h[345:500].split(b"\0", 1)[0]
                            if prefix:
                                name = prefix + b"/" + name
                        out.append(Member(name.decode("utf-8", "surrogateescape"), off + BLOCK, n, False, off))
                    off += BLOCK + n + (-n) % BLOCK
                if offsets:
                    blocks = view[np.asarray(offsets)[:, None] + np.arange(BLOCK)]
                    got = blocks.sum(1, dtype=np.int64) - blocks[:, 148:156].sum(1, dtype=np.int64) + 8 * 32
                    if not np.array_equal(got, np.asarray(sums)):
                        return
                yield out, off, end
                if end:
                    return
        finally:
            del view  # the map cannot close while a view of it lives


def _pax(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


# -- slot indexes: where each slot of a local shard begins, so a resume seeks instead of walking ----
INDEX_ENV = "DUALENC_TAR_INDEX"
_write_failed = False  # warn once per process when the cache folder is not writable


def index_dir() -> Path | None:
    """The folder of cached slot indexes: ``$DUALENC_TAR_INDEX`` (``off`` disables them), else
    ``$XDG_CACHE_HOME/dualenc/tar-index`` (``~/.cache/...``). Never beside the shards: nothing the
    user gave is modified."""
    value = os.environ.get(INDEX_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "0", "off", "none") else Path(value).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dualenc" / "tar-index"


def _local_path(url: str) -> str | None:
    if url.startswith(("pipe:", *REMOTE_PREFIXES)):
        return None
    path = os.path.abspath(os.path.expanduser(url))
    return path if os.path.isfile(path) else None


def _index_name(path: str, st: os.stat_result) -> tuple[str, str]:
    """(file name, its shard's prefix): keyed by the shard's absolute path (not resolved: each name
    is indexed by its own walk), its size and its mtime, so a shard changed since has no index."""
    digest = hashlib.sha1(path.encode("utf-8", "surrogateescape")).hexdigest()[:24]
    return f"{digest}-{st.st_size}-{st.st_mtime_ns}.npy", digest


def slot_index(url: str, expected: int | None = None) -> np.ndarray | None:
    """Where each slot of the local shard at ``url`` begins, and its end-of-archive marker (n + 1
    offsets), from the cache: written by ``iter_slots(..., record=True)`` after a whole walk of the
    shard in which every slot was a readable sample with nothing skipped. None without one; a shard
    whose size or mtime changed since it was indexed gets a warning (and is walked)."""
    folder, path = index_dir(), _local_path(url)
    if folder is None or path is None:
        return None
    name, digest = _index_name(path, os.stat(path))
    try:
        index = np.load(folder / name, allow_pickle=False)
    except FileNotFoundError:
        stale = list(folder.glob(f"{digest}-*.npy")) if folder.is_dir() else []
        if stale:
            warnings.warn(f"{url} changed since its slot index was written (its size or mtime differ): "
                          "reading its headers to find the samples to resume from", stacklevel=2)
            for old in stale:
                with contextlib.suppress(OSError):
                    old.unlink()
        return None
    except (OSError, ValueError):
        return None  # unreadable: the walk is always right
    n = len(index) - 1
    if (index.ndim != 1 or index.dtype.kind not in "iu" or n < 1 or (expected is not None and n != expected)
            or (np.diff(index) <= 0).any() or index[0] < 0 or index[-1] + BLOCK > os.stat(path).st_size):
        return None
    return index.astype(np.int64)


def _save_index(path: str, st: os.stat_result, offsets: list[int]) -> None:
    global _write_failed
    folder = index_dir()
    if folder is None:
        return
    name, digest = _index_name(path, st)
    if (folder / name).exists():
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob(f"{digest}-*.npy"):  # of an older version of the shard
            with contextlib.suppress(OSError):
                old.unlink()
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{digest}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, np.asarray(offsets, dtype=np.int64), allow_pickle=False)
            os.chmod(tmp, shared_file_mode())
            os.replace(tmp, folder / name)  # workers indexing the same shard: the last rename wins
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as e:
        if not _write_failed:
            _write_failed = True
            warnings.warn(f"cannot write shard slot indexes to {folder} ({e}): a resume will walk the headers "
                          f"of the shards it reads back; set {INDEX_ENV} to a writable folder (or to off)",
                          stacklevel=2)


def read_slots(url: str, wanted: Callable[[str], bool], indices: list[int], index: np.ndarray,
               opener: Callable[[str], IO[bytes]] = open_shard) -> Iterator[tuple[int, Raw]]:
    """Slots ``indices`` (ascending) of a shard with a ``slot_index``: a seek to each, then its own
    headers (and the next slot's first), never the headers before it."""
    with opener(url) as f:
        walker = TarWalker(f, seekable=True, size=os.fstat(f.fileno()).st_size)
        for i in indices:
            end, slot = int(index[i + 1]), {"__url__": url}
            for m in walker.members(int(index[i]), fast=False):
                if m.header >= end:
                    break
                key, ext = split_name(m.name)
                slot.setdefault("__key__", key)
                if wanted(m.name) and ext not in slot:
                    slot[ext] = walker.read(m)
            yield i, slot


def _drop(key: str, url: str, **reasons: int) -> Raw:
    return {"__key__": key, "__url__": url, "__skipped__": dict(reasons), "__drop__": True}


def iter_slots(url: str, wanted: Callable[[str], bool], expected: int | None = None,
               select: Callable[[int], bool] | None = None,
               opener: Callable[[str], IO[bytes]] = open_shard, first: int = 0,
               index: np.ndarray | None = None, record: bool = False) -> Iterator[tuple[int, Raw]]:
    """``(index, slot)`` for each slot of the shard at ``url`` (see the module docstring).

    Only members ``wanted(name)`` accepts are read, only for slots ``select(index)`` accepts (all by
    default; the others come without data). With ``expected`` the shard yields exactly that many
    slots: missing ones are dropped slots counted ``missing_sample`` and samples beyond the count
    are not read (counted ``beyond_expected_count`` once). A shard cut short or with a bad header,
    or without its end-of-archive marker, counts ``corrupt_tar`` once; a key seen twice is a dropped
    ``duplicate_key`` slot, a member seen twice in a sample counts ``duplicate_member`` (the first
    is kept).

    ``first`` (with the shard's ``slot_index``) starts at that slot with a seek: the shard was
    indexed clean, so no key before it can repeat. ``record``: after a whole walk of a local shard
    in which nothing was skipped, cache its slot index (for resumes).
    """
    seen: set[str] = set()
    n = first  # slots yielded
    cur: Raw | None = None  # the sample being collected (yielded once the next one starts)
    cur_keep = False
    if first and index is None:
        raise ValueError("iter_slots: first needs the shard's slot index")
    start = int(index[first]) if first else 0
    starts: list[int] = []  # where each slot begins, to record
    clean, whole = True, False

    def close(sample: Raw, keep: bool) -> tuple[int, Raw]:
        nonlocal n, clean
        key = sample["__key__"]
        if key in seen:
            sample = _drop(key, url, duplicate_key=1)
        seen.add(key)
        clean = clean and "__skipped__" not in sample
        n += 1
        if not keep and not sample.get("__drop__"):
            sample = {"__key__": key, "__url__": url, **({"__skipped__": sample["__skipped__"]}
                                                          if "__skipped__" in sample else {})}
        return n - 1, sample

    def note(sample: Raw, reason: str) -> None:
        sample.setdefault("__skipped__", {})
        sample["__skipped__"][reason] = sample["__skipped__"].get(reason, 0) + 1

    bad, in_member = False, True
    st: os.stat_result | None = None
    try:
        with opener(url) as f:
            local = not url.startswith(REMOTE_PREFIXES) and os.path.isfile(os.path.expanduser(url))
            st = os.fstat(f.fileno()) if local else None
            walker = TarWalker(f, seekable=local, size=st.st_size if st else None)
            for m in walker.members(start):
                key, ext = split_name(m.name)
                if cur is None or key != cur["__key__"]:
                    if cur is not None:
                        full = expected is not None and n + 1 >= expected
                        if full:  # more samples than counted: the stream keeps to the count
                            note(cur, "beyond_expected_count")
                        yield close(cur, cur_keep)
                        cur = None
                        if full:
                            break
                    if expected is not None and n >= expected:
                        break
                    cur = {"__key__": key, "__url__": url}
                    cur_keep = select is None or select(n)
                    starts.append(m.header)
                if m.cut:
                    raise CorruptTar("archive ends inside a member", in_member=True)
                if not cur_keep or not wanted(m.name):
                    continue
                if ext in cur:
                    note(cur, "duplicate_member")
                    continue
                cur[ext] = walker.read(m)
            else:
                whole = True
            if cur is not None:
                yield close(cur, cur_keep)
                cur = None
    except (CorruptTar, OSError, EOFError) as e:
        bad, in_member = True, getattr(e, "in_member", True)
    if (record and whole and clean and st is not None and not first and starts
            and (expected is None or n == expected)):
        _save_index(os.path.abspath(os.path.expanduser(url)), st, starts + [walker.end])
    if bad:
        if cur is not None and not in_member:
            note(cur, "corrupt_tar")  # cut at a header boundary: the last sample's members are whole
            yield close(cur, cur_keep)
        elif expected is None or n < expected:  # cut inside a member: the sample being read is lost
            yield close(_drop(cur["__key__"] if cur else f"{url}#{n}", url, corrupt_tar=1), True)
    while expected is not None and n < expected:
        yield close(_drop(f"{url}#{n}", url, missing_sample=1), True)


def iter_samples(url: str, wanted: Callable[[str], bool], skipped: Counter[str],
                 opener: Callable[[str], IO[bytes]] = open_shard) -> Iterator[Raw]:
    """The readable samples of one shard (no dropped slots), counting skip reasons into ``skipped``."""
    for _, slot in iter_slots(url, wanted, opener=opener):
        skipped.update(slot.pop("__skipped__", {}))
        if not slot.pop("__drop__", False):
            yield slot


def count_slots(url: str) -> int:
    """Slots of a shard whose count is not recorded (headers only, for a local shard)."""
    return sum(1 for _ in iter_slots(url, lambda name: False))
