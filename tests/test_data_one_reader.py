"""One shard reader everywhere: `dualenc embed --texts`, the data tools and the loaders read a hostile
shard (duplicate members and keys, a non-UTF-8 caption, a pickle, a truncated end) the same safe way."""

from __future__ import annotations

import json
import pickle
from collections import Counter
from pathlib import Path

import pytest
from test_eval_support import one_thread  # noqa: F401 - autouse fixture
from test_eval_support import tiny_model

from dualenc.data.datamodule import eval_loader
from dualenc.data_tools.shards import iter_tar_samples
from dualenc.data_tools.stats import shard_stats
from dualenc.data_tools.tokenizer import iter_captions
from dualenc.eval.embed import embed_to_dir
from real_shards import jpeg, write_tar


@pytest.fixture
def hostile(tmp_path: Path) -> Path:
    d = tmp_path / "hostile"
    d.mkdir()
    write_tar(d / "00000.tar", [
        ("a.jpg", jpeg(1)), ("a.txt", b"a red square"), ("a.txt", b"a second a.txt"),  # duplicate member
        ("b.jpg", jpeg(2)), ("b.txt", "caf\xe9".encode("latin-1")),  # not UTF-8
        ("c.jpg", jpeg(3)), ("c.txt", b"a blue circle"), ("c.pyd", pickle.dumps({"never": "unpickled"})),
        ("a.jpg", jpeg(4)), ("a.txt", b"key a again"),  # duplicate key
    ])
    return d


def test_embed_texts_reads_hostile_shards(hostile: Path, tmp_path: Path) -> None:
    # Used to fail: "ValueError: ...: duplicate file name in tar file txt" (webdataset), and embedded
    # the latin-1 caption with replacement characters.
    m = embed_to_dir(tiny_model(), str(hostile), tmp_path / "emb", "text", "tiny", log=lambda s: None)
    manifest = json.loads((tmp_path / "emb" / "manifest.json").read_text())
    assert m["count"] == 2
    info = manifest["shards"]["emb-00000"]
    assert info["skipped"] == {"duplicate_member": 1, "duplicate_key": 1, "non_utf8_caption": 1}


def test_every_reader_gives_the_same_samples_and_reasons(hostile: Path) -> None:
    skipped: Counter[str] = Counter()
    samples = list(iter_tar_samples([str(hostile / "00000.tar")], skipped))
    assert [s.key for s in samples] == ["a", "b", "c"] and samples[0].read("txt") == b"a red square"
    assert skipped == {"duplicate_member": 1, "duplicate_key": 1}
    assert list(iter_captions(str(hostile))) == ["a red square", "a blue circle"]
    stats = shard_stats(hostile, plots=False, write_sizes=False)
    assert stats["samples"] == 3
    assert stats["problems"] == {"duplicate_member": 1, "duplicate_key": 1, "non_utf8_caption": 1}
    config = {"input_size": (3, 8, 8), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3,
              "crop_pct": 1.0, "crop_mode": "center"}
    batches = list(eval_loader(str(hostile), config, batch_size=8, num_workers=0, label_key=None, caption_key="txt"))
    assert batches[0]["text"] == ["a red square", "a blue circle"]
    assert batches[-1]["skipped"] == {"duplicate_member": 1, "duplicate_key": 1, "non_utf8_caption": 1}
