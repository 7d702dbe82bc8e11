"""Atomic WebDataset shard writer.

Shards use the img2dataset / WebDataset layout: a plain tar where all members of one sample
share a key (``000123.jpg``, ``000123.txt``, ...). Each shard is written under a hidden
temporary name and renamed into place only once it is complete and fsynced, so a crash never
leaves a truncated shard under a name a loader would pick up.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from PIL import Image

from dualenc.fileio import fsync_dir, write_json_atomic

__all__ = ["SIZES_FILE", "ShardWriter", "encode_image", "write_json_atomic"]

SIZES_FILE = "sizes.json"

# PIL format name for each supported image extension.
_IMAGE_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}

ExtraValue = bytes | str | dict | int


def encode_image(image: Image.Image, image_ext: str = "jpg", *, quality: int = 90) -> bytes:
    """Encode a PIL image as ``image_ext`` (jpg/jpeg/png/webp)."""
    fmt = _IMAGE_FORMATS.get(image_ext.lower())
    if fmt is None:
        raise ValueError(f"unsupported image_ext {image_ext!r}; use one of {sorted(_IMAGE_FORMATS)}")
    if fmt == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")  # JPEG has no alpha / palette
    buf = io.BytesIO()
    kwargs = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _encode_extra(key: str, ext: str, value: ExtraValue) -> bytes:
    # bool is an int subclass; "True" would be a surprising payload, so reject it explicitly.
    if isinstance(value, bool):
        raise TypeError(f"extra {key}.{ext}: bool is not supported; pass int(value) or a str")
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, int):
        return str(value).encode("utf-8")
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")
    raise TypeError(
        f"extra {key}.{ext}: unsupported type {type(value).__name__}; use bytes, str, dict or int"
    )


class ShardWriter:
    """Write samples into ``{prefix}-{index:05d}.tar`` (or ``name_format``) shards, atomically, one shard at a time.

    Use as a context manager. On a clean exit ``sizes.json`` ({shard name: sample count}) is
    written, merged with any existing one. If the block raises, the shard in progress is
    discarded (its temporary file removed); shards finished before that stay and are listed.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        prefix: str = "shard",
        max_count: int = 1000,
        max_bytes: int = 1 << 30,
        start_index: int = 0,
        name_format: str | None = None,
    ) -> None:
        if max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {max_count}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        if not prefix or "/" in prefix:
            raise ValueError(f"prefix {prefix!r} must be a non-empty file name without '/'")
        # e.g. "{index:05d}.tar" (img2dataset) or "{index}.tar" (CLIP_benchmark); overrides prefix.
        if name_format is not None and ("{index" not in name_format or "/" in name_format
                                        or not name_format.endswith(".tar")):
            raise ValueError(f"name_format {name_format!r} must hold '{{index}}', end in .tar and have no '/'")
        self.name_format = name_format
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._index = start_index
        self._keys: set[str] = set()
        self._sizes: dict[str, int] = {}
        self._shards: list[str] = []
        self._count = 0
        self._closed = False
        # State of the shard in progress.
        self._file: BinaryIO | None = None
        self._tar: tarfile.TarFile | None = None
        self._tmp_path: Path | None = None
        self._final_path: Path | None = None
        self._shard_count = 0

    # -- public API -------------------------------------------------------------------------
    @property
    def shards(self) -> list[str]:
        """Paths of the shards finished so far (renamed to their final names)."""
        return list(self._shards)

    @property
    def count(self) -> int:
        """Total number of samples written (including the shard in progress)."""
        return self._count

    def write(
        self,
        key: str,
        image: bytes | Image.Image,
        caption: str | None = None,
        *,
        image_ext: str = "jpg",
        extra: dict[str, ExtraValue] | None = None,
    ) -> None:
        """Add one sample: ``key.<image_ext>``, ``key.txt`` (if caption) and ``key.<ext>`` per extra."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed; open a new writer to add samples")
        self._check_key(key)
        image_ext = image_ext.lower()
        if image_ext not in _IMAGE_FORMATS:
            raise ValueError(
                f"sample {key!r}: unsupported image_ext {image_ext!r}; use one of {sorted(_IMAGE_FORMATS)}"
            )
        if isinstance(image, Image.Image):
            image_bytes = encode_image(image, image_ext)
        elif isinstance(image, (bytes, bytearray, memoryview)):
            image_bytes = bytes(image)
        else:
            raise TypeError(f"sample {key!r}: image must be bytes or a PIL.Image, got {type(image).__name__}")

        members: list[tuple[str, bytes]] = [(image_ext, image_bytes)]
        if caption is not None:
            members.append(("txt", caption.encode("utf-8")))
        for ext, value in (extra or {}).items():
            if not ext or "/" in ext or ext.startswith("."):
                raise ValueError(f"sample {key!r}: bad extra extension {ext!r}; use e.g. 'json' or 'cls'")
            if any(ext == e for e, _ in members):
                raise ValueError(f"sample {key!r}: extension {ext!r} given twice (image/caption/extra)")
            members.append((ext, _encode_extra(key, ext, value)))

        # Roll over *before* adding, so a shard's content (headers, data and the 1 KiB end marker;
        # tarfile's final padding to 10 KiB records aside) stays within max_bytes unless a
        # single sample is larger.
        size = sum(512 + (len(data) + 511) // 512 * 512 for _, data in members)
        if self._tar is not None and (
            self._shard_count >= self.max_count or self._tar.offset + size + 1024 > self.max_bytes
        ):
            self._finish_shard()
        if self._tar is None:
            self._open_shard()
        assert self._tar is not None
        for ext, data in members:
            self._tar.addfile(self._tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
        self._keys.add(key)
        self._shard_count += 1
        self._count += 1

    def close(self) -> None:
        """Finish the current shard and write ``sizes.json``. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._tar is not None:
            self._finish_shard()
        self._write_sizes()

    def abort(self) -> None:
        """Discard the shard in progress; keep (and record) the shards already finished."""
        if self._closed:
            return
        self._closed = True
        self._discard_shard()
        if self._sizes:
            self._write_sizes()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- internals --------------------------------------------------------------------------
    def _check_key(self, key: str) -> None:
        if not isinstance(key, str) or not key:
            raise ValueError(f"sample key must be a non-empty str, got {key!r}")
        if "." in key or "/" in key:
            raise ValueError(
                f"sample key {key!r} contains '.' or '/'; WebDataset splits keys at the first '.', "
                f"so use e.g. {key.replace('.', '_').replace('/', '_')!r}"
            )
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}; keys must be unique within a writer")

    @staticmethod
    def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
        # Fixed metadata so identical input gives byte-identical shards.
        info = tarfile.TarInfo(name)
        info.size = size
        info.mtime = 0
        info.mode = 0o444
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.type = tarfile.REGTYPE
        return info

    def _open_shard(self) -> None:
        name = (self.name_format.format(index=self._index) if self.name_format
                else f"{self.prefix}-{self._index:05d}.tar")
        self._final_path = self.out_dir / name
        self._tmp_path = self.out_dir / f".{name}.tmp"
        self._file = open(self._tmp_path, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self._shard_count = 0

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._file is not None
        assert self._tmp_path is not None and self._final_path is not None
        self._tar.close()  # writes the end-of-archive blocks; leaves the file open
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp_path, self._final_path)
        fsync_dir(self.out_dir)
        self._sizes[self._final_path.name] = self._shard_count
        self._shards.append(str(self._final_path))
        self._tar = self._file = None
        self._tmp_path = self._final_path = None
        self._index += 1

    def _discard_shard(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tmp_path is not None:
            self._tmp_path.unlink(missing_ok=True)
        self._tar = self._file = None
        self._tmp_path = self._final_path = None

    def _write_sizes(self) -> None:
        path = self.out_dir / SIZES_FILE
        sizes: dict[str, int] = {}
        if path.exists():
            try:
                with open(path, encoding="utf-8") as f:
                    sizes = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"cannot merge into {path}: {e}; fix or delete that file and rerun") from e
            if not isinstance(sizes, dict):
                raise ValueError(f"{path} is not a JSON object; fix or delete that file and rerun")
        sizes.update(self._sizes)
        write_json_atomic(path, sizes)
