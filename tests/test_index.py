"""dualenc index build / search / eval: planted neighbours, streamed memory bound, map checks, and the
upgrade table (re-embedding vs the map vs identity) on tiny models with an exact planted map."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from test_eval_support import one_thread  # noqa: F401 - autouse fixture
from test_eval_support import tiny_model, write_caption_shards

from dualenc.cli import main
from dualenc.errors import UserError
from dualenc.eval.store import EmbeddingWriter
from dualenc.export import export_model
from dualenc.index import build as build_mod
from dualenc.index.build import build_index
from dualenc.index.search import search
from dualenc.index.store import iter_chunks, open_index, read_meta
from dualenc.plugins.mapfile import MapMeta, ModelId
from dualenc.plugins.procrustes import OrthogonalMap
from dualenc.plugins.synthetic import random_orthogonal
from dualenc.plugins.targets import DualencTarget

pytest.importorskip("faiss")


def write_dir(path: Path, x: np.ndarray, model: str = "synthetic", kind: str = "image", shard: int = 1000,
              prefix: str = "k", fmt: str = "npy") -> list[str]:
    w = EmbeddingWriter(path, kind, model, "test", file_format=fmt)
    ids = [f"{prefix}{i:06d}" for i in range(len(x))]
    for s in range(0, len(x), shard):
        w.write(f"emb-{s // shard:05d}", x[s:s + shard], ids[s:s + shard])
    w.finish()
    return ids


def planted(n: int = 3000, d: int = 32, nq: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    x = g.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    target = g.choice(n, nq, replace=False)
    q = x[target] + 0.02 * g.standard_normal((nq, d)).astype(np.float32)  # far closer to its row than any other
    return x, q, target


@pytest.mark.parametrize("factory,fmt", [("Flat", "npy"), ("HNSW16", "safetensors"), ("IVF16,PQ8x4np", "npy"),
                                         ("auto", "npy")])
def test_build_search_round_trip_finds_planted_neighbours(tmp_path: Path, factory: str, fmt: str) -> None:
    x, q, target = planted()
    ids = write_dir(tmp_path / "emb", x, fmt=fmt, shard=700)
    write_dir(tmp_path / "q", q, prefix="q")
    assert main(["index", "build", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "ix"),
                 "--factory", factory, "--chunk", "500", "--quiet"]) == 0
    meta = read_meta(tmp_path / "ix")
    assert (meta.count, meta.dim, meta.kind, meta.model, meta.normalized) == (3000, 32, "image", "synthetic", True)
    assert not list(tmp_path.glob(".ix*"))  # the temporary build directory was renamed away
    assert main(["index", "info", str(tmp_path / "ix")]) == 0
    out = tmp_path / "res.json"
    assert main(["search", "--index", str(tmp_path / "ix"), "--queries", str(tmp_path / "q"), "--k", "5",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert main(["search", "--index", str(tmp_path / "ix"), "--queries", str(tmp_path / "q"), "--k", "5", "--mmap",
                 "--json", str(tmp_path / "mm.json")]) == 0
    assert json.loads((tmp_path / "mm.json").read_text()) == rows  # a memory-mapped index answers the same
    hits = [r["results"][0]["key"] == ids[t] for r, t in zip(rows, target)]
    # Exact and HNSW find every planted neighbour; 4-bit PQ codes of 32-d noise still find nearly all.
    assert np.mean(hits) >= (1.0 if factory in ("Flat", "HNSW16") else 0.9)
    assert all(ids[t] in [h["key"] for h in r["results"]] for r, t in zip(rows, target)) or factory not in ("Flat",)
    if factory == "Flat":  # exact scores are the cosines
        qn = q / np.linalg.norm(q, axis=1, keepdims=True)
        assert rows[0]["results"][0]["score"] == pytest.approx(float(qn[0] @ x[target[0]]), abs=1e-5)


def test_build_is_atomic_and_refuses_to_clobber(tmp_path: Path, capsys) -> None:
    x, _, _ = planted(n=300)
    write_dir(tmp_path / "emb", x)
    build_index(tmp_path / "emb", tmp_path / "ix", log=lambda s: None)
    before = (tmp_path / "ix" / "index.faiss").read_bytes()
    assert main(["index", "build", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "ix")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(UserError, match="factory"):  # a failing build leaves the old index untouched
        build_index(tmp_path / "emb", tmp_path / "ix", factory="NoSuchIndex", overwrite=True, log=lambda s: None)
    assert (tmp_path / "ix" / "index.faiss").read_bytes() == before and not list(tmp_path.glob(".ix*"))
    (tmp_path / "notindex").mkdir()
    with pytest.raises(UserError, match="not a dualenc index"):
        build_index(tmp_path / "emb", tmp_path / "notindex", overwrite=True, log=lambda s: None)
    assert main(["search", "--index", str(tmp_path / "emb"), "--queries", str(tmp_path / "emb")]) == 2
    assert "not a dualenc index" in capsys.readouterr().err


def test_streamed_build_stays_within_a_chunk_memory_bound(tmp_path: Path, monkeypatch) -> None:
    d, chunk = 64, 512
    g = np.random.default_rng(1)
    x = g.standard_normal((20000, d)).astype(np.float32)  # 5 MiB of vectors, 40 chunks, 4 shards
    write_dir(tmp_path / "emb", x, shard=5000)
    chunk_bytes = chunk * d * 4
    tracemalloc.start()
    rows = 0
    for ids, vec in iter_chunks(tmp_path / "emb", chunk):
        assert len(vec) <= chunk and len(ids) == len(vec)
        rows += len(vec)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert rows == len(x)
    # One chunk copy at a time (plus a shard's id list), never the 5 MiB directory.
    assert peak < 4 * chunk_bytes + 2**20, peak
    assert peak < x.nbytes / 3
    # The build adds exactly those chunks, and trains on a bounded, evenly spread sample.
    seen: list[int] = []
    real = build_mod.iter_chunks

    def spy(path, n):
        for ids, vec in real(path, n):
            seen.append(len(vec))
            yield ids, vec
    monkeypatch.setattr(build_mod, "iter_chunks", spy)
    meta = build_index(tmp_path / "emb", tmp_path / "ix", factory="IVF8,Flat", chunk_rows=chunk, train_size=1000,
                       log=lambda s: None)
    assert max(seen) <= chunk and meta.train_size == 1000
    assert sum(seen) == len(x)  # one pass adds every row; the training sample reads only its own rows
    index, meta, keys = open_index(tmp_path / "ix")
    assert index.ntotal == len(x) and keys.get(np.array([0, 19999, -1])) == ["k000000", "k019999", None]


# ---- models, maps and the upgrade table ------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """NEW = tiny model A; OLD = A with rotated projections (so OLD = NEW @ R^T exactly); OTHER = unrelated."""
    root = tmp_path_factory.mktemp("index_models")
    write_caption_shards(root / "caps", n=24, shard_size=8)
    new = export_model(tiny_model(0), root / "new")
    rotated = tiny_model(0)
    r = random_orthogonal(16, 16, torch.Generator().manual_seed(3), torch.float32)
    with torch.no_grad():
        rotated.image_proj.weight.copy_(r @ rotated.image_proj.weight)
        rotated.text_proj.weight.copy_(r @ rotated.text_proj.weight)
    old = export_model(rotated, root / "old")
    other = export_model(tiny_model(1), root / "other")
    for name, path in (("new", new), ("old", old), ("other", other)):
        for kind in ("images", "texts") if name != "other" else ("texts",):
            assert main(["embed", "--model", str(path), f"--{kind}", str(root / "caps"), "--workers", "0",
                         "--out", str(root / "emb" / name / kind)]) == 0
    ident = {n: DualencTarget(str(p)).identity() for n, p in (("new", new), ("old", old), ("other", other))}
    zeros = torch.zeros(16, dtype=torch.float64)
    means = {f"{m}_{s}": zeros.clone() for m in ("image", "text") for s in ("source", "target")}
    OrthogonalMap(r.double(), means, MapMeta("procrustes", ident["new"], ident["old"], 0)).save(root / "new2old.st")
    OrthogonalMap(r.double(), means, MapMeta("procrustes", ident["other"], ident["old"], 0)).save(root / "other2old.st")
    OrthogonalMap(r.double(), means, MapMeta("procrustes", ident["new"], ident["other"], 0)).save(root / "new2other.st")
    assert main(["index", "build", "--embeddings", str(root / "emb" / "old" / "images"), "--out", str(root / "ix"),
                 "--quiet"]) == 0
    return {"root": root, "new": new, "old": old, "other": other, "r": r, **{f"id_{k}": v for k, v in ident.items()}}


def test_index_records_the_model_fingerprint(models) -> None:
    meta = read_meta(models["root"] / "ix")
    assert meta.fingerprint == models["id_old"].fingerprint and meta.dim == 16 and meta.kind == "image"


def test_search_with_exact_map_equals_searching_with_the_old_model(models) -> None:
    root, texts = models["root"], ["a red square", "blue number 3", "photo 7"]
    old = DualencTarget(str(models["old"]))
    new = DualencTarget(str(models["new"]))
    direct = search(str(root / "ix"), old.encode_text(texts), "text", old.identity(), k=5)
    mapped = search(str(root / "ix"), new.encode_text(texts), "text", new.identity(), str(root / "new2old.st"), k=5)
    assert [[h["key"] for h in r] for r in mapped] == [[h["key"] for h in r] for r in direct]
    assert [h["score"] for r in mapped for h in r] == pytest.approx([h["score"] for r in direct for h in r], abs=1e-5)
    # The CLI gives the same, for text and for image files.
    out = root / "cli.json"
    assert main(["search", "--index", str(root / "ix"), "--model", str(models["new"]), "--map",
                 str(root / "new2old.st"), *[x for t in texts for x in ("--text", t)], "--k", "5",
                 "--json", str(out)]) == 0
    assert [[h["key"] for h in r["results"]] for r in json.loads(out.read_text())] == \
        [[h["key"] for h in r] for r in direct]
    from test_eval_support import image

    image("red", 1).save(root / "q.png")
    assert main(["search", "--index", str(root / "ix"), "--model", str(models["old"]), "--image",
                 str(root / "q.png"), "--k", "3", "--json", str(out)]) == 0
    assert len(json.loads(out.read_text())[0]["results"]) == 3


def test_mismatched_map_or_model_is_refused(models, capsys) -> None:
    root, ix = models["root"], str(models["root"] / "ix")
    base = ["search", "--index", ix, "--text", "a red square"]
    # A map fitted for another query model.
    assert main([*base, "--model", str(models["new"]), "--map", str(root / "other2old.st")]) == 2
    err = capsys.readouterr().err
    assert "does not fit this search" in err and "source" in err and models["id_other"].fingerprint in err
    # A map into another model's space than the index's.
    assert main([*base, "--model", str(models["new"]), "--map", str(root / "new2other.st")]) == 2
    assert "target" in capsys.readouterr().err
    # No map, but queries of another model: refused, pointing at --map.
    assert main([*base, "--model", str(models["new"])]) == 2
    assert "--map" in capsys.readouterr().err
    # Query embeddings of another model, likewise.
    assert main(["search", "--index", ix, "--queries", str(root / "emb" / "other" / "texts")]) == 2
    assert "--map" in capsys.readouterr().err
    with pytest.raises(UserError, match="does not fit"):
        search(ix, torch.randn(2, 16), "text", models["id_new"], str(root / "new2other.st"))


def test_index_eval_planted_exact_map_reports_known_answer(models, capsys) -> None:
    """OLD = NEW rotated exactly: through the map NEW queries score exactly OLD's recall, identity does not."""
    root, e = models["root"], models["root"] / "emb"
    out = root / "eval.json"
    args = ["index", "eval", "--old-images", str(e / "old" / "images"), "--new-images", str(e / "new" / "images"),
            "--map", str(root / "new2old.st"), "--factory", "Flat", "--factory", "PQ4x4np", "--json", str(out)]
    # Text -> image (captions KEY#j answer to image KEY).
    assert main([*args, "--old-queries", str(e / "old" / "texts"), "--new-queries", str(e / "new" / "texts")]) == 0
    table = capsys.readouterr().out
    assert "new->old (map)" in table and "old->old" in table
    rep = json.loads(out.read_text())
    assert set(rep["indexes"]) == {"Flat", "PQ4x4np"} and rep["query_kind"] == "text"
    for fac, res in rep["indexes"].items():
        r = res["recall"]
        assert r["new->old (map)"] == pytest.approx(r["old->old"], abs=1e-9)  # the same index, the same queries
        if fac == "Flat":  # a rotation keeps every cosine (PQ codebooks are not rotation invariant)
            assert r["new->new"] == pytest.approx(r["old->old"], abs=1e-9)
    # Image -> same image across the upgrade: the map finds each image's OLD vector, identity mostly not.
    assert main([*args, "--old-queries", str(e / "old" / "images"), "--new-queries", str(e / "new" / "images")]) == 0
    rep = json.loads(out.read_text())["indexes"]["Flat"]["recall"]
    assert rep["new->old (map)"]["R@1"] == 1.0 == rep["old->old"]["R@1"] == rep["new->new"]["R@1"]
    assert rep["new->old (identity)"]["R@1"] < 0.5


def test_index_eval_fitted_map_beats_identity(models, tmp_path: Path) -> None:
    """A Procrustes map fitted on some images, applied to held-out ones, of a noisily related OLD model."""
    g = np.random.default_rng(0)
    d, n = 32, 2000
    new = g.standard_normal((n, d)).astype(np.float32)
    rot = random_orthogonal(d, d, torch.Generator().manual_seed(5), torch.float64).numpy()
    old = (new @ rot.T + 0.3 * g.standard_normal((n, d)) / d**0.5 + 0.2).astype(np.float32)  # rotated, noisy, shifted
    write_dir(tmp_path / "new", new, model="new-model")
    write_dir(tmp_path / "old", old, model="old-model")
    held = slice(1500, 2000)
    write_dir(tmp_path / "qn", new[held], model="new-model", prefix="q")
    write_dir(tmp_path / "qo", old[held], model="old-model", prefix="q")
    # Answers are the same keys: rename the query ids to the held-out items' keys.
    for sub in ("qn", "qo"):
        f = tmp_path / sub / "emb-00000.ids.json"
        f.write_text(json.dumps([f"k{i:06d}" for i in range(1500, 2000)]))
    from dualenc.plugins.embeddings import EmbeddingSet

    fit = OrthogonalMap.fit_embeddings(EmbeddingSet({"image": torch.from_numpy(new[:1500])}, ModelId("new-model", d)),
                                       EmbeddingSet({"image": torch.from_numpy(old[:1500])}, ModelId("old-model", d)))
    fit.save(tmp_path / "map.st")
    out = tmp_path / "eval.json"
    assert main(["index", "eval", "--old-images", str(tmp_path / "old"), "--new-images", str(tmp_path / "new"),
                 "--old-queries", str(tmp_path / "qo"), "--new-queries", str(tmp_path / "qn"), "--map",
                 str(tmp_path / "map.st"), "--json", str(out)]) == 0
    rep = json.loads(out.read_text())["indexes"]
    for fac, res in rep.items():
        r = res["recall"]
        assert r["new->old (map)"]["R@10"] > r["new->old (identity)"]["R@10"] + 0.5, (fac, r)
        assert r["new->old (map)"]["R@1"] > 0.8 and r["new->new"]["R@1"] == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("fmt", ["npy", "safetensors"])
def test_training_sample_is_spread_over_every_shard(tmp_path: Path, fmt: str) -> None:
    from dualenc.index.store import sample_rows

    x = np.random.default_rng(2).standard_normal((2500, 8)).astype(np.float32)
    write_dir(tmp_path / "emb", x, shard=1000, fmt=fmt)
    want = np.unique(np.linspace(0, 2499, 100).round().astype(int))
    assert np.array_equal(sample_rows(tmp_path / "emb", 100), x[want])
    assert np.array_equal(np.concatenate([v for _, v in iter_chunks(tmp_path / "emb", 300)]), x)
