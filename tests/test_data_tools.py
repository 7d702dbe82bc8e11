"""Tests for dualenc.data_tools: shard writer, demo dataset, WordPiece tokenizer, CLI."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from dualenc.data_tools import cli
from dualenc.data_tools.demo import COLOR_NAMES, SHAPES, build_demo, combos
from dualenc.data_tools.tokenizer import expand_shards, iter_captions, train_wordpiece
from dualenc.data_tools.writer import ShardWriter

SMALL = dict(n_train=200, n_val=56, n_heldout=48, image_size=32, shard_size=80)


def read_samples(shard: str | Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def split_samples(root: Path, split: str) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for shard in sorted((root / split).glob("*.tar")):
        out.update(read_samples(shard))
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "ds"
    build_demo(root, seed=0, **SMALL)
    return root


# -- writer ----------------------------------------------------------------------------------
def test_writer_rollover_sizes_and_members(tmp_path: Path) -> None:
    with ShardWriter(tmp_path / "out", max_count=3) as w:
        for i in range(7):
            w.write(f"s{i:03d}", b"\xff\xd8fakejpeg", f"caption {i}", extra={"json": {"i": i}, "cls": i, "id": "x"})
        assert w.count == 7
    names = [Path(p).name for p in w.shards]
    assert names == ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {names[0]: 3, names[1]: 3, names[2]: 1}
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left
    with tarfile.open(w.shards[1]) as tar:
        members = tar.getmembers()
        assert [m.name for m in members[:5]] == ["s003.jpg", "s003.txt", "s003.json", "s003.cls", "s003.id"]
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.mode == 0o444 for m in members)
    s = read_samples(w.shards[1])["s004"]
    assert s["txt"] == b"caption 4" and json.loads(s["json"]) == {"i": 4} and s["cls"] == b"4" and s["id"] == b"x"


def test_writer_name_format(tmp_path: Path) -> None:
    # img2dataset's 00000.tar and CLIP_benchmark's 0.tar; sizes.json keys follow the names.
    for fmt, first in (("{index:05d}.tar", "00000.tar"), ("{index}.tar", "0.tar")):
        with ShardWriter(tmp_path / first, max_count=2, name_format=fmt) as w:
            for i in range(3):
                w.write(f"s{i}", b"\xff\xd8fakejpeg", "c")
        assert [Path(p).name for p in w.shards][0] == first
        assert sum(json.loads((tmp_path / first / "sizes.json").read_text()).values()) == 3
    for bad in ("shard.tar", "{index}.zip", "a/{index}.tar"):
        with pytest.raises(ValueError, match="name_format"):
            ShardWriter(tmp_path / "bad", name_format=bad)


def test_writer_max_bytes_and_pil_image(tmp_path: Path) -> None:
    img = Image.new("RGB", (8, 8), (200, 10, 10))
    with ShardWriter(tmp_path, prefix="p", max_bytes=7000) as w:
        for i in range(4):
            w.write(f"k{i}", b"x" * 2000)  # 2.5 KiB in the tar: two fit under 7000 with the end marker
        w.write("img", img, image_ext="png")
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    assert sizes == {"p-00000.tar": 2, "p-00001.tar": 2, "p-00002.tar": 1}
    png = read_samples(w.shards[-1])["img"]["png"]
    assert Image.open(io.BytesIO(png)).getpixel((0, 0)) == (200, 10, 10)


def test_writer_exception_leaves_no_partial_shard(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path, max_count=2) as w:
            for i in range(3):
                w.write(f"k{i}", b"data")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.tar", "sizes.json"]
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"shard-00000.tar": 2}


def test_writer_key_errors(tmp_path: Path) -> None:
    with ShardWriter(tmp_path) as w:
        w.write("a", b"1")
        with pytest.raises(ValueError, match="duplicate sample key 'a'"):
            w.write("a", b"2")
        for bad in ("a.b", "dir/x", ""):
            with pytest.raises(ValueError, match=repr(bad) if bad else "non-empty"):
                w.write(bad, b"3")
        with pytest.raises(ValueError, match="image_ext"):
            w.write("b", b"3", image_ext="gif")


def test_writer_merges_sizes_and_is_deterministic(tmp_path: Path) -> None:
    for start in (0, 1):
        with ShardWriter(tmp_path, start_index=start) as w:
            w.write(f"k{start}", b"img", "text", extra={"json": {"b": 1, "a": 2}})
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"shard-00000.tar": 1, "shard-00001.tar": 1}
    for d in ("x", "y"):
        with ShardWriter(tmp_path / d) as w:
            w.write("k", b"img", "text", extra={"json": {"b": 1, "a": 2}})
    assert (tmp_path / "x" / "shard-00000.tar").read_bytes() == (tmp_path / "y" / "shard-00000.tar").read_bytes()


def test_writer_output_reads_with_webdataset(tmp_path: Path) -> None:
    wds = pytest.importorskip("webdataset")
    with ShardWriter(tmp_path) as w:
        for i in range(3):
            w.write(f"k{i}", b"img", f"cap {i}", extra={"cls": i})
    rows = list(wds.WebDataset(w.shards, shardshuffle=False).to_tuple("__key__", "txt", "cls"))
    assert [(k, t.decode(), int(c)) for k, t, c in rows] == [("k0", "cap 0", 0), ("k1", "cap 1", 1), ("k2", "cap 2", 2)]


# -- demo ------------------------------------------------------------------------------------
def test_heldout_combos() -> None:
    seen, held = combos()
    assert len(seen) == 56 and len(held) == 24 and not set(seen) & set(held)
    per_color = Counter(c for c, _ in held)
    per_shape = Counter(s for _, s in held)
    assert set(per_color) == set(COLOR_NAMES) and all(2 <= n <= 3 for n in per_color.values())
    assert set(per_shape) == set(SHAPES) and all(n == 3 for n in per_shape.values())


def test_demo_splits(demo: Path) -> None:
    classes = json.loads((demo / "classes.json").read_text())
    summary = json.loads((demo / "demo.json").read_text())
    expected_n = {"train": SMALL["n_train"], "val": SMALL["n_val"], "heldout": SMALL["n_heldout"]}
    combos_by_split = {}
    for split, n in expected_n.items():
        samples = split_samples(demo, split)
        assert len(samples) == n == summary["splits"][split]["samples"]
        assert sum(json.loads((demo / split / "sizes.json").read_text()).values()) == n
        names = (demo / split / "classnames.txt").read_text().splitlines()
        assert names == (classes["heldout"] if split == "heldout" else classes["seen"])
        templates = (demo / split / "zeroshot_classification_templates.txt").read_text().splitlines()
        assert templates and all("{c}" in t for t in templates)
        found = set()
        for key, s in samples.items():
            assert key.startswith(f"{split}_") and set(s) == {"jpg", "txt", "cls", "json"}
            meta = json.loads(s["json"])
            name = f"{meta['color']} {meta['shape']}"
            assert names[int(s["cls"])] == name
            found.add(name)
            if split != "train":
                assert name in s["txt"].decode() and meta["caption_kind"] == "clean"
        combos_by_split[split] = found
        if split == "heldout":  # balanced: n_heldout / 24 images per combo
            counts = Counter(json.loads(s["json"])["shape"] + json.loads(s["json"])["color"] for s in samples.values())
            assert set(counts.values()) == {n // 24}
    assert combos_by_split["heldout"] == set(classes["heldout"])
    assert not combos_by_split["heldout"] & (combos_by_split["train"] | combos_by_split["val"])
    assert {c.split()[0] for c in combos_by_split["train"]} == set(COLOR_NAMES)
    assert {c.split()[1] for c in combos_by_split["train"]} == set(SHAPES)
    img = Image.open(io.BytesIO(next(iter(split_samples(demo, "val").values()))["jpg"]))
    assert img.format == "JPEG" and img.size == (SMALL["image_size"],) * 2


def test_demo_caption_kinds(demo: Path) -> None:
    kinds = Counter()
    for s in split_samples(demo, "train").values():
        meta = json.loads(s["json"])
        kinds[meta["caption_kind"]] += 1
        text = s["txt"].decode()
        if meta["caption_kind"] == "clean":
            assert f"{meta['color']} {meta['shape']}" in text
        if meta["caption_kind"] == "wrong":
            assert meta["caption_about"] != f"{meta['color']} {meta['shape']}"
    assert set(kinds) == {"clean", "filename", "boilerplate", "wrong"}
    assert kinds["clean"] > kinds["filename"] > kinds["wrong"]


def test_demo_deterministic(tmp_path: Path) -> None:
    small = dict(n_train=40, n_val=10, n_heldout=24, image_size=24, shard_size=25)
    a, b, c = (build_demo(tmp_path / d, seed=s, **small) for d, s in (("a", 3), ("b", 3), ("c", 4)))
    shards = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.tar"))
    assert len(shards) == 4 and a == b
    assert all((tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes() for p in shards)
    assert (tmp_path / "a" / shards[0]).read_bytes() != (tmp_path / "c" / shards[0]).read_bytes()


def test_demo_refuses_non_empty_dir(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        build_demo(tmp_path, n_train=5, n_val=5, n_heldout=5)
    with pytest.raises(FileExistsError, match="no demo.json"):
        build_demo(tmp_path, n_train=5, n_val=5, n_heldout=5, overwrite=True)
    assert (tmp_path / "keep.txt").read_text() == "mine"


# -- tokenizer -------------------------------------------------------------------------------
def test_expand_and_iter_captions(demo: Path, tmp_path: Path) -> None:
    shards = sorted(str(p) for p in (demo / "train").glob("*.tar"))
    assert expand_shards(demo / "train") == shards
    assert expand_shards(str(demo / "train" / "*.tar")) == shards
    assert expand_shards(str(demo / "train" / "shard-{00000..00002}.tar")) == shards
    assert len(list(iter_captions(shards))) == SMALL["n_train"]
    with ShardWriter(tmp_path) as w:
        w.write("ok", b"i", "fine caption")
        w.write("bad", b"i", extra={"txt": b"\xff\xfe not utf8"})
    assert list(iter_captions(tmp_path)) == ["fine caption"]
    with pytest.raises(FileNotFoundError, match="matched no shard"):
        expand_shards(str(tmp_path / "*.nothing"))


def test_tokenizer_round_trip(demo: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    out = tmp_path / "tok"
    train_wordpiece(iter_captions(demo / "train"), out, vocab_size=300)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tok.pad_token_id == 0 and tok.convert_tokens_to_ids("[PAD]") == 0
    assert len(tok) > 100
    for word in ("red", "star", "blue", "circle", "photo"):
        assert tok.tokenize(word) == [word]
        assert tok.convert_tokens_to_ids(word) != tok.unk_token_id
    enc = tok("A Red Star", padding="max_length", max_length=8)
    assert tok.convert_ids_to_tokens(enc["input_ids"])[:5] == ["[CLS]", "a", "red", "star", "[SEP]"]
    assert enc["input_ids"][5:] == [0, 0, 0] and enc["attention_mask"] == [1] * 5 + [0] * 3
    with pytest.raises(FileExistsError, match="overwrite"):
        train_wordpiece(["a red star"] * 3, out)
    train_wordpiece(["a red star"] * 3, out, vocab_size=50, overwrite=True)
    assert len(AutoTokenizer.from_pretrained(out, local_files_only=True)) <= 50
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# -- CLI -------------------------------------------------------------------------------------
def test_cli_demo_and_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds, tok = tmp_path / "ds", tmp_path / "tok"
    args = ["--n-train", "60", "--n-val", "10", "--n-heldout", "24", "--image-size", "24", "--seed", "1"]
    assert cli.main(["demo", "--out", str(ds), *args]) == 0
    assert "heldout" in capsys.readouterr().out
    assert (ds / "train" / "shard-00000.tar").is_file() and (ds / "classes.json").is_file()
    pattern = str(ds / "train" / "shard-{00000..00000}.tar")
    assert cli.main(["tokenizer", "--shards", pattern, "--out", str(tok), "--vocab-size", "200"]) == 0
    assert "1 shard" in capsys.readouterr().out
    assert (tok / "tokenizer.json").is_file()
    # Existing output without --overwrite: one-line error, exit 2.
    assert cli.main(["tokenizer", "--shards", pattern, "--out", str(tok)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_cli_error_for_unmatched_pattern(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["tokenizer", "--shards", str(tmp_path / "none-{0..3}.tar"), "--out", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "t").exists()
