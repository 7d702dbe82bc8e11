"""Unpaired translation (vec2vec and MNN-Procrustes) on planted data, and the cross-model metrics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dualenc.plugins import MapMismatchError, ModelId, Vec2VecMap, fit_mnn_procrustes, load_map, train_vec2vec
from dualenc.plugins.crossmodel import (backward_compatibility, cross_model_report, mean_cosine, ranks_of_truth,
                                        retrieval_metrics, translation_metrics, zero_shot_accuracy)
from dualenc.plugins.synthetic import gaussian_mixture, random_orthogonal

pytestmark = pytest.mark.usefixtures("single_thread")
D = 16


@pytest.fixture(scope="module")
def unpaired():
    """Space b is a rotated copy of space a (both on the sphere); the two training sets hold *different* items."""
    g = torch.Generator().manual_seed(0)
    r = random_orthogonal(D, D, g, torch.float32)

    def to_b(x):
        return F.normalize(x, dim=-1) @ r.T

    train_a = F.normalize(gaussian_mixture(2000, D, generator=g), dim=-1)
    train_b = to_b(gaussian_mixture(2000, D, generator=g))
    test = gaussian_mixture(500, D, generator=g)
    return {"a": train_a, "b": train_b, "test_a": F.normalize(test, dim=-1), "test_b": to_b(test)}


def test_translators_beat_identity_and_report(unpaired, tmp_path, record_property, capsys):
    a, b, ta, tb = unpaired["a"], unpaired["b"], unpaired["test_a"], unpaired["test_b"]
    identity = translation_metrics(ta, tb)
    mnn = fit_mnn_procrustes(a, b, source="A", target="B")
    mnn_m = translation_metrics(mnn.apply(ta.double()).float(), tb)
    v2v, log = train_vec2vec(a, b, source=ModelId("A", D), target=ModelId("B", D), steps=300, batch_size=128,
                             latent_dim=32, hidden_dim=64, seed=0, log_every=100)
    v2v_m = translation_metrics(v2v.apply(ta), tb)
    report = {"identity": identity, "mnn_procrustes": mnn_m, "vec2vec": v2v_m}
    record_property("unpaired_comparison", report)
    with capsys.disabled():
        print("\nunpaired translation on planted data (500 held-out items, 500 candidates):")
        for name, m in report.items():
            print(f"  {name:15s} mean_cos {m['mean_cosine']:+.3f}  top1 {m['top1']:.3f}  "
                  f"mean_rank {m['mean_rank']:.1f}")
    # Both beat doing nothing; the cheap baseline nails a planted rotation.
    for m in (mnn_m, v2v_m):
        assert m["mean_cosine"] > identity["mean_cosine"] + 0.2
        assert m["mean_rank"] < identity["mean_rank"]
    assert mnn_m["mean_cosine"] > 0.9 and mnn.meta.extra["mnn_pairs"] > 100
    assert len(log) == 4 and all(k in log[0] for k in ("adversarial", "latent_adversarial", "reconstruction",
                                                        "cycle", "vsp"))
    # Save / load round trip, inverse direction, metadata checks.
    path = v2v.save(tmp_path / "v2v.safetensors")
    loaded = load_map(path, source="A", target="B")
    assert isinstance(loaded, Vec2VecMap)
    torch.testing.assert_close(loaded.apply(ta), v2v.apply(ta))
    back = loaded.inverse()
    assert back.meta.source.name == "B" and back.apply(tb).shape == ta.shape
    assert translation_metrics(back.apply(tb), ta)["mean_cosine"] > identity["mean_cosine"]
    with pytest.raises(MapMismatchError):
        loaded.apply(ta, source="C")


def test_vec2vec_handles_different_dims_and_bad_input():
    g = torch.Generator().manual_seed(1)
    m, _ = train_vec2vec(torch.randn(64, 6, generator=g), torch.randn(80, 10, generator=g), steps=3, batch_size=16,
                         latent_dim=8, hidden_dim=16)
    out = m.apply(torch.randn(5, 6, generator=g))
    assert out.shape == (5, 10)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5))
    bad = torch.randn(10, 6)
    bad[2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        train_vec2vec(bad, torch.randn(10, 6), steps=1)
    with pytest.raises(TypeError, match="vsp_weight"):
        train_vec2vec(torch.randn(10, 6), torch.randn(10, 6), steps=1, weights={"vsp_weight": 1.0})


def test_mnn_identity_init_and_text_means():
    g = torch.Generator().manual_seed(2)
    x = gaussian_mixture(400, 8, generator=g)
    m = fit_mnn_procrustes(x, x + 1.0, init="identity", source_text=x[:50], target_text=x[:50] + 2.0)
    torch.testing.assert_close(m.q, torch.eye(8, dtype=m.q.dtype), atol=1e-6, rtol=0)
    torch.testing.assert_close(m.apply(x[:3].double(), "text"), x[:3].double() + 2.0, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="init must be"):
        fit_mnn_procrustes(x, x, init="random")


# ---- metrics ---------------------------------------------------------------------------------------------


def test_ranks_and_retrieval_metrics_by_hand():
    index = torch.eye(4)
    queries = torch.tensor([[1.0, 0, 0, 0], [0.9, 0.5, 0, 0], [0, 0, 0, 1.0]])
    truth = torch.tensor([0, 1, 2])
    r = ranks_of_truth(queries, index, truth)
    assert r.tolist() == [1, 2, 4]  # ties count against the truth (query 2 scores 0 for rows 0, 1, 2)
    m = retrieval_metrics(queries, index, truth, ks=(1, 2))
    assert m == {"top1": pytest.approx(1 / 3), "mean_rank": pytest.approx(7 / 3), "median_rank": 2.0,
                 "R@1": pytest.approx(1 / 3), "R@2": pytest.approx(2 / 3)}
    collapsed = translation_metrics(torch.ones(10, 4), torch.ones(10, 4))  # all tied: worst rank, not best
    assert collapsed["top1"] == 0.0 and collapsed["mean_rank"] == 10.0 and collapsed["mean_cosine"] == pytest.approx(1)
    x = F.normalize(torch.randn(30, 5), dim=-1)
    t = translation_metrics(x, x, chunk=8)
    assert t["top1"] == 1.0 and t["mean_rank"] == 1.0 and t["candidates"] == 8
    assert t["mean_cosine"] == pytest.approx(1.0)
    assert mean_cosine(x, -x) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="one space"):
        mean_cosine(x, x[:, :4])
    with pytest.raises(ValueError, match="map them into one space"):
        ranks_of_truth(x, x[:, :4])
    with pytest.raises(ValueError, match="NaN"):
        ranks_of_truth(x * float("nan"), x)


def test_cross_model_zero_shot_and_backward_compatibility():
    g = torch.Generator().manual_seed(3)
    n, d = 40, 8
    img_a = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt_a = F.normalize(img_a + 0.1 * torch.randn(n, d, generator=g), dim=-1)
    q = random_orthogonal(d, d, g, torch.float32)
    a = {"image": img_a, "text": txt_a}
    b = {"image": img_a @ q.T, "text": txt_a @ q.T}
    rep = cross_model_report(a, b, lambda x, m: x @ q.T, lambda x, m: x @ q, ks=(1, 5))
    assert rep["a2b/image/mean_cosine"] == pytest.approx(1.0) and rep["b2a/text/top1"] == 1.0
    assert rep["a2b/text->image/R@1"] == pytest.approx(rep["b/text->image/R@1"])  # the map loses nothing
    assert rep["a2b/text->image/R@5"] >= rep["a2b/text->image/R@1"] > 0.5
    broken = cross_model_report(a, b, lambda x, m: x)  # no map: A's queries in B's index are lost
    assert broken["a2b/text->image/R@1"] < 0.3 and "b2a/image/top1" not in broken
    # Zero-shot: A's images mapped into B against B's "prompts" (class embeddings).
    labels = torch.arange(n) % 4
    prompts_a = F.normalize(torch.randn(4, d, generator=g), dim=-1)  # A's class prompt embeddings
    shots_a = F.normalize(prompts_a[labels] + 0.3 * torch.randn(n, d, generator=g), dim=-1)
    zs = zero_shot_accuracy(shots_a @ q.T, labels, prompts_a @ q.T, ks=(1, 5))  # mapped images vs B's prompts
    assert set(zs) == {"top1"} and zs["top1"] == zero_shot_accuracy(shots_a, labels, prompts_a)["top1"] > 0.9
    assert zero_shot_accuracy(shots_a, labels, prompts_a @ q.T)["top1"] < 0.6  # unmapped: near chance
    # Backward compatibility: the mapped new model vs the old model on the old index.
    bc = backward_compatibility(txt_a @ q.T, b["text"], b["image"])
    assert bc["compatible"] and bc["new_to_old"] == pytest.approx(bc["old_to_old"])
    bad = backward_compatibility(txt_a, b["text"], b["image"], metric="mean_rank")
    assert not bad["compatible"] and bad["new_to_old"] > bad["old_to_old"]
    with pytest.raises(ValueError, match="unknown metric"):
        backward_compatibility(txt_a, b["text"], b["image"], metric="R@3")


def test_unsupervised_score_needs_no_pairs_and_sees_distribution_mismatch(unpaired):
    """The exact (planted) translation scores near 0; identity has no cycle/vsp error but a large MMD."""
    from dualenc.plugins.translate import unsupervised_score

    a, b = unpaired["a"], unpaired["b"]
    u, _, vh = torch.linalg.svd(unpaired["test_b"].T @ unpaired["test_a"])  # recover the planted rotation
    rot = u @ vh
    exact = unsupervised_score(lambda x: x @ rot.T, lambda y: y @ rot, a, b, n=512)
    ident = unsupervised_score(lambda x: x, lambda y: y, a, b, n=512)
    # vsp is a mean absolute difference (as in the public code): float32 noise is ~1e-7, not ~1e-14.
    assert exact["cycle"] < 1e-8 and exact["vsp"] < 1e-5 and ident["cycle"] < 1e-8 and ident["vsp"] < 1e-5
    assert exact["mmd"] < 0.01 < 0.05 < ident["mmd"]
    assert exact["score"] < ident["score"]


def test_vec2vec_best_of_seeds_keeps_the_lowest_unsupervised_score(unpaired, tmp_path):
    from dualenc.plugins.translate import train_vec2vec_best, unsupervised_score

    a, b = unpaired["a"][:600], unpaired["b"][:600]
    kw = dict(steps=40, batch_size=64, latent_dim=16, hidden_dim=32)
    best, scores = train_vec2vec_best(a, b, seeds=[0, 1, 2], source="A", target="B", score_rows=300, **kw)
    assert [s["seed"] for s in scores] == [0, 1, 2]
    chosen = min(scores, key=lambda s: s["score"])
    sel = best.meta.extra["selection"]
    assert sel["chosen_seed"] == chosen["seed"] == best.meta.extra["seed"] and sel["scores"] == scores
    # The chosen map is exactly that seed's run, and its recorded score is reproducible.
    alone, _ = train_vec2vec(a, b, seed=chosen["seed"], source="A", target="B", **kw)
    torch.testing.assert_close(best.apply(unpaired["test_a"]), alone.apply(unpaired["test_a"]))
    again = unsupervised_score(best.apply, best.inverse().apply, a, b, n=300)
    assert again["score"] == pytest.approx(chosen["score"], rel=1e-5)
    loaded = load_map(best.save(tmp_path / "best.safetensors"))
    assert loaded.meta.extra["selection"]["chosen_seed"] == chosen["seed"]
    with pytest.raises(ValueError, match="seeds"):
        train_vec2vec_best(a, b, seed=1, **kw)
    # `dualenc align fit --method vec2vec --args '{"seeds": [0, 1]}'` goes through fit_embeddings.
    from dualenc.plugins.embeddings import EmbeddingSet

    m = Vec2VecMap.fit_embeddings(EmbeddingSet({"image": a}, ModelId("A", D)),
                                  EmbeddingSet({"image": b}, ModelId("B", D)), seeds=[0, 1], score_rows=100, **kw)
    assert [s["seed"] for s in m.meta.extra["selection"]["scores"]] == [0, 1]


def test_vec2vec_from_an_unpaired_start_recovers_the_planted_rotation(unpaired):
    """No pairs anywhere: MNN-Procrustes as vec2vec's start (``init="mnn"``), then adversarial, cycle and VSP
    training; the planted rotation is recovered at top-1 >= 0.99 among 500 and training does not undo it."""
    a, b, ta, tb = unpaired["a"], unpaired["b"], unpaired["test_a"], unpaired["test_b"]
    m, log = train_vec2vec(a, b, init="mnn", steps=100, batch_size=128, hidden_dim=64, seed=0, log_every=50)
    r = translation_metrics(m.apply(ta), tb)
    assert r["top1"] >= 0.99 and r["mean_cosine"] > 0.97, r
    assert m.meta.extra["init"] == "mnn" and log[-1]["cycle"] < 0.05
    back = translation_metrics(m.inverse().apply(tb), ta)
    assert back["top1"] >= 0.99


def test_soft_procrustes_moves_a_nearly_right_rotation_toward_the_planted_one(unpaired):
    """No pairs: from the planted rotation perturbed by a small random rotation, soft matches between the two
    disjoint sets pull the map back (measured distance 1.16 -> 0.33) and it stays orthogonal."""
    from dualenc.plugins.translate import soft_procrustes

    a, b, ta, tb = unpaired["a"], unpaired["b"], unpaired["test_a"], unpaired["test_b"]
    r = torch.linalg.lstsq(ta, tb).solution.T  # the planted rotation, read off the paired test set
    k = 0.05 * torch.randn(D, D, generator=torch.Generator().manual_seed(5))
    q0 = r @ torch.linalg.matrix_exp(k - k.T)
    q = soft_procrustes(a, b, q0, a.mean(0), b.mean(0))
    torch.testing.assert_close(q @ q.T, torch.eye(D), atol=1e-4, rtol=0)
    assert (q - r).norm() < 0.5 * (q0 - r).norm(), ((q - r).norm(), (q0 - r).norm())
