"""`dualenc-data build` from URLs through the real img2dataset, served from a local HTTP server.

img2dataset is an optional extra (``pip install "dualenc[img2dataset]"``), not in ``dev``: it pins
``webdataset<0.3`` (dualenc runs on 1.x) and pulls wandb and OpenCV, so this test skips without it.
Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import functools
import http.server
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from dualenc.data.datamodule import eval_loader
from dualenc.data_tools.build import build_dataset

pytest.importorskip("img2dataset", reason="img2dataset not installed (pip install 'dualenc[img2dataset]')")

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
           "white": (240, 240, 240)}
DATA_CONFIG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.0,) * 3, "std": (1.0,) * 3,
               "crop_pct": 1.0, "crop_mode": "center"}


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Generated JPEGs (one colour each) served on 127.0.0.1; yields the base URL."""
    root = tmp_path / "www"
    root.mkdir()
    for name, rgb in COLOURS.items():
        Image.new("RGB", (64 + len(name), 48), rgb).save(root / f"{name}.jpg", quality=95)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_build_from_urls_with_real_img2dataset(server: str, tmp_path: Path) -> None:
    table = tmp_path / "urls.csv"
    lines = ["url,caption"] + [f"{server}/{name}.jpg,a plain {name} square" for name in COLOURS]
    lines.insert(3, f"{server}/missing.jpg,a broken link")  # 404: skipped and counted
    table.write_text("\n".join(lines) + "\n")
    out = tmp_path / "shards"
    report = build_dataset(out, table=table, shard_size=4)  # two shards: two img2dataset runs
    assert report["skipped"] == {"download_failed": 1} and report["input"]["urls"] == len(COLOURS) + 1

    # dualenc's own loader reads the shards, and every caption sits beside its own image.
    loader = eval_loader(str(out), DATA_CONFIG, batch_size=4, num_workers=0, label_key=None, caption_key="txt")
    seen = {}
    for batch in loader:
        assert batch["skipped"] == {}
        for image, text in zip(batch["image"], batch["text"]):
            seen[text] = image.mean(dim=(1, 2))  # mean colour in [0, 1]
    assert sorted(seen) == sorted(f"a plain {name} square" for name in COLOURS)
    for name, rgb in COLOURS.items():
        got = seen[f"a plain {name} square"] * 255
        assert max(abs(g - c) for g, c in zip(got.tolist(), rgb)) < 6, (name, got)
    assert not (out / ".download").exists()  # img2dataset's staging is cleaned up


def test_real_img2dataset_empty_shard_feeds_every_worker_and_rank(server: str, tmp_path: Path, monkeypatch) -> None:
    """img2dataset's own webdataset output with a shard whose URLs all fail (``successes: 0``): the
    training loader reads it with real workers (it used to die: "worker 1 of rank 0 read no sample"),
    and 8 workers x 2 ranks take equal steps (the in-process simulation of test_data_real_world)."""
    import json
    from types import SimpleNamespace

    import img2dataset
    import torch

    import dualenc.data.stream as stream_mod
    from dualenc.data.datamodule import WebDataModule

    table = tmp_path / "urls.csv"
    rows = [f"{server}/gone{i}.jpg,a broken link {i}" for i in range(3)]  # shard 0: every URL fails
    good = [f"a plain {name} square, take {i}" for i in range(4) for name in COLOURS]  # 20 samples
    rows += [f"{server}/{c.split()[2]}.jpg,{c}" for c in good]
    table.write_text("url,caption\n" + "\n".join(f'{r.split(",", 1)[0]},"{r.split(",", 1)[1]}"' for r in rows) + "\n")
    out = tmp_path / "i2d"
    img2dataset.download(url_list=str(table), input_format="csv", url_col="url", caption_col="caption",
                         output_format="webdataset", output_folder=str(out), number_sample_per_shard=3,
                         processes_count=1, thread_count=2, image_size=32, resize_mode="no",
                         enable_wandb=False, retries=0, timeout=5)
    stats = {p.name: json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))}
    assert stats["00000_stats.json"]["successes"] == 0  # the real tool wrote an empty shard
    assert sum(s["successes"] for s in stats.values()) == len(good)
    assert (out / "00000.tar").is_file()

    def ids(texts):
        t = torch.ones(len(texts), 2, dtype=torch.long)
        return {"input_ids": t, "attention_mask": t}

    def module(rank: int, world: int, workers: int) -> WebDataModule:
        dm = WebDataModule(train=str(out), batch_size=1, num_workers=workers, shuffle_buffer=0, caption_key="txt",
                           uint8_images=True)
        dm.set_preprocessing(DATA_CONFIG, ids)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, current_epoch=0)
        return dm

    loader = module(0, 1, 4).train_dataloader()
    batches = list(loader)  # real loader processes, one of them given the empty shard
    texts = [t for b in batches for t in b["text"]]
    assert len(batches) == len(loader) == 20  # 5 batches a worker, the empty shard's worker included
    # Whole shards of 3 go to the least-loaded worker (6/5/3/3 samples): the short ones cycle theirs.
    assert set(texts) <= set(good) and len(set(texts)) >= 16

    steps = []
    for rank in range(2):
        loader = module(rank, 2, 8).train_dataloader()
        per_rank = 0
        for w in range(8):
            monkeypatch.setattr(stream_mod, "get_worker_info", lambda w=w: SimpleNamespace(id=w, num_workers=8))
            loader.stream.state = stream_mod.StreamState(epoch=0)
            got = list(iter(loader.stream))
            assert len(got) == loader.stream.batches_per_worker  # no worker runs dry
            per_rank += len(got)
        steps.append(per_rank)
    assert steps[0] == steps[1]  # equal steps on both ranks: no DDP hang
