"""Build WebDataset shards from an image folder with captions, or a CSV/TSV/parquet table.

Resumable: the input is planned into rows first, and row i always goes to shard i // shard_size
with key ``{i:09d}``, so a rerun after an interruption skips the shards already finished (each
shard is written atomically by ShardWriter) and produces exactly what a clean build would.
Progress and per-shard counts live in ``build_report.json``; a rerun with a different input or
shard size is refused unless asked to overwrite.

Images are stored with their original bytes when they are JPEG, PNG or WebP (extension from
the actual format, not the file name); anything else is re-encoded as JPEG. With
``max_short_side``, larger images are downscaled once here (shorter side to that many pixels,
aspect kept, re-encoded in their own format, JPEG at quality 95), so training never decodes and
resizes more pixels than it uses. Image URLs are downloaded with img2dataset, if installed; this
module never fetches anything itself.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import io
import json
import os
import shutil
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from dualenc.data.decode import SampleDecoder
from dualenc.progress import progress

from .shards import image_size, require, split_member_name
from .writer import SIZES_FILE, ShardWriter, encode_image, write_json_atomic

REPORT_FILE = "build_report.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
URL_PREFIXES = ("http://", "https://")
# Column names tried in order when none is given.
IMAGE_COLUMNS = ("image", "file_name", "filename", "file", "path", "image_path", "url", "image_url")
CAPTION_COLUMNS = ("caption", "text", "alt", "alt_text", "txt", "title")
_KEPT_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # MPO: multi-picture JPEG
_N_EXAMPLES = 20  # skipped rows listed per shard in the report
_DOWNLOAD_ROW_COL = "dualenc_row"


@dataclass(frozen=True)
class Row:
    """One planned sample. ``source`` is recorded in key.json; ``path`` is the local file to read
    (None for URLs); ``problem`` is a reason to skip already known when planning."""

    source: str
    caption: str | None
    path: str | None = None
    problem: str | None = None

    @property
    def is_url(self) -> bool:
        return self.path is None and self.source.startswith(URL_PREFIXES)


class _Skip(Exception):
    """A row that yields no sample; the message is the reason counted in the report."""


# -- planning: inputs -> rows ----------------------------------------------------------------
def read_table(path: str | os.PathLike, *, delimiter: str | None = None) -> tuple[list[str], list[dict[str, Any]]]:
    """(column names, rows) of a CSV/TSV (by extension, or ``delimiter``) or parquet file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"table {p} does not exist; check the path")
    if p.suffix.lower() == ".parquet":
        pq = require("pyarrow.parquet", "pyarrow", f"reading the parquet table {p}",
                     "convert the table to CSV/TSV first")
        table = pq.read_table(p)
        return list(table.column_names), table.to_pylist()
    if delimiter is None:
        delimiter = "\t" if p.suffix.lower() in (".tsv", ".tab") else ","
    # utf-8-sig: tolerate the byte-order mark spreadsheet programs write.
    with open(p, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        rows = list(reader)
        columns = list(reader.fieldnames or [])
    return columns, rows


def _pick_column(columns: list[str], given: str | None, candidates: tuple[str, ...], what: str, option: str,
                 table: Path) -> str:
    if given is not None:
        if given not in columns:
            raise ValueError(f"{table} has no column {given!r} for the {what}; its columns are {columns}. "
                             f"Pass the right name with {option}")
        return given
    found = next((c for c in candidates if c in columns), None)
    if found is None:
        raise ValueError(f"cannot tell which column of {table} holds the {what} (columns: {columns}); "
                         f"pass it with {option}")
    return found


def _caption_cell(value: Any) -> tuple[str | None, str | None]:
    text = "" if value is None else str(value).strip()
    return (text, None) if text else (None, "empty_caption")


def rows_from_table(
    table: str | os.PathLike,
    *,
    image_col: str | None = None,
    caption_col: str | None = None,
    image_root: str | os.PathLike | None = None,
    delimiter: str | None = None,
) -> list[Row]:
    """Rows of a CSV/TSV/parquet table with an image path-or-URL column and a caption column.

    Relative paths are resolved against ``image_root`` (default: the table's folder).
    """
    t = Path(table)
    columns, records = read_table(t, delimiter=delimiter)
    icol = _pick_column(columns, image_col, IMAGE_COLUMNS, "image path or URL", "--image-col", t)
    ccol = _pick_column(columns, caption_col, CAPTION_COLUMNS, "caption", "--caption-col", t)
    # Absolute, so the build's fingerprint does not depend on how the paths were given.
    root = Path(os.path.abspath(image_root if image_root is not None else t.parent))
    rows = []
    for rec in records:
        value = rec.get(icol)
        if isinstance(value, (bytes, bytearray, dict)):
            raise ValueError(f"column {icol!r} of {t} holds embedded image data; build reads image paths or URLs, "
                             "so write the images to files first (or pick the column of paths with --image-col)")
        source = "" if value is None else str(value).strip()
        caption, problem = _caption_cell(rec.get(ccol))
        if not source:
            rows.append(Row("", caption, problem="missing_image"))
        elif source.startswith(URL_PREFIXES):
            rows.append(Row(source, caption, problem=problem))
        elif "://" in source:
            rows.append(Row(source, caption, problem="unsupported_url"))
        else:
            rows.append(Row(source, caption, path=str(root / source), problem=problem))
    return rows


def rows_from_folder(
    images: str | os.PathLike,
    captions: str | os.PathLike | None = None,
    *,
    image_col: str | None = None,
    caption_col: str | None = None,
    delimiter: str | None = None,
) -> tuple[list[Row], dict[str, int]]:
    """Rows of an image folder (searched recursively, in sorted order), and planning counts.

    Captions come from ``captions`` (a CSV/TSV/parquet mapping file name -> caption; names are
    paths relative to the folder, or bare file names when unique) where it has the image, else
    from a ``.txt`` file with the image's stem beside it.
    """
    root = Path(os.path.abspath(images))
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    files = sorted((f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES),
                   key=lambda f: f.relative_to(root).as_posix())
    mapping: dict[str, Any] = {}
    if captions is not None:
        t = Path(captions)
        columns, records = read_table(t, delimiter=delimiter)
        icol = _pick_column(columns, image_col, IMAGE_COLUMNS, "image file name", "--image-col", t)
        ccol = _pick_column(columns, caption_col, CAPTION_COLUMNS, "caption", "--caption-col", t)
        mapping = {str(r.get(icol) or "").strip().removeprefix("./"): r.get(ccol) for r in records}
    names = Counter(f.name for f in files)
    used: set[str] = set()
    rows = []
    for f in files:
        rel = f.relative_to(root).as_posix()
        lookup = rel if rel in mapping else f.name if names[f.name] == 1 and f.name in mapping else None
        if lookup is not None:
            used.add(lookup)
            caption, problem = _caption_cell(mapping[lookup])
        else:
            caption, problem = _sidecar_caption(f)
        rows.append(Row(rel, caption, path=str(f), problem=problem))
    info = {"images": len(files), "captions_without_image": len(set(mapping) - used)}
    return rows, info


def _sidecar_caption(image: Path) -> tuple[str | None, str | None]:
    txt = image.with_suffix(".txt")
    if not txt.is_file():
        return None, "missing_caption"
    try:
        return _caption_cell(txt.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        return None, "non_utf8_caption"


# -- reading one image -----------------------------------------------------------------------
def load_image(data: bytes, max_short_side: int | None = None) -> tuple[bytes, str, dict[str, Any]]:
    """(bytes to store, extension, json metadata) for an encoded image; raises _Skip if unusable.

    ``max_short_side``: an image whose shorter side is longer is downscaled to it (Lanczos, aspect
    kept); ``width``/``height`` in the metadata stay the original's, ``stored_*`` give the new size."""
    try:
        w, h = image_size(data)
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or "unknown"
    except Exception as e:  # noqa: BLE001 - any parser failure: unreadable
        raise _Skip("unreadable_image") from e
    # Full decode with the training loader's decoder: the same notion of a readable image, and
    # it catches truncated files whose header looks fine.
    decoder = SampleDecoder(caption_key=None)
    decoded = decoder({"jpg": data})
    if decoded is None:
        raise _Skip(next(iter(decoder.skipped), "unreadable_image"))
    meta = {"width": w, "height": h, "format": fmt}
    ext = _KEPT_FORMATS.get(fmt)
    if max_short_side is not None and min(w, h) > max_short_side:
        scale = max_short_side / min(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        ext = ext or "jpg"
        meta.update(stored_width=size[0], stored_height=size[1])
        return encode_image(decoded["image"].resize(size, Image.Resampling.LANCZOS), ext, quality=95), ext, meta
    if ext is not None:
        return data, ext, meta
    return encode_image(decoded["image"], "jpg", quality=95), "jpg", meta


# -- downloading (img2dataset) ---------------------------------------------------------------
def _require_img2dataset(rows: list[Row]):  # -> module
    first = next(r.source for r in rows if r.is_url)
    n = sum(r.is_url for r in rows)
    return require("img2dataset", "img2dataset", f"{n} image(s) are URLs (e.g. {first!r}); downloading them",
                   "download the images first and point the table at the local files")


def download_rows(rows: dict[int, Row], staging: Path, *, processes: int = 1, threads: int = 16) -> dict[int, str]:
    """Download the URL rows with img2dataset into ``staging``; returns {row index: local file}.

    Rows missing from the result failed to download (img2dataset's own report is in staging).
    """
    img2dataset = _require_img2dataset(list(rows.values()))
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    url_list = staging / "urls.csv"
    with open(url_list, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["url", "caption", _DOWNLOAD_ROW_COL])
        for i, row in sorted(rows.items()):
            w.writerow([row.source, row.caption or "", i])
    kwargs = dict(
        url_list=str(url_list), input_format="csv", url_col="url", caption_col="caption",
        save_additional_columns=[_DOWNLOAD_ROW_COL], output_format="files", output_folder=str(staging / "files"),
        resize_mode="no", disable_all_reencoding=True, skip_reencode=True, number_sample_per_shard=10_000,
        processes_count=processes, thread_count=threads, enable_wandb=False,
    )
    try:  # older img2dataset versions lack some options; pass only what this one has
        params = inspect.signature(img2dataset.download).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            kwargs = {k: v for k, v in kwargs.items() if k in params}
    except (TypeError, ValueError):
        pass
    img2dataset.download(**kwargs)
    found: dict[int, str] = {}
    for meta_file in sorted((staging / "files").rglob("*.json")):
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
            i = int(meta[_DOWNLOAD_ROW_COL])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # img2dataset's per-shard stats files, or a damaged record
        if meta.get("status", "success") != "success":
            continue
        image = next((p for p in meta_file.parent.glob(meta_file.stem + ".*")
                      if p.suffix.lower() in IMAGE_SUFFIXES), None)
        if image is not None:
            found[i] = str(image)
    return found


# -- building --------------------------------------------------------------------------------
def _fingerprint(rows: list[Row], shard_size: int, prefix: str, max_short_side: int | None = None) -> str:
    # max_short_side only when set, so builds made before the option keep their fingerprint.
    head = [shard_size, prefix, len(rows)] + ([max_short_side] if max_short_side is not None else [])
    h = hashlib.sha256(json.dumps(head).encode())
    for r in rows:
        h.update(json.dumps([r.source, r.caption, r.path, r.problem]).encode("utf-8"))
    return h.hexdigest()


def _shard_name(prefix: str, j: int) -> str:
    return f"{prefix}-{j:05d}.tar"


def _tar_keys(path: Path) -> list[str] | None:
    """Sample keys of a complete tar, or None if it is not a readable tar."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            keys = []
            for info in tar:
                parts = split_member_name(info.name) if info.isfile() else None
                if parts and (not keys or keys[-1] != parts[0]):
                    keys.append(parts[0])
            return keys
    except (tarfile.TarError, OSError, EOFError):
        return None


def _write_shard(out: Path, rows: list[Row], j: int, *, shard_size: int, prefix: str, key_width: int,
                 downloaded: dict[int, str], max_short_side: int | None = None) -> dict[str, Any]:
    """Write shard j (rows j*shard_size ...) atomically; returns its report entry."""
    first = j * shard_size
    chunk = rows[first:first + shard_size]
    skipped: Counter[str] = Counter()
    examples: list[list[Any]] = []
    # max_bytes off: the plan (row i -> shard i // shard_size) must not be split by size.
    with ShardWriter(out, prefix=prefix, max_count=shard_size, max_bytes=1 << 62, start_index=j) as writer:
        for i, row in enumerate(chunk, start=first):
            try:
                if row.problem:
                    raise _Skip(row.problem)
                path = downloaded.get(i) if row.is_url else row.path
                if path is None:
                    raise _Skip("download_failed")
                try:
                    data = Path(path).read_bytes()
                except FileNotFoundError as e:
                    raise _Skip("missing_file") from e
                except OSError as e:
                    raise _Skip("unreadable_file") from e
                image, ext, meta = load_image(data, max_short_side)
            except _Skip as s:
                skipped[str(s)] += 1
                if len(examples) < _N_EXAMPLES:
                    examples.append([i, row.source, str(s)])
                continue
            writer.write(f"{i:0{key_width}d}", image, row.caption, image_ext=ext,
                         extra={"json": {"source": row.source, **meta}})
    return {"first_row": first, "rows": len(chunk), "written": writer.count, "skipped": dict(sorted(skipped.items())),
            "skipped_examples": examples}


def _load_report(out: Path) -> dict[str, Any] | None:
    f = out / REPORT_FILE
    if not f.is_file():
        return None
    try:
        report = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {f}: {e}; pass overwrite=True (CLI: --overwrite) to rebuild") from e
    return report if isinstance(report, dict) else None


def build_shards(
    rows: list[Row],
    out_dir: str | os.PathLike,
    *,
    shard_size: int = 1000,
    prefix: str = "shard",
    overwrite: bool = False,
    info: dict[str, Any] | None = None,
    download_processes: int = 1,
    download_threads: int = 16,
    max_short_side: int | None = None,
) -> dict[str, Any]:
    """Write ``rows`` as shards into ``out_dir``, resuming an interrupted build of the same rows.

    Returns the report (saved as ``out_dir/build_report.json``) plus ``this_run``: which shards
    this call wrote and which it found already done.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if not prefix or "/" in prefix:
        raise ValueError(f"prefix {prefix!r} must be a non-empty file name without '/'")
    if max_short_side is not None and max_short_side < 1:
        raise ValueError(f"max_short_side must be >= 1 pixel, got {max_short_side}")
    out = Path(out_dir)
    fingerprint = _fingerprint(rows, shard_size, prefix, max_short_side)
    previous = _load_report(out) if out.is_dir() else None
    if out.exists() and (not out.is_dir() or (previous is None and any(out.iterdir()))):
        raise FileExistsError(f"{out} exists and is not an earlier build (no {REPORT_FILE}); choose another "
                              "output directory (build never deletes what it did not write)")
    if previous is not None and previous.get("fingerprint") != fingerprint and not overwrite:
        raise FileExistsError(f"{out} holds a build of a different input or shard size/prefix/max_short_side; pass "
                              "overwrite=True (CLI: --overwrite) to rebuild it, or choose another directory")
    rebuild = previous is not None and overwrite  # overwrite: from scratch, even for the same input

    n_shards = -(-len(rows) // shard_size)
    key_width = max(9, len(str(max(len(rows) - 1, 0))))
    done: dict[str, dict[str, Any]] = {}
    todo: list[int] = []
    recorded = {} if previous is None or rebuild else previous.get("shards", {})
    for j in range(n_shards):
        entry = None if rebuild else _finished(out, j, recorded, shard_size=shard_size, prefix=prefix,
                                               key_width=key_width, n_rows=len(rows))
        if entry is None:
            todo.append(j)
        else:
            done[_shard_name(prefix, j)] = entry
    url_rows = [r for j in todo for r in rows[j * shard_size:(j + 1) * shard_size] if r.is_url and not r.problem]
    if url_rows:
        _require_img2dataset(url_rows)  # fail before writing (or deleting) anything

    if rebuild:
        shutil.rmtree(out)  # it has our report, so it is a build output: ours to delete
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"fingerprint": fingerprint, "input": info or {}, "rows": len(rows),
                              "shard_size": shard_size, "prefix": prefix, "max_short_side": max_short_side,
                              "complete": False}

    def save() -> None:
        shards = dict(sorted(done.items()))
        skipped: Counter[str] = Counter()
        for e in shards.values():
            skipped.update(e["skipped"])
        report.update(shards=shards, written=sum(e["written"] for e in shards.values()),
                      skipped=dict(sorted(skipped.items())))
        write_json_atomic(out / REPORT_FILE, report)

    save()  # from here on the directory is marked as a build, so a rerun can resume it
    built = []
    for j in progress(todo, desc="build", unit="shard"):
        chunk = {i: r for i, r in enumerate(rows[j * shard_size:(j + 1) * shard_size], start=j * shard_size)
                 if r.is_url and not r.problem}
        staging = out / ".download"
        downloaded = (download_rows(chunk, staging, processes=download_processes, threads=download_threads)
                      if chunk else {})
        # A file under this name now is not a finished shard of this build (e.g. a damaged one):
        # remove it, or it would survive if every row of the shard is skipped this time.
        (out / _shard_name(prefix, j)).unlink(missing_ok=True)
        done[_shard_name(prefix, j)] = _write_shard(out, rows, j, shard_size=shard_size, prefix=prefix,
                                                    key_width=key_width, downloaded=downloaded,
                                                    max_short_side=max_short_side)
        shutil.rmtree(staging, ignore_errors=True)
        built.append(_shard_name(prefix, j))
        save()

    # sizes.json from the report: exact even if an earlier run was killed between a shard's
    # rename and its sizes.json update.
    write_json_atomic(out / SIZES_FILE, {n: e["written"] for n, e in sorted(done.items()) if e["written"]})
    for stale in out.glob(f".{prefix}-*.tar.tmp"):  # left by a killed run
        stale.unlink(missing_ok=True)
    report["complete"] = True
    save()
    return {**report, "this_run": {"built": built, "reused": sorted(set(done) - set(built))}}


def _finished(out: Path, j: int, recorded: dict[str, Any], *, shard_size: int, prefix: str, key_width: int,
              n_rows: int) -> dict[str, Any] | None:
    """The report entry of shard j if it is already complete on disk, else None (to be built)."""
    name = _shard_name(prefix, j)
    path = out / name
    entry = recorded.get(name)
    if entry is not None:
        if entry.get("written") == 0 or path.is_file():  # an all-skipped shard has no file
            return entry
        return None  # deleted since: rebuild it
    if not path.is_file():
        return None
    # On disk but not in the report (killed right after the rename): ShardWriter only renames
    # complete shards, but check it is a readable tar holding keys of this shard only.
    keys = _tar_keys(path)
    first, rows = j * shard_size, min(shard_size, n_rows - j * shard_size)
    expected = {f"{i:0{key_width}d}" for i in range(first, first + rows)}
    if keys is None or not keys or len(keys) > rows or not set(keys) <= expected:
        return None
    return {"first_row": first, "rows": rows, "written": len(keys),
            "skipped": {"unknown": rows - len(keys)} if rows > len(keys) else {}, "skipped_examples": []}


def build_dataset(
    out_dir: str | os.PathLike,
    *,
    images: str | os.PathLike | None = None,
    captions: str | os.PathLike | None = None,
    table: str | os.PathLike | None = None,
    image_col: str | None = None,
    caption_col: str | None = None,
    image_root: str | os.PathLike | None = None,
    delimiter: str | None = None,
    shard_size: int = 1000,
    prefix: str = "shard",
    overwrite: bool = False,
    download_processes: int = 1,
    download_threads: int = 16,
    max_short_side: int | None = None,
) -> dict[str, Any]:
    """Plan rows from an image folder (``images`` [+ ``captions``]) or a ``table``, then build_shards."""
    if (images is None) == (table is None):
        raise ValueError("give exactly one input: an image folder (images=..., CLI --images) or a table "
                         "(table=..., CLI --table)")
    if captions is not None and images is None:
        raise ValueError("captions=... (CLI --captions) maps file names in an image folder; use it with images=...")
    if images is not None:
        rows, plan = rows_from_folder(images, captions, image_col=image_col, caption_col=caption_col,
                                      delimiter=delimiter)
        info = {"images": str(images), "captions": None if captions is None else str(captions), **plan}
    else:
        rows = rows_from_table(table, image_col=image_col, caption_col=caption_col, image_root=image_root,
                               delimiter=delimiter)
        info = {"table": str(table), "urls": sum(r.is_url for r in rows)}
    if not rows:
        raise ValueError(f"no images found in {images if images is not None else table}; check the input")
    return build_shards(rows, out_dir, shard_size=shard_size, prefix=prefix, overwrite=overwrite, info=info,
                        download_processes=download_processes, download_threads=download_threads,
                        max_short_side=max_short_side)


__all__ = ["Row", "build_dataset", "build_shards", "download_rows", "load_image", "read_table",
           "rows_from_folder", "rows_from_table"]
