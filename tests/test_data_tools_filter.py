"""Tests for `dualenc-data filter`: each ALIGN rule, boilerplate patterns, reports, input untouched."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from dualenc.data_tools import cli
from dualenc.data_tools.filter import (
    DEFAULT_BOILERPLATE,
    FilterConfig,
    _Tables,
    filter_shards,
    ngrams,
    words,
)

_JPEG_CACHE: dict[tuple[int, int], bytes] = {}


def jpeg(w: int, h: int) -> bytes:
    if (w, h) not in _JPEG_CACHE:
        buf = io.BytesIO()
        Image.new("RGB", (w, h), (90, 120, 200)).save(buf, "JPEG", quality=50)
        _JPEG_CACHE[(w, h)] = buf.getvalue()
    return _JPEG_CACHE[(w, h)]


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def read_keys(out: Path) -> list[str]:
    keys: list[str] = []
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                k = m.name.split(".", 1)[0]
                if not keys or keys[-1] != k:
                    keys.append(k)
    return keys


GOOD = ["a photo of a red dog on the grass", "a photo of a blue cat on the sofa",
        "a photo of a red cat on the grass", "a photo of a blue dog on the sofa"]
BOILERPLATE = ["IMG_1234.jpg", "dsc 0042 jpg", "file frankfurt airport skyline 2017 05 jpg",
               "thumbnail for version as of 21 57 29 june 2010"]
TOO_MANY = " ".join(["a photo of a red dog on the grass"] * 3)  # 24 words


def corpus() -> list[tuple[str, dict[str, bytes], str | None]]:
    """(key, members, expected first rule or None if kept)."""
    s: list[tuple[str, dict[str, bytes], str | None]] = []

    def add(key: str, caption: str | None, size: tuple[int, int] | None = (256, 256), expect: str | None = None,
            **extra: bytes) -> None:
        members = {} if size is None else {"jpg": jpeg(*size)}
        if caption is not None:
            members["txt"] = caption.encode()
        members.update(extra)
        s.append((key, members, expect))

    for i in range(12):
        add(f"good{i:02d}", GOOD[i % 4])  # 3 shares each: kept
    add("small", GOOD[0], (150, 300), "image_too_small")
    add("wide", GOOD[1], (700, 200), "aspect_ratio")
    add("smallwide", GOOD[2], (100, 400), "image_too_small")  # also too wide
    for i, text in enumerate(BOILERPLATE):
        add(f"boiler{i}", text, expect="boilerplate")
    add("fewwords", "red dog", expect="too_few_words")
    add("manywords", TOO_MANY, expect="too_many_words")
    for i in range(11):
        add(f"shared{i:02d}", "a red dog photo", expect="shared_caption")
    for i in range(10):
        add(f"tenshare{i:02d}", "a blue cat photo", expect=None)  # exactly 10: kept
    add("rare", "a photo of a zebra", expect="rare_tokens")
    add("nocap", None, expect="missing_caption")
    add("noimg", GOOD[0], None, "missing_image")
    add("badimg", GOOD[0], None, "unreadable_image", jpg=b"garbage bytes")
    add("badutf8", None, expect="non_utf8_caption", txt=b"\xff\xfe")
    add("pickled", GOOD[3], expect=None, pyd=pickle.dumps({"never": "unpickled"}), cls=b"7")
    return s


@pytest.fixture
def shards(tmp_path: Path) -> tuple[Path, list[tuple[str, dict[str, bytes], str | None]]]:
    samples = corpus()
    d = tmp_path / "in"
    d.mkdir()
    half = len(samples) // 2
    write_tar(d / "part-0.tar", [(k, m) for k, m, _ in samples[:half]])
    write_tar(d / "part-1.tar", [(k, m) for k, m, _ in samples[half:]])
    return d, samples


def snapshot(d: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.iterdir())}


def rare_vocab_size(samples) -> int:
    """Number of n-grams seen at least twice: with top_ngrams set to it, once-seen n-grams are rare."""
    counts = Counter()
    for _, m, _ in samples:
        if "txt" in m:
            try:
                counts.update(ngrams(words(m["txt"].decode().strip())))
            except UnicodeDecodeError:
                pass
    return sum(1 for n in counts.values() if n >= 2)


def test_filter_rules_report_and_output(shards, tmp_path: Path) -> None:
    d, samples = shards
    before = snapshot(d)
    config = FilterConfig(top_ngrams=rare_vocab_size(samples))
    report = filter_shards(d, tmp_path / "out", config, shard_size=10)
    assert snapshot(d) == before  # input bytes and mtimes untouched, nothing added

    expected_first = Counter(e for _, _, e in samples if e)
    assert report["dropped"]["first_rule"] == dict(expected_first)
    kept = [k for k, _, e in samples if e is None]
    assert report["kept"] == len(kept) and read_keys(tmp_path / "out") == kept
    assert report["input"]["samples"] == len(samples) == report["kept"] + report["dropped"]["total"]

    by_rule = report["dropped"]["by_rule"]
    assert by_rule["image_too_small"] == 2 and by_rule["aspect_ratio"] == 2  # smallwide counts in both
    assert by_rule["shared_caption"] == 11 and by_rule["too_many_words"] == 1
    # Once-seen n-grams are in the 4 boilerplate captions and the zebra one (the long caption's
    # only new bigram, "grass a", occurs twice in it).
    assert by_rule["rare_tokens"] == 4 + 1
    assert all(by_rule[r] >= n for r, n in report["dropped"]["first_rule"].items())
    assert sum(report["boilerplate_patterns"].values()) >= 4
    assert [e["key"] for e in report["examples"]["boilerplate"]] == ["boiler0", "boiler1", "boiler2", "boiler3"]

    # Kept samples are copied byte for byte, but only the members filter knows: a client's pickles
    # (.pyd) never reach the output.
    with tarfile.open(sorted((tmp_path / "out").glob("*.tar"))[-1]) as tar:
        names = tar.getnames()
        assert "pickled.pyd" not in names and "pickled.cls" in names
        assert tar.extractfile("pickled.cls").read() == samples[-1][1]["cls"]
    sizes = json.loads((tmp_path / "out" / "sizes.json").read_text())
    assert sum(sizes.values()) == len(kept)
    saved = json.loads((tmp_path / "out" / "filter_report.json").read_text())
    assert saved["dropped"] == report["dropped"] and saved["config"]["top_ngrams"] == config.top_ngrams


def test_each_rule_alone() -> None:
    t = _Tables(FilterConfig(top_ngrams=None, max_caption_shares=None))
    assert t.image_rules(199, 500) == ["image_too_small"]
    assert t.image_rules(200, 600) == [] and t.image_rules(200, 601) == ["aspect_ratio"]
    assert t.image_rules(601, 200) == ["aspect_ratio"]
    assert t.image_rules(150, 600) == ["image_too_small", "aspect_ratio"]
    assert t.text_rules("a red dog") == [] and t.text_rules("red dog") == ["too_few_words"]
    assert t.text_rules(" ".join(["w"] * 20)) == [] and t.text_rules(" ".join(["w"] * 21)) == ["too_many_words"]
    for text in BOILERPLATE + ["IMG_20190501_123456", "DSC00042 at the beach", "holiday photo 03.JPEG",
                               "Thumbnail for version as of 04:05, 1 May 2009"]:
        assert "boilerplate" in t.text_rules(text), text
    for text in ["a jpeg artifact on a red dog", "file cabinet in an office", "image of a png logo on a wall",
                 "dscovery of the year", "a photo of 1234 birds"]:
        assert "boilerplate" not in t.text_rules(text), text
    # Words: letters/digits runs, so punctuation and underscores split.
    assert words("IMG_1234.jpg") == ["img", "1234", "jpg"] and words("Dog's  toy!") == ["dog", "s", "toy"]
    assert ngrams(["a", "b", "c"]) == ["a", "b", "c", "a b", "b c"]


def test_shared_and_rare_rules() -> None:
    t = _Tables(FilterConfig(max_caption_shares=2, top_ngrams=4, min_words=None, boilerplate=[]))
    for c in ["red dog", "Red  dog", "RED DOG", "blue dog", "a cat"]:
        t.add(c)
    info = t.finish()
    # Counts: dog 4, red 3, red dog 3, blue 1, blue dog 1, a 1, cat 1, a cat 1. Top 4: dog,
    # red, red dog, then the first of the count-1 n-grams by name ("a").
    assert info == {"distinct_ngrams": 8, "vocab_size": 4} and t.vocab == {"dog", "red", "red dog", "a"}
    assert t.text_rules("red dog") == ["shared_caption"]  # 3 case/space variants > 2
    assert t.text_rules("blue dog") == ["rare_tokens"]
    assert t.text_rules("dog red") == ["rare_tokens"]  # bigram "dog red" never seen
    assert t.text_rules("a dog") == ["rare_tokens"] and t.text_rules("red") == []


def test_config_validation_and_disable() -> None:
    c = FilterConfig()
    c.disable(["rare_tokens", "image_too_small"])
    assert c.top_ngrams is None and c.min_side is None and c.max_aspect == 3.0
    with pytest.raises(ValueError, match="unknown rule 'nope'"):
        c.disable(["nope"])
    with pytest.raises(ValueError, match="boilerplate regex"):
        FilterConfig(boilerplate=["(unclosed"])
    with pytest.raises(ValueError, match="min_side"):
        FilterConfig(min_side=-1)
    assert len(DEFAULT_BOILERPLATE) == 3


def test_filter_decodes_images_fully_and_writes_known_members_only(tmp_path: Path) -> None:
    d = tmp_path / "in"
    d.mkdir()
    good, cut = jpeg(400, 300), jpeg(400, 300)
    cut = cut[: len(cut) // 2]  # header intact, pixels missing: PIL reads its size fine
    assert Image.open(io.BytesIO(cut)).size == (400, 300)
    caption = b"a photo of a red bus in the street"
    write_tar(d / "a.tar", [("ok", {"jpg": good, "txt": caption, "json": b"{}", "cls": b"3",
                                    "pickle": pickle.dumps([1]), "pth": b"torch-save"}),
                            ("cut", {"jpg": cut, "txt": caption + b" again"})])
    report = filter_shards(d, tmp_path / "out", FilterConfig(top_ngrams=None, max_caption_shares=None))
    assert report["kept"] == 1 and report["dropped"]["first_rule"] == {"unreadable_image": 1}
    with tarfile.open(tmp_path / "out" / sorted(p.name for p in (tmp_path / "out").glob("*.tar"))[0]) as tar:
        assert sorted(tar.getnames()) == ["ok.cls", "ok.jpg", "ok.json", "ok.txt"]


def test_filter_counts_what_the_shard_reader_skips(tmp_path: Path) -> None:
    d = tmp_path / "in"
    d.mkdir()
    caption = b"a photo of a red bus in the street"
    write_tar(d / "a.tar", [(f"k{i}", {"jpg": jpeg(300, 300), "txt": caption + str(i).encode()}) for i in range(3)])
    data = (d / "a.tar").read_bytes()
    with tarfile.open(d / "a.tar") as tar:
        cut_at = tar.getmembers()[4].offset  # a header boundary: tarfile alone sees a valid 2-sample tar
    (d / "a.tar").write_bytes(data[:cut_at])
    report = filter_shards(d, tmp_path / "out", FilterConfig(top_ngrams=None, max_caption_shares=None))
    assert report["input"]["samples"] == 2 and report["input"]["skipped"] == {"corrupt_tar": 1}


def test_filter_output_dir_safety(shards, tmp_path: Path) -> None:
    d, _ = shards
    with pytest.raises(ValueError, match="contains the input"):
        filter_shards(d / "part-0.tar", d, overwrite=True)
    with pytest.raises(ValueError, match="contains the input"):
        filter_shards(d, tmp_path, overwrite=True)
    out = tmp_path / "out"
    filter_shards(d, out)
    with pytest.raises(FileExistsError, match="overwrite"):
        filter_shards(d, out)
    report = filter_shards(d, out, FilterConfig(min_side=None, top_ngrams=None), overwrite=True)
    assert "image_too_small" not in report["dropped"]["by_rule"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging dirs left


def test_filter_duplicate_keys_fail_before_writing(tmp_path: Path) -> None:
    write_tar(tmp_path / "a.tar", [("k", {"jpg": jpeg(256, 256), "txt": b"a red dog"})])
    write_tar(tmp_path / "b.tar", [("k", {"jpg": jpeg(256, 256), "txt": b"a red dog"})])
    with pytest.raises(ValueError, match="duplicate sample key 'k'"):
        filter_shards(str(tmp_path / "*.tar"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_filter(shards, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d, samples = shards
    out = tmp_path / "out"
    code = cli.main(["filter", "--shards", str(d), "--out", str(out), "--disable", "rare_tokens",
                     "--no-default-boilerplate", "--boilerplate-regex", r"^thumbnail for", "--min-side", "120"])
    assert code == 0
    text = capsys.readouterr().out
    assert "boilerplate" in text and "image_too_small" in text
    report = json.loads((out / "filter_report.json").read_text())
    assert report["config"]["top_ngrams"] is None and report["config"]["min_side"] == 120
    assert report["boilerplate_patterns"] == {r"^thumbnail for": 1}
    assert report["dropped"]["by_rule"]["image_too_small"] == 1  # only the 100 px one now
    assert cli.main(["filter", "--shards", str(d), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def _colour_jpeg(rgb: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (256, 256), rgb).save(buf, "JPEG", quality=50)
    return buf.getvalue()


def test_shared_image_rule_with_tiny_threshold(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """ALIGN drops images with more than 1,000 alt-texts; here more than 3, by identical image bytes."""
    popular, three, unique = _colour_jpeg((200, 30, 30)), _colour_jpeg((30, 200, 30)), _colour_jpeg((30, 30, 200))
    samples = [(f"pop{i}", {"jpg": popular, "txt": f"a red square number {i}".encode()}) for i in range(4)]
    samples += [(f"three{i}", {"jpg": three, "txt": f"a green square number {i}".encode()}) for i in range(3)]
    samples += [("unique", {"jpg": unique, "txt": b"a blue square alone"})]
    d = tmp_path / "in"
    d.mkdir()
    write_tar(d / "part-0.tar", samples[:5])
    write_tar(d / "part-1.tar", samples[5:])  # counting spans shards: pass 1 sees the whole corpus
    config = FilterConfig(max_image_captions=3, top_ngrams=None, max_caption_shares=None)
    report = filter_shards(d, tmp_path / "out", config)
    assert report["dropped"]["first_rule"] == {"shared_image": 4}
    assert report["kept"] == 4 and read_keys(tmp_path / "out") == ["three0", "three1", "three2", "unique"]
    assert report["images"] == {"distinct": 3, "most_samples_per_image": 4}
    assert report["config"]["max_image_captions"] == 3
    # The rule off (or at ALIGN's default 1000) keeps them all.
    off = FilterConfig(top_ngrams=None, max_caption_shares=None)
    off.disable(["shared_image"])
    assert filter_shards(d, tmp_path / "off", off)["kept"] == 8
    assert filter_shards(d, tmp_path / "default", FilterConfig(top_ngrams=None))["kept"] == 8
    # Same through the CLI flag.
    assert cli.main(["filter", "--shards", str(d), "--out", str(tmp_path / "cli"), "--max-image-captions", "3",
                     "--disable", "rare_tokens"]) == 0
    assert "shared_image" in capsys.readouterr().out


def test_shared_image_rule_unit() -> None:
    t = _Tables(FilterConfig(max_image_captions=1))
    t.add_image(b"a" * 8)
    t.add_image(b"a" * 8)
    t.add_image(b"b" * 8)
    assert t.image_rules(300, 300, b"a" * 8) == ["shared_image"]
    assert t.image_rules(300, 300, b"b" * 8) == [] and t.image_rules(300, 300, b"c" * 8) == []
    assert t.image_rules(100, 400, b"a" * 8) == ["image_too_small", "aspect_ratio", "shared_image"]
    with pytest.raises(ValueError, match="max_image_captions"):
        FilterConfig(max_image_captions=-1)
