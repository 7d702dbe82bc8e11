"""Tests for `dualenc-data build`: folder/table/parquet inputs, formats, skips, URLs, resume."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import types
from pathlib import Path

import pytest

from tests_helpers import read_samples
from PIL import Image

from dualenc.data_tools import build, cli
from dualenc.data_tools.build import build_dataset, rows_from_table
from dualenc.data_tools.shards import MissingDependencyError


def encode(size: tuple[int, int], fmt: str, color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()




def _noise_jpeg() -> bytes:
    import numpy as np

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    assert len(buf.getvalue()) > 3000
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Images of every kind next to same-stem captions, plus broken ones."""
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    files = {
        "a.jpg": encode((30, 20), "JPEG"),
        "b.png": encode((16, 24), "PNG"),
        "c.webp": encode((12, 12), "WEBP"),
        "d.bmp": encode((10, 8), "BMP"),  # re-encoded as JPEG
        "e.jpg": encode((8, 8), "PNG"),  # misnamed: stored as .png, from its real format
        "sub/f.jpeg": encode((9, 7), "JPEG"),
        "broken.jpg": b"not an image at all",
        "trunc.jpg": _noise_jpeg()[:1500],  # header fine, pixel data cut off
        "nocap.png": encode((5, 5), "PNG"),
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
        if name != "nocap.png":
            (d / name).with_suffix(".txt").write_text(f"  caption of {name}\n")
    return d


def test_build_folder_formats_and_skips(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = build_dataset(out, images=folder, shard_size=4)
    # Sorted relative paths: a b broken c d e nocap sub/f trunc -> rows 0..8.
    samples = read_samples(out)
    assert sorted(samples) == [f"{i:09d}" for i in (0, 1, 3, 4, 5, 7)]
    a, b, c, d, e, f = (samples[f"{i:09d}"] for i in (0, 1, 3, 4, 5, 7))
    assert a["jpg"] == (folder / "a.jpg").read_bytes() and set(a) == {"jpg", "txt", "json"}
    assert b["png"] == (folder / "b.png").read_bytes()
    assert c["webp"] == (folder / "c.webp").read_bytes()
    assert Image.open(io.BytesIO(d["jpg"])).format == "JPEG" and Image.open(io.BytesIO(d["jpg"])).size == (10, 8)
    assert e["png"] == (folder / "e.jpg").read_bytes()
    assert f["jpg"] == (folder / "sub" / "f.jpeg").read_bytes()
    assert a["txt"] == b"caption of a.jpg"
    assert json.loads(a["json"]) == {"source": "a.jpg", "width": 30, "height": 20, "format": "JPEG"}
    assert json.loads(d["json"])["format"] == "BMP" and json.loads(f["json"])["source"] == "sub/f.jpeg"
    assert report["written"] == 6 and report["rows"] == 9
    assert report["skipped"] == {"corrupt_image": 1, "missing_caption": 1, "unreadable_image": 1}
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {"shard-00000.tar": 3, "shard-00001.tar": 3} and "shard-00002.tar" not in sizes
    assert report["shards"]["shard-00002.tar"]["written"] == 0  # only the truncated image
    assert report["shards"]["shard-00002.tar"]["skipped_examples"] == [[8, "trunc.jpg", "corrupt_image"]]
    assert json.loads((out / "build_report.json").read_text())["complete"] is True
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_build_folder_with_captions_table(folder: Path, tmp_path: Path) -> None:
    table = tmp_path / "caps.tsv"
    table.write_text("name\tdesc\na.jpg\tfrom the table\nsub/f.jpeg\tnested one\n"
                     "nocap.png\tnow captioned\nghost.jpg\tx\n")
    out = tmp_path / "out"
    report = build_dataset(out, images=folder, captions=table, image_col="name", caption_col="desc")
    samples = read_samples(out)
    assert samples[f"{0:09d}"]["txt"] == b"from the table"  # the table wins over a.txt
    assert samples[f"{7:09d}"]["txt"] == b"nested one"
    assert samples[f"{6:09d}"]["txt"] == b"now captioned"
    assert samples[f"{1:09d}"]["txt"] == b"caption of b.png"  # not in the table: sidecar
    assert report["input"]["captions_without_image"] == 1
    with pytest.raises(ValueError, match="--caption-col"):
        build_dataset(tmp_path / "o2", images=folder, captions=table, image_col="name")


def test_build_table_paths_and_columns(folder: Path, tmp_path: Path) -> None:
    table = tmp_path / "list.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "alt_text", "other"])
        w.writerow(["imgs/a.jpg", "first, with comma", "x"])
        w.writerow([str(folder / "b.png"), "absolute path", "y"])
        w.writerow(["imgs/missing.jpg", "gone", "z"])
        w.writerow(["", "no image", "z"])
        w.writerow(["imgs/c.webp", "   ", "z"])
    out = tmp_path / "out"
    report = build_dataset(out, table=table)  # columns found by their usual names
    samples = read_samples(out)
    assert sorted(samples) == [f"{0:09d}", f"{1:09d}"]
    assert samples[f"{0:09d}"]["txt"] == b"first, with comma"
    assert json.loads(samples[f"{0:09d}"]["json"])["source"] == "imgs/a.jpg"
    assert report["skipped"] == {"empty_caption": 1, "missing_file": 1, "missing_image": 1}
    rows = rows_from_table(table, image_col="file", caption_col="other", image_root=folder.parent)
    assert rows[0].path == str(folder / "a.jpg") and rows[0].caption == "x"
    with pytest.raises(ValueError, match="no column 'nope'.*--image-col"):
        rows_from_table(table, image_col="nope")


def test_build_urls_need_img2dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "img2dataset", None)  # import fails as if not installed
    table = tmp_path / "urls.csv"
    table.write_text("url,caption\nhttps://example.com/a.jpg,a red dog\n")
    with pytest.raises(MissingDependencyError, match=r"pip install img2dataset.*download the images first"):
        build_dataset(tmp_path / "out", table=table)
    assert not (tmp_path / "out").exists()  # failed before writing anything


def test_build_urls_through_img2dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in for img2dataset.download writing its "files" layout; nothing is fetched."""
    served = {"https://x.test/1.png": encode((20, 10), "PNG"), "https://x.test/2.jpg": encode((6, 6), "JPEG")}
    calls = []

    def download(url_list: str, output_folder: str, save_additional_columns: list[str], **kwargs) -> None:
        calls.append(kwargs)
        assert kwargs["output_format"] == "files" and kwargs["resize_mode"] == "no"
        shard = Path(output_folder) / "00000"
        shard.mkdir(parents=True)
        with open(url_list, newline="") as f:
            for n, rec in enumerate(csv.DictReader(f)):
                key = f"00000{n:04d}"
                ok = rec["url"] in served
                meta = {"url": rec["url"], "key": key, "status": "success" if ok else "failed_to_download"}
                meta.update({c: rec[c] for c in save_additional_columns})
                (shard / f"{key}.json").write_text(json.dumps(meta))
                if ok:
                    (shard / f"{key}.jpg").write_bytes(served[rec["url"]])
        (Path(output_folder) / "00000_stats.json").write_text("{}")

    fake = types.ModuleType("img2dataset")
    fake.download = download
    monkeypatch.setitem(sys.modules, "img2dataset", fake)
    (tmp_path / "local.jpg").write_bytes(encode((7, 7), "JPEG"))
    table = tmp_path / "mixed.csv"
    table.write_text("url,caption\nlocal.jpg,a local one\nhttps://x.test/1.png,first url\n"
                     "https://x.test/404.jpg,broken link\nhttps://x.test/2.jpg,second url\n")
    report = build_dataset(tmp_path / "out", table=table, shard_size=2)
    samples = read_samples(tmp_path / "out")
    assert sorted(samples) == [f"{i:09d}" for i in (0, 1, 3)]
    assert samples[f"{1:09d}"]["png"] == served["https://x.test/1.png"]
    assert json.loads(samples[f"{3:09d}"]["json"])["source"] == "https://x.test/2.jpg"
    assert report["skipped"] == {"download_failed": 1} and report["input"]["urls"] == 3
    assert len(calls) == 2  # one download per shard that has URLs
    assert not (tmp_path / "out" / ".download").exists()


def test_build_parquet(tmp_path: Path, folder: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"image": [str(folder / "a.jpg"), "imgs/b.png"], "caption": ["one", "two"]}), table)
    report = build_dataset(tmp_path / "out", table=table)
    assert report["written"] == 2
    assert read_samples(tmp_path / "out")[f"{1:09d}"]["txt"] == b"two"


def test_build_parquet_without_pyarrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    with pytest.raises(MissingDependencyError, match=r"pip install pyarrow"):
        build_dataset(tmp_path / "out", table=tmp_path / "t.parquet")
    code = cli.main(["build", "--table", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "out")])
    assert code == 2


# -- resume ----------------------------------------------------------------------------------
def _many(tmp_path: Path, n: int = 11) -> Path:
    d = tmp_path / "many"
    d.mkdir()
    for i in range(n):
        (d / f"{i:03d}.jpg").write_bytes(encode((8 + i, 8), "JPEG", (i * 20, 0, 0)))
        (d / f"{i:03d}.txt").write_text(f"picture {i}")
    (d / "005.jpg").write_bytes(b"broken")  # a skip inside a shard must resume identically too
    return d


def _stamp(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(out.glob("*.tar"))}


def _without_run(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "this_run"}


def test_build_resumes_after_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _many(tmp_path)
    clean = build_dataset(tmp_path / "clean", images=src, shard_size=3)
    assert len(clean["shards"]) == 4

    out = tmp_path / "out"
    real = build.load_image
    calls = {"n": 0}

    def crash_in_third_shard(data: bytes, *args):
        calls["n"] += 1
        if calls["n"] == 7:  # row 6: the first image of shard 2 (rows 0-5 are calls 1-6)
            raise RuntimeError("simulated crash")
        return real(data, *args)

    monkeypatch.setattr(build, "load_image", crash_in_third_shard)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_dataset(out, images=src, shard_size=3)
    monkeypatch.setattr(build, "load_image", real)
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-00000.tar", "shard-00001.tar"]
    assert not list(out.glob(".*.tmp"))  # the shard in progress was discarded
    before = _stamp(out)

    resumed = build_dataset(out, images=src, shard_size=3)
    assert resumed["this_run"] == {"built": ["shard-00002.tar", "shard-00003.tar"],
                                   "reused": ["shard-00000.tar", "shard-00001.tar"]}
    after = _stamp(out)
    assert {k: after[k] for k in before} == before  # finished shards untouched
    for name in after:
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()
    assert (out / "sizes.json").read_text() == (tmp_path / "clean" / "sizes.json").read_text()
    assert _without_run(resumed) == _without_run(clean)

    # A deleted shard is rebuilt; nothing else is.
    (out / "shard-00001.tar").unlink()
    before = _stamp(out)
    again = build_dataset(out, images=src, shard_size=3)
    assert again["this_run"]["built"] == ["shard-00001.tar"]
    after = _stamp(out)
    assert all(after[k] == v for k, v in before.items())
    assert (out / "shard-00001.tar").read_bytes() == (tmp_path / "clean" / "shard-00001.tar").read_bytes()

    # Killed between a shard's rename and the report update: the shard on disk is kept.
    report = json.loads((out / "build_report.json").read_text())
    del report["shards"]["shard-00003.tar"]
    (out / "build_report.json").write_text(json.dumps(report))
    before = _stamp(out)
    again = build_dataset(out, images=src, shard_size=3)
    assert again["this_run"]["built"] == [] and _stamp(out) == before
    assert again["written"] == clean["written"]

    # A damaged file under a shard's name that the report does not list is rebuilt.
    (out / "shard-00002.tar").write_bytes(b"garbage")
    report = json.loads((out / "build_report.json").read_text())
    del report["shards"]["shard-00002.tar"]
    (out / "build_report.json").write_text(json.dumps(report))
    assert build_dataset(out, images=src, shard_size=3)["this_run"]["built"] == ["shard-00002.tar"]
    assert (out / "shard-00002.tar").read_bytes() == (tmp_path / "clean" / "shard-00002.tar").read_bytes()

    # Same input, complete build: a no-op rerun.
    final = build_dataset(out, images=src, shard_size=3)
    assert final["this_run"]["built"] == [] and _without_run(final) == _without_run(clean)


def test_build_refuses_foreign_or_changed_output(tmp_path: Path) -> None:
    src = _many(tmp_path, 4)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an earlier build"):
        build_dataset(foreign, images=src)
    with pytest.raises(FileExistsError, match="not an earlier build"):
        build_dataset(foreign, images=src, overwrite=True)
    assert (foreign / "keep.txt").read_text() == "mine"
    out = tmp_path / "out"
    build_dataset(out, images=src, shard_size=2)
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_dataset(out, images=src, shard_size=3)
    build_dataset(out, images=src, shard_size=3, overwrite=True)
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-00000.tar", "shard-00001.tar"]
    assert json.loads((out / "sizes.json").read_text()) == {"shard-00000.tar": 3, "shard-00001.tar": 1}


def test_cli_build(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert cli.main(["build", "--images", str(folder), "--out", str(out), "--shard-size", "5"]) == 0
    text = capsys.readouterr().out
    assert "6 of 9 samples in 2 shard(s)" in text and "unreadable_image 1" in text
    assert cli.main(["build", "--images", str(folder), "--out", str(out), "--shard-size", "5"]) == 0
    assert "0 written now, 2 already done" in capsys.readouterr().out
    assert cli.main(["build", "--images", str(tmp_path / "nope"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    assert cli.main(["build", "--table", str(folder / "a.txt"), "--captions", "x", "--out", str(out)]) == 2
    assert "use it with images" in capsys.readouterr().err
    assert os.listdir(out)  # untouched by the failing calls


def test_build_parquet_reads_through_pyarrow_api(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs without pyarrow: a stand-in module with the two calls build uses (read_table, to_pylist)."""
    records = [{"image": "imgs/a.jpg", "caption": "one"}, {"image": "imgs/c.webp", "caption": "two"}]
    table = types.SimpleNamespace(column_names=["image", "caption"], to_pylist=lambda: records)
    fake_pq = types.ModuleType("pyarrow.parquet")
    fake_pq.read_table = lambda path: table
    monkeypatch.setitem(sys.modules, "pyarrow", types.ModuleType("pyarrow"))
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", fake_pq)
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    report = build_dataset(tmp_path / "out", table=tmp_path / "t.parquet")
    samples = read_samples(tmp_path / "out")
    assert report["written"] == 2 and samples[f"{1:09d}"]["webp"] == (folder / "c.webp").read_bytes()


def test_build_max_short_side_downscales_large_images_once(tmp_path: Path) -> None:
    src = tmp_path / "imgs"
    src.mkdir()
    (src / "big.jpg").write_bytes(encode((400, 200), "JPEG"))   # short side 200 > 64: downscaled
    (src / "tall.png").write_bytes(encode((90, 300), "PNG"))    # short side 90 > 64: stays PNG
    (src / "small.jpg").write_bytes(small := encode((60, 40), "JPEG"))  # already small: bytes kept
    for stem in ("big", "tall", "small"):
        (src / f"{stem}.txt").write_text(f"a {stem} picture")
    report = build_dataset(tmp_path / "out", images=src, max_short_side=64)
    assert report["written"] == 3 and report["max_short_side"] == 64
    by_caption = {s["txt"].decode(): s for s in read_samples(tmp_path / "out").values()}
    sizes = {cap: Image.open(io.BytesIO(next(v for k, v in s.items() if k in ("jpg", "png")))).size
             for cap, s in by_caption.items()}
    assert sizes == {"a big picture": (128, 64), "a tall picture": (64, 213), "a small picture": (60, 40)}
    assert "png" in by_caption["a tall picture"] and by_caption["a small picture"]["jpg"] == small
    meta = json.loads(by_caption["a big picture"]["json"])
    assert (meta["width"], meta["height"], meta["stored_width"], meta["stored_height"]) == (400, 200, 128, 64)
    # The setting is part of what a resumed build must match.
    with pytest.raises(FileExistsError, match="max_short_side"):
        build_dataset(tmp_path / "out", images=src, max_short_side=128)
    with pytest.raises(ValueError, match="max_short_side must be >= 1"):
        build_dataset(tmp_path / "out2", images=src, max_short_side=0)
