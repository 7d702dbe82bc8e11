"""Tests for `dualenc-data stats` and the shared shard reading helpers (data_tools/shards.py)."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from dualenc.data_tools import cli
from dualenc.data_tools.shards import expand_shards, iter_tar_samples, split_member_name
from dualenc.data_tools.stats import histogram, shard_stats
from dualenc.data_tools.writer import ShardWriter


def png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (w, h), 128).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    d = tmp_path / "ds"
    with ShardWriter(d, max_count=4) as w:
        sizes = [(100, 50), (300, 300), (250, 900), (40, 40), (1200, 800), (210, 200)]
        captions = ["a red dog", "a red dog", "A  red DOG", "one two three four five", "x", "a red dog"]
        for i, ((wd, ht), cap) in enumerate(zip(sizes, captions)):
            w.write(f"s{i}", png(wd, ht), cap, image_ext="png", extra={"pyd": pickle.dumps(i)})
        w.write("bad", b"not an image", "broken image here")
    (d / "sizes.json").unlink()  # as if built by a tool that writes none
    return d


def test_stats_counts_histograms_top(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "stats"
    stats = shard_stats(shards, out, top_k=2)
    assert stats["samples"] == 7 and stats["shards"] == 2
    assert stats["problems"] == {"unreadable_image": 1}
    side = stats["shorter_side"]
    # shorter sides 50, 300, 250, 40, 800, 200
    assert side["summary"] == {"min": 40.0, "median": 225.0, "mean": 273.333, "max": 800.0}
    counts = dict(zip(side["histogram"]["labels"], side["histogram"]["counts"]))
    assert counts["32-64"] == 2 and counts["200-256"] == 2 and counts["256-384"] == 1 and counts["768-1024"] == 1
    aspect = dict(zip(stats["aspect_ratio"]["histogram"]["labels"], stats["aspect_ratio"]["histogram"]["counts"]))
    assert aspect["1-1.25"] == 3 and aspect["1.5-2"] == 1 and aspect["2-2.5"] == 1 and aspect["3-4"] == 1
    assert stats["aspect_ratio"]["histogram"]["edges"][-1] is None
    words = stats["caption_words"]["histogram"]
    assert words["counts"][3] == 5 and words["counts"][5] == 1 and words["counts"][1] == 1 and words["counts"][2] == 0
    assert words["labels"][:2] == ["0", "1"] and words["labels"][-1] == ">=40"
    assert stats["captions"]["top"] == [{"caption": "a red dog", "count": 4},
                                        {"caption": "broken image here", "count": 1}]
    assert stats["captions"]["distinct"] == 4
    saved = json.loads((out / "stats.json").read_text())
    assert saved["samples"] == 7 and saved["captions"] == stats["captions"]
    for name in ("shorter_side.png", "aspect_ratio.png", "caption_words.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.width > 100
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_stats_sizes_json(shards: Path, tmp_path: Path) -> None:
    stats = shard_stats(shards, plots=False)  # missing: written
    sizes_file = shards / "sizes.json"
    assert json.loads(sizes_file.read_text()) == {"shard-00000.tar": 4, "shard-00001.tar": 3}
    assert stats["sizes_json"][str(shards)] == {"existed": False, "written": True}
    sizes_file.write_text(json.dumps({"shard-00000.tar": 4, "shard-00001.tar": 99, "other.tar": 5}))
    stats = shard_stats(shards, plots=False)  # exists: only reported
    entry = stats["sizes_json"][str(shards)]
    assert entry["written"] is False and entry["mismatch"] == {"shard-00001.tar": {"listed": 99, "counted": 3}}
    assert "--write-sizes" in entry["hint"]
    assert json.loads(sizes_file.read_text())["shard-00001.tar"] == 99
    shard_stats(shards, plots=False, write_sizes=True)  # merged: other entries kept
    assert json.loads(sizes_file.read_text()) == {"shard-00000.tar": 4, "shard-00001.tar": 3, "other.tar": 5}
    sizes_file.unlink()
    shard_stats(shards, plots=False, write_sizes=False)
    assert not sizes_file.exists()


def test_stats_reads_only_image_and_caption(shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dualenc.data.tario import TarWalker

    read: list[str] = []
    real = TarWalker.read

    def spy(self, member):
        read.append(member.name)
        return real(self, member)

    monkeypatch.setattr(TarWalker, "read", spy)
    shard_stats(shards, plots=False, write_sizes=False)
    assert read and all(name.endswith((".png", ".jpg", ".txt")) for name in read)  # .pyd never read


def test_histogram_edges() -> None:
    h = histogram([0, 0.5, 1, 2.9, 3, 100, -1], (0, 1, 3))
    assert h["counts"] == [3, 2, 2] and h["labels"] == ["0-1", "1-3", ">=3"]  # below range: first bin


def test_expand_shards_and_member_names(shards: Path, tmp_path: Path) -> None:
    names = [str(shards / "shard-00000.tar"), str(shards / "shard-00001.tar")]
    assert expand_shards(shards) == names
    assert expand_shards(f"{names[1]}::{shards}/shard-{{00000..00000}}.tar") == [names[1], names[0]]
    assert expand_shards([Path(names[0]), str(shards / "*.tar")]) == [names[0], *names]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        expand_shards(str(shards / "shard-{00000..00002}.tar"))  # one of three missing: refused
    with pytest.raises(FileNotFoundError, match="matched no shard"):
        expand_shards(str(tmp_path / "*.none"))
    with pytest.raises(ValueError, match="download it first"):
        expand_shards("https://example.com/shard-00000.tar")
    assert split_member_name("a/b/000001.seg.jpg") == ("a/b/000001", "seg.jpg")
    assert split_member_name("README") is None
    samples = list(iter_tar_samples(names))
    assert [s.key for s in samples] == ["s0", "s1", "s2", "s3", "s4", "s5", "bad"]
    assert samples[0].image_ext == "png" and set(samples[0].members) == {"png", "txt", "pyd"}


def test_cli_stats(shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "st"
    assert cli.main(["stats", "--shards", str(shards), "--out", str(out), "--no-plots"]) == 0
    text = capsys.readouterr().out
    assert "7 samples in 2 shard(s)" in text and "wrote" in text and (shards / "sizes.json").is_file()
    assert (out / "stats.json").is_file() and not list(out.glob("*.png"))
    assert cli.main(["stats", "--shards", str(tmp_path / "none.tar"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
