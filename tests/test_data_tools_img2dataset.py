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
