"""Drop training images that near-duplicate an evaluation set (ALIGN removed near-duplicates of
every downstream test image from its training data).

Hash: a 64-bit perceptual hash (pHash: DCT of a 32x32 grey thumbnail, sign of the 8x8 lowest
frequencies against their median). Chosen over dHash because low DCT frequencies are what
survives resizing and JPEG re-encoding (which mostly perturb high frequencies), and a uniform
brightness change moves only the DC term, which the median excludes. dHash compares neighbouring
pixels of a 9x8 thumbnail; in flat regions those differences are near zero, so re-encoding noise
flips their bits. The DCT is a 32x32 matrix product (equal to ``scipy.fft.dctn(x, norm="ortho")``,
checked in the tests), so this needs numpy only.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dualenc.progress import progress, sample_total

from .shards import MAX_PIXELS, TarSample, check_key, check_output_dir, expand_shards, iter_tar_samples, staged_output
from .writer import ShardWriter, write_json_atomic

REPORT_FILE = "dedupe_report.json"
HASH_NAME = "phash64-dct32"
_SIZE = 32  # thumbnail side the DCT runs on
_LOW = 8  # 8x8 lowest frequencies -> 64 bits
_FOLDER_IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix: ``C @ x @ C.T`` is the 2-D DCT of an n x n block."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    c = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    c[0] /= np.sqrt(2.0)
    return c


_DCT = _dct_matrix(_SIZE)


def _load_grey(data: bytes) -> Image.Image:
    """Decode to greyscale safely (decompression bombs refused); JPEGs decode at reduced scale."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > MAX_PIXELS:
            raise ValueError(f"image of {img.width}x{img.height} pixels is too large")
        # JPEG draft mode decodes at 1/2..1/8 scale: several times faster on big photos, and the
        # hash only looks at a 32x32 thumbnail anyway.
        img.draft("L", (4 * _SIZE, 4 * _SIZE))
        return img.convert("L")


def phash(image: Image.Image | bytes) -> int:
    """64-bit perceptual hash of an image (PIL image or encoded bytes), as an int."""
    img = _load_grey(image) if isinstance(image, (bytes, bytearray)) else image.convert("L")
    pixels = np.asarray(img.resize((_SIZE, _SIZE), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT @ pixels @ _DCT.T)[:_LOW, :_LOW].ravel()
    bits = low > np.median(low[1:])  # median without the DC term: brightness-invariant
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)  # numpy 1.x fallback
    return table[x[..., None].view(np.uint8)].sum(axis=-1, dtype=np.uint8)


def hamming_matches(
    queries: np.ndarray, references: np.ndarray, threshold: int, *, max_cells: int = 1 << 22
) -> list[list[tuple[int, int]]]:
    """For each query hash, [(reference index, Hamming distance)] with distance <= threshold, nearest first.

    XOR + popcount over a (chunk x references) block at a time, so memory stays at
    ``max_cells`` 8-byte cells however large the sets are.
    """
    q = np.asarray(queries, dtype=np.uint64)
    r = np.asarray(references, dtype=np.uint64)
    out: list[list[tuple[int, int]]] = [[] for _ in range(len(q))]
    if len(q) == 0 or len(r) == 0:
        return out
    chunk = max(1, max_cells // len(r))
    for start in range(0, len(q), chunk):
        d = _popcount(q[start:start + chunk, None] ^ r[None, :])
        for qi, ri in zip(*np.nonzero(d <= threshold)):
            out[start + int(qi)].append((int(ri), int(d[qi, ri])))
    for hits in out:
        hits.sort(key=lambda t: (t[1], t[0]))
    return out


# -- evaluation set -------------------------------------------------------------------------
def _iter_eval_images(spec: str | os.PathLike) -> Iterator[tuple[str, bytes]]:
    """(key, image bytes) of an eval set: shards, or a folder of image files (e.g. ImageNet val)."""
    p = Path(spec)
    if p.is_dir() and not any(p.glob("*.tar")):
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in _FOLDER_IMAGE_EXTS)
        if not files:
            raise FileNotFoundError(f"eval folder {p} has no .tar shards and no image files; check the path")
        for f in files:
            yield f.relative_to(p).as_posix(), f.read_bytes()
        return
    for sample in iter_tar_samples(expand_shards(spec)):
        ext = sample.image_ext
        if ext is not None:
            yield sample.key, sample.read(ext)  # only the image member is read


def hash_eval_set(specs: Iterable[str | os.PathLike]) -> tuple[list[str], np.ndarray, int]:
    """(keys, hashes, number of unreadable images) of one or more eval sets."""
    keys: list[str] = []
    hashes: list[int] = []
    bad = 0
    for spec in specs:
        for key, data in _iter_eval_images(spec):
            try:
                h = phash(data)
            except Exception:  # noqa: BLE001 - any decoder failure: cannot hash
                bad += 1
                continue
            keys.append(key)
            hashes.append(h)
    return keys, np.array(hashes, dtype=np.uint64), bad


def dedupe_shards(
    train: str | os.PathLike | list[str],
    eval_sets: str | os.PathLike | list[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    threshold: int = 8,
    shard_size: int = 1000,
    prefix: str = "shard",
    batch: int = 512,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Copy ``train`` into ``out_dir`` without samples within ``threshold`` bits of any eval image.

    Eval sets are shard specs or image folders. Train samples whose image cannot be hashed are
    kept (and counted): they are not provably duplicates, and the loader skips corrupt images.
    Samples without any image member are dropped (and counted): a shard sample needs one.
    The report (also ``out_dir/dedupe_report.json``) lists each dropped train key with the eval
    keys it matched and their distances.
    """
    if not 0 <= threshold <= 64:
        raise ValueError(f"threshold must be in [0, 64] bits, got {threshold}")
    specs = [eval_sets] if isinstance(eval_sets, (str, os.PathLike)) else list(eval_sets)
    if not specs:
        raise ValueError("no eval set given; pass at least one eval shard spec or image folder")
    paths = expand_shards(train)
    inputs = [*paths, *(str(s) for s in specs if Path(s).exists())]
    check_output_dir(Path(out_dir), overwrite=overwrite, marker=REPORT_FILE, inputs=inputs)  # before hashing
    eval_keys, eval_hashes, eval_bad = hash_eval_set(specs)
    if len(eval_keys) == 0:
        raise ValueError(f"no readable eval image in {', '.join(map(str, specs))}; check the eval set")

    matches: list[dict[str, Any]] = []
    stats = {"samples": 0, "kept": 0, "dropped": 0, "unhashable": 0, "no_image": 0}
    seen: set[str] = set()
    with staged_output(out_dir, overwrite=overwrite, marker=REPORT_FILE, inputs=inputs) as tmp:
        with ShardWriter(tmp, prefix=prefix, max_count=shard_size) as writer:
            # Buffer a batch of samples (member data in memory) to compare their hashes at once.
            pending: list[tuple[TarSample, dict[str, bytes], int | None]] = []

            def flush() -> None:
                hashed = [i for i, (_, _, h) in enumerate(pending) if h is not None]
                queries = np.array([pending[i][2] for i in hashed], dtype=np.uint64)
                hits = hamming_matches(queries, eval_hashes, threshold)
                dup = {i: h for i, h in zip(hashed, hits) if h}
                for i, (sample, data, _) in enumerate(pending):
                    if i in dup:
                        stats["dropped"] += 1
                        matches.append({
                            "train_key": sample.key,
                            "train_shard": sample.shard,
                            "eval": [{"key": eval_keys[r], "distance": d} for r, d in dup[i]],
                        })
                    else:
                        _write_raw(writer, sample, data)
                        stats["kept"] += 1
                pending.clear()

            for sample in progress(iter_tar_samples(paths), total=sample_total(paths), desc="dedupe", unit="sample"):
                stats["samples"] += 1
                check_key(sample.key, sample.shard, seen)
                ext = sample.image_ext
                if ext is None:  # a shard needs an image member; such a sample is useless anyway
                    stats["no_image"] += 1
                    continue
                data = sample.read_all()  # read once: hashed now, copied if kept
                h: int | None = None
                try:
                    h = phash(data[ext])
                except Exception:  # noqa: BLE001 - any decoder failure: cannot hash
                    stats["unhashable"] += 1
                pending.append((sample, data, h))
                if len(pending) >= batch:
                    flush()
            flush()
        report = {
            "hash": HASH_NAME,
            "threshold": threshold,
            "eval": {"sets": [str(s) for s in specs], "images": len(eval_keys), "unreadable": eval_bad},
            "train": {"shards": paths, **stats},
            "matches": matches,
            "output": {"dir": str(Path(out_dir)), "shards": [Path(p).name for p in writer.shards]},
        }
        write_json_atomic(tmp / REPORT_FILE, report)
    return report


def _write_raw(writer: ShardWriter, sample: TarSample, data: dict[str, bytes]) -> None:
    """Copy a buffered sample (its members as read) byte for byte."""
    data = dict(data)
    ext = sample.image_ext
    assert ext is not None  # samples without an image never get here
    image = data.pop(ext)
    writer.write(sample.key, image, None, image_ext=ext, extra=data)
