"""Embedding directories: format, atomic shards, resume, and `embed_to_dir` from shards / folders / text files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_eval_support import tiny_model, write_caption_shards, write_image_folder, write_labelled_shards
from test_eval_support import one_thread  # noqa: F401 - autouse fixture

from dualenc.eval.embed import embed_to_dir
from dualenc.eval.store import EmbeddingWriter, iter_shards, load_embeddings, read_manifest


@pytest.mark.parametrize("fmt", ["npy", "safetensors"])
def test_writer_roundtrip_and_resume(tmp_path: Path, fmt: str) -> None:
    w = EmbeddingWriter(tmp_path, "image", "m", "src", fmt)
    a, b = np.random.rand(3, 4).astype(np.float32), np.random.rand(2, 4).astype(np.float32)
    w.write("emb-00000", a, ["x", "y", "z"], {"source": "s0"})
    assert w.done("emb-00000") and not w.done("emb-00001")
    with pytest.raises(ValueError, match="incomplete"):
        load_embeddings(tmp_path)
    w.write("emb-00001", torch.from_numpy(b), ["u", "v"])
    w.finish()
    got = load_embeddings(tmp_path)
    assert got.ids == ["x", "y", "z", "u", "v"] and np.array_equal(got.vectors, np.concatenate([a, b]))
    assert got.dim == 4 and got.manifest["count"] == 5 and got.manifest["complete"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    # Reopening with the same identity resumes: finished shards stay done.
    w2 = EmbeddingWriter(tmp_path, "image", "m", "src", fmt)
    assert w2.done("emb-00000") and w2.done("emb-00001") and not read_manifest(tmp_path)["complete"]
    with pytest.raises(ValueError, match="embedding size 3 differs"):
        w2.write("emb-00002", np.zeros((1, 3)), ["w"])
    with pytest.raises(ValueError, match="already holds other embeddings.*model"):
        EmbeddingWriter(tmp_path, "image", "other-model", "src", fmt)
    w3 = EmbeddingWriter(tmp_path, "text", "other-model", "src", fmt, overwrite=True)
    assert not w3.done("emb-00000") and not list(tmp_path.glob("emb-*"))


def test_damaged_shards_are_reported(tmp_path: Path) -> None:
    w = EmbeddingWriter(tmp_path, "text", "m", "src")
    w.write("emb-00000", np.zeros((2, 3), np.float32), ["a", "b"])
    w.finish()
    (tmp_path / "emb-00000.ids.json").write_text(json.dumps(["a"]))
    with pytest.raises(ValueError, match="damaged"):
        list(iter_shards(tmp_path))
    with pytest.raises(FileNotFoundError, match="dualenc embed"):
        load_embeddings(tmp_path / "nowhere")
    # Object arrays would need unpickling: refused, never loaded.
    np.save(tmp_path / "emb-00000.npy", np.array([{"a": 1}, {"b": 2}], dtype=object), allow_pickle=True)
    (tmp_path / "emb-00000.ids.json").write_text(json.dumps(["a", "b"]))
    with pytest.raises(ValueError, match="pickle"):
        load_embeddings(tmp_path)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_embed_image_shards_resumes(tmp_path: Path, model) -> None:
    write_labelled_shards(tmp_path / "data", per_class=3, shard_size=4)  # 12 samples -> 3 shards
    logs: list[str] = []
    m = embed_to_dir(model, str(tmp_path / "data"), tmp_path / "emb", "image", "tiny", num_workers=2,
                     batch_size=3, log=logs.append)
    assert m["count"] == 12 and len(m["shards"]) == 3 and m["dim"] == 16
    got = load_embeddings(tmp_path / "emb")
    assert sorted(got.ids) == [f"s{i:04d}" for i in range(12)]
    # Each output shard holds exactly the samples of its input shard (workers never mixed them).
    for name, ids, _ in iter_shards(tmp_path / "emb"):
        assert ids == [f"s{i:04d}" for i in range(4 * int(name[-1]), 4 * int(name[-1]) + 4)]
    with torch.no_grad():
        from dualenc.eval.encode import encode_images, eval_batches

        batches = eval_batches(str(tmp_path / "data"), model.image_tower.data_config, 5, 0, labels=False)
        ref = encode_images(model, batches)
    order = [ref.keys.index(k) for k in got.ids]
    assert torch.allclose(got.tensor(), ref.embeddings[order], atol=1e-5)
    # Rerun: one shard lost its manifest entry (as after a crash): only that one is redone.
    manifest = json.loads((tmp_path / "emb" / "manifest.json").read_text())
    del manifest["shards"]["emb-00001"]
    (tmp_path / "emb" / "manifest.json").write_text(json.dumps(manifest))
    before = (tmp_path / "emb" / "emb-00000.npy").stat().st_mtime_ns
    logs.clear()
    embed_to_dir(model, str(tmp_path / "data"), tmp_path / "emb", "image", "tiny", num_workers=0, log=logs.append)
    assert logs[0] == f"skipping 2 finished shard(s) in {tmp_path / 'emb'}" and logs[1].startswith("wrote emb-00001")
    assert (tmp_path / "emb" / "emb-00000.npy").stat().st_mtime_ns == before
    assert load_embeddings(tmp_path / "emb").ids == got.ids


def test_embed_texts_folder_and_textfile(tmp_path: Path, model) -> None:
    caps = write_caption_shards(tmp_path / "caps", n=5, shard_size=2)
    m = embed_to_dir(model, str(tmp_path / "caps"), tmp_path / "t", "text", "tiny", file_format="safetensors",
                     log=lambda s: None)
    got = load_embeddings(tmp_path / "t")
    assert got.ids == [f"c{i:04d}#{j}" for i, c in enumerate(caps) for j in range(len(c))]
    assert m["params"]["caption_key"] == "txt"
    write_image_folder(tmp_path / "img", per_class=2)
    embed_to_dir(model, str(tmp_path / "img"), tmp_path / "i", "image", "tiny", shard_size=3, num_workers=0,
                 log=lambda s: None)
    got = load_embeddings(tmp_path / "i")
    assert len(got.manifest["shards"]) == 3 and got.ids[:2] == ["blue/img0.png", "blue/img1.png"]
    (tmp_path / "lines.txt").write_text("a red square\n\n  a blue square \n")
    embed_to_dir(model, str(tmp_path / "lines.txt"), tmp_path / "l", "text", "tiny", log=lambda s: None)
    got = load_embeddings(tmp_path / "l")
    assert got.ids == ["1", "3"] and np.allclose(np.linalg.norm(got.vectors, axis=1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="shard_size"):  # resuming with other settings is refused
        embed_to_dir(model, str(tmp_path / "img"), tmp_path / "i", "image", "tiny", shard_size=2, log=lambda s: None)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no non-empty line"):
        embed_to_dir(model, str(tmp_path / "empty.txt"), tmp_path / "e", "text", "tiny", log=lambda s: None)
