"""Tests for `dualenc-data dedupe`: pHash robustness, chunked Hamming search, output and report."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance

from dualenc.data_tools import cli
from dualenc.data_tools.dedupe import _DCT, dedupe_shards, hamming_matches, phash
from dualenc.data_tools.writer import ShardWriter


def scene(seed: int, size: int = 96) -> Image.Image:
    """A gradient with a few random shapes: structure a perceptual hash can see."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    ramp = np.linspace(0, 1, size)
    t = ramp[None, :, None] if rng.random() < 0.5 else ramp[:, None, None]
    img = Image.fromarray((a + (b - a) * t * np.ones((size, size, 1))).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = rng.integers(0, size - 20, 2)
        w, h = rng.integers(15, size // 2, 2)
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        box = [int(x0), int(y0), int(x0 + w), int(y0 + h)]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
    return img


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def variants(img: Image.Image) -> list[bytes]:
    """Resized, heavily re-encoded, slightly brightened, and all three at once."""
    return [
        jpeg(img.resize((60, 60), Image.Resampling.BICUBIC)),
        jpeg(img, quality=35),
        jpeg(ImageEnhance.Brightness(img).enhance(1.1)),
        jpeg(ImageEnhance.Brightness(img.resize((150, 150))).enhance(1.08), quality=50),
    ]


def keys_of(out: Path) -> list[str]:
    keys = []
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            keys += [m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".jpg")]
    return keys


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """Train: 30 scenes. Eval: altered copies of train 3, 11, 20, 27 plus 10 unrelated scenes."""
    with ShardWriter(tmp_path / "train", max_count=8) as w:
        for i in range(30):
            w.write(f"t{i:02d}", jpeg(scene(i)), f"caption {i}", extra={"json": {"i": i}})
    dup_of = {}
    with ShardWriter(tmp_path / "eval", max_count=100) as w:
        for n, i in enumerate((3, 11, 20, 27)):
            data = variants(scene(i))[n]
            w.write(f"e{n}", data, "eval")
            dup_of[f"t{i:02d}"] = f"e{n}"
        for j in range(10):
            w.write(f"x{j}", jpeg(scene(1000 + j)), "unrelated")
    return tmp_path / "train", tmp_path / "eval", dup_of


def test_phash_robust_and_distinct() -> None:
    hashes = {i: phash(jpeg(scene(i))) for i in range(30)}
    for i in range(6):
        for v in variants(scene(i)):
            assert bin(hashes[i] ^ phash(v)).count("1") <= 8
    dists = [bin(hashes[i] ^ hashes[j]).count("1") for i in range(30) for j in range(i)]
    assert min(dists) > 12
    assert phash(jpeg(scene(0))) == phash(Image.open(io.BytesIO(jpeg(scene(0)))))  # bytes or PIL image
    assert 0 <= hashes[0] < 1 << 64


def test_dct_matches_scipy() -> None:
    fft = pytest.importorskip("scipy.fft")
    x = np.random.default_rng(0).random((32, 32))
    np.testing.assert_allclose(_DCT @ x @ _DCT.T, fft.dctn(x, type=2, norm="ortho"), atol=1e-10)


def test_hamming_matches_chunked() -> None:
    rng = np.random.default_rng(1)
    refs = rng.integers(0, 2**63, 50, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)
    queries = refs[[4, 9, 9, 30]].copy()
    queries[1] ^= np.uint64(0b1011)  # 3 bits off
    queries[3] ^= np.uint64((1 << 63) | 1)  # 2 bits off, including the top bit
    queries = np.concatenate([queries, rng.integers(0, 2**63, 20, dtype=np.int64).astype(np.uint64)])
    got = hamming_matches(queries, refs, 3, max_cells=7)  # chunks of one query
    brute = [sorted(((j, bin(int(q) ^ int(r)).count("1")) for j, r in enumerate(refs)
                     if bin(int(q) ^ int(r)).count("1") <= 3), key=lambda t: (t[1], t[0])) for q in queries]
    assert got == brute
    assert got[0] == [(4, 0)] and got[1] == [(9, 3)] and got[3] == [(30, 2)]
    assert hamming_matches(queries, refs, 2)[1] == []
    assert hamming_matches(np.array([], dtype=np.uint64), refs, 8) == []


def test_dedupe_drops_near_duplicates_only(data, tmp_path: Path) -> None:
    train, eval_dir, dup_of = data
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in train.iterdir()}
    out = tmp_path / "out"
    report = dedupe_shards(train, eval_dir, out, threshold=8, shard_size=10)
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in train.iterdir()} == before
    dropped = {m["train_key"]: m for m in report["matches"]}
    assert set(dropped) == set(dup_of)
    for key, m in dropped.items():
        assert m["eval"][0]["key"] == dup_of[key] and m["eval"][0]["distance"] <= 8
        assert all(e["key"].startswith("e") for e in m["eval"])  # no unrelated image matched
    assert keys_of(out) == [f"t{i:02d}" for i in range(30) if f"t{i:02d}" not in dup_of]
    assert report["train"] == {**report["train"], "samples": 30, "kept": 26, "dropped": 4, "unhashable": 0}
    assert report["eval"]["images"] == 14 and report["hash"].startswith("phash64")
    assert sum(json.loads((out / "sizes.json").read_text()).values()) == 26
    assert json.loads((out / "dedupe_report.json").read_text())["matches"] == report["matches"]
    # Kept samples are byte-identical copies, all members included.
    with tarfile.open(train / "shard-00000.tar") as a, tarfile.open(out / "shard-00000.tar") as b:
        assert a.extractfile("t00.json").read() == b.extractfile("t00.json").read()
        assert a.extractfile("t00.jpg").read() == b.extractfile("t00.jpg").read()
    # A stricter threshold misses some of the altered copies.
    strict = dedupe_shards(train, eval_dir, tmp_path / "strict", threshold=0)
    assert strict["train"]["dropped"] < 4 and {m["train_key"] for m in strict["matches"]} <= set(dup_of)


def test_dedupe_eval_image_folder_and_unhashable(tmp_path: Path) -> None:
    folder = tmp_path / "evalimgs" / "n01440764"
    folder.mkdir(parents=True)
    (folder / "val_1.JPEG").write_bytes(variants(scene(5))[0])
    (folder / "val_2.png").write_bytes(b"broken")
    with ShardWriter(tmp_path / "train") as w:
        for i in range(6):
            w.write(f"k{i}", jpeg(scene(i)), "c")
        w.write("corrupt", b"\xff\xd8 not really a jpeg", "c")
    report = dedupe_shards(tmp_path / "train", tmp_path / "evalimgs", tmp_path / "out")
    assert [m["train_key"] for m in report["matches"]] == ["k5"]
    assert report["matches"][0]["eval"][0]["key"] == "n01440764/val_1.JPEG"
    assert report["eval"]["unreadable"] == 1 and report["train"]["unhashable"] == 1
    assert "corrupt" in keys_of(tmp_path / "out")  # cannot be hashed: kept, and counted


def test_cli_dedupe(data, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train, eval_dir, dup_of = data
    out = tmp_path / "out"
    code = cli.main(["dedupe", "--train", str(train), "--eval", str(eval_dir / "shard-00000.tar"),
                     "--eval", str(eval_dir), "--out", str(out), "--threshold", "6"])
    assert code == 0
    assert "dropped" in capsys.readouterr().out
    report = json.loads((out / "dedupe_report.json").read_text())
    assert report["eval"]["images"] == 28 and report["threshold"] == 6
    assert cli.main(["dedupe", "--train", str(train), "--eval", str(eval_dir), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["dedupe", "--train", str(train), "--eval", str(eval_dir), "--out", str(train)]) == 2
    assert "contains the input" in capsys.readouterr().err
