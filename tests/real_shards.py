"""Shard sets as real tools write them, for tests: img2dataset's layout (including its 0-success
shard) and hostile cases (truncated tars, duplicate members, non-UTF-8 captions, pickles)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image


def jpeg(i: int = 0, size: tuple[int, int] = (12, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (i * 37 % 256, i * 11 % 256, 90)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]], mtime: float = 1_700_000_000,
              owner: str = "", mode: int = 0o644) -> None:
    """A tar as Python's tarfile (so webdataset's TarWriter) writes it: pax format, where a
    fractional ``mtime`` (webdataset's ``time.time()``) adds a pax header before every member."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), mtime, mode
            info.uname = info.gname = owner
            tar.addfile(info, io.BytesIO(data))


def img2dataset_shard(folder: Path, shard: int, n: int, failed: int = 0) -> list[str]:
    """Shard ``shard`` of an img2dataset output folder with ``n`` successes; returns the sample keys.

    As img2dataset 1.47 writes it (checked against its output on URLs served from 127.0.0.1):
    ``NNNNN.tar`` through webdataset's TarWriter (pax headers with a fractional mtime, mode 0444,
    owner bigdata; per sample ``key.jpg``, ``key.json``, ``key.txt`` in that order; key = 5-digit
    shard id + the row, with as many digits as ``number_sample_per_shard`` needs: 4 for its default
    10000), ``NNNNN.parquet`` (one row per input URL, success or not) and ``NNNNN_stats.json``
    (indent 4). When every URL of a shard fails it still writes all three: the tar is 10240 zero
    bytes (the end-of-archive marker padded to a record) and the stats say ``successes: 0``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    members, keys, rows = [], [], []
    for i in range(n):
        key = f"{shard:05d}{i:04d}"
        keys.append(key)
        meta = {"caption": f"photo {key}", "url": f"http://example.com/{key}.jpg", "key": key, "status": "success",
                "error_message": None, "width": 12, "height": 10, "original_width": 12, "original_height": 10,
                "exif": None, "sha256": None}
        members += [(f"{key}.jpg", jpeg(shard * 1000 + i)), (f"{key}.json", json.dumps(meta).encode()),
                    (f"{key}.txt", f"photo {key}".encode())]
        rows.append(meta)
    rows += [{"caption": "a broken link", "url": f"http://example.com/missing{j}.jpg", "key": f"{shard:05d}{n + j:04d}",
              "status": "failed_to_download", "error_message": "HTTP Error 404: File not found",
              **dict.fromkeys(("width", "height", "original_width", "original_height", "exif", "sha256"))}
             for j in range(failed)]
    write_tar(folder / f"{shard:05d}.tar", members, mtime=1_700_000_000.25, owner="bigdata", mode=0o444)
    import pyarrow as pa
    import pyarrow.parquet as pq

    ints = {"width", "height", "original_width", "original_height"}
    schema = pa.schema([(c, pa.int32() if c in ints else pa.string()) for c in
                        ("caption", "url", "key", "status", "error_message", "width", "height", "original_width",
                         "original_height", "exif", "sha256")])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / f"{shard:05d}.parquet")
    status = {**({"success": n} if n else {}), **({"HTTP Error 404: File not found": failed} if failed else {})}
    stats = {"count": n + failed, "successes": n, "failed_to_download": failed, "failed_to_resize": 0,
             "duration": 0.5, "start_time": 1_700_000_000.0, "end_time": 1_700_000_000.5, "status_dict": status}
    (folder / f"{shard:05d}_stats.json").write_text(json.dumps(stats, indent=4))
    return keys
