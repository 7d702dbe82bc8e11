"""Smoke test of the alignment study's functions (``dualenc.plugins.study``) on tiny planted embeddings."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dualenc.plugins.study import (EvalSet, anchor_subsets, anchor_sweep, class_retrieval, default_methods,
                                   evaluate_map, identity_map, plot_sweep, reference_metrics, summarize,
                                   unpaired_study, write_json_atomic)
from dualenc.plugins.synthetic import random_orthogonal
from dualenc.plugins.translate import train_vec2vec_best

pytestmark = pytest.mark.usefixtures("single_thread")
DA, DB, C = 10, 8, 6


def planted(seed: int = 0) -> dict:
    """Model B = model A rotated into 8 of A's 10 dims (plus shifts): images cluster by class, captions
    sit near their class's images, so retrieval and zero-shot work in both spaces."""
    g = torch.Generator().manual_seed(seed)
    q = random_orthogonal(DB, DA, g, torch.float32)  # (8, 10) semi-orthogonal
    centers = torch.randn(C, DA, generator=g)
    centers[:, -2:] = 0  # the class structure lives in the 8 dims B keeps

    def side(to_b: bool, x: torch.Tensor, shift: float) -> torch.Tensor:
        return x @ q.T + shift if to_b else x

    def make(to_b: bool) -> tuple[dict, EvalSet]:
        gg = torch.Generator().manual_seed(seed + 1)  # same items for both models
        anchor_cls = torch.randint(C, (60,), generator=gg)
        anchor = centers[anchor_cls] + 0.3 * torch.randn(60, DA, generator=gg)
        eval_cls = torch.arange(C).repeat(5)
        image = centers[eval_cls] + 0.3 * torch.randn(len(eval_cls), DA, generator=gg)
        class_text = centers + 0.1 * torch.randn(C, DA, generator=gg) + 0.5
        text = centers[torch.randint(C, (20,), generator=gg)] + 0.2 * torch.randn(20, DA, generator=gg) + 0.5
        fit_text = centers[torch.randint(C, (40,), generator=gg)] + 0.2 * torch.randn(40, DA, generator=gg) + 0.5
        ev = EvalSet(image=side(to_b, image, 0.2), image_class=eval_cls, class_text=side(to_b, class_text, -0.3),
                     text=side(to_b, text, -0.3), classifiers={"all": side(to_b, class_text, -0.3)})
        return {"anchor": side(to_b, anchor, 0.2), "anchor_class": anchor_cls,
                "fit_text": side(to_b, fit_text, -0.3)}, ev

    (a, ea), (b, eb) = make(False), make(True)
    zs = {"all": (torch.arange(len(ea.image)), ea.image_class)}
    return {"a": a, "b": b, "ea": ea, "eb": eb, "zs": zs}


def test_class_retrieval_and_identity_by_hand():
    index = torch.eye(3)
    # Query 0 (class 1): top rows 0 (class 0), 1 (class 1); query 1 (class 1): rows 1, 2 (class 0).
    r = class_retrieval(torch.tensor([[1.0, 0.5, 0], [0, 1.0, 0.2]]), torch.tensor([1, 1]), index,
                        torch.tensor([0, 1, 0]), ks=(1, 2))
    assert r == {"R@1": 0.5, "R@2": 1.0, "P@2": 0.5}
    assert identity_map(2)(torch.ones(4, 3), "image").shape == (4, 2)
    padded = identity_map(5)(torch.ones(4, 3), "text")
    assert padded.shape == (4, 5) and float(padded[:, 3:].abs().sum()) == 0
    with pytest.raises(ValueError, match="dim"):
        class_retrieval(torch.ones(1, 2), torch.zeros(1, dtype=torch.long), torch.ones(2, 3), torch.zeros(2))


def test_anchor_subsets_are_seeded_and_checked():
    s1, s2 = anchor_subsets(50, [5, 20], 2, seed=1), anchor_subsets(50, [5, 20], 2, seed=1)
    assert [(n, r) for n, r, _ in s1] == [(5, 0), (5, 1), (20, 0), (20, 1)]
    assert all(torch.equal(x[2], y[2]) for x, y in zip(s1, s2))
    assert not torch.equal(s1[0][2], s1[1][2]) and len(set(s1[2][2].tolist())) == 20
    with pytest.raises(ValueError, match="anchor sizes"):
        anchor_subsets(10, [11], 1)


def test_sweep_summary_plot_and_json(tmp_path):
    d = planted()
    methods = default_methods(mlp_steps=30, mlp_hidden=16)
    records = anchor_sweep(d["a"]["anchor"], d["b"]["anchor"], d["ea"], d["eb"], [12, 40], repeats=2,
                           methods=methods, text_means=(d["a"]["fit_text"], d["b"]["fit_text"]), zeroshot=d["zs"],
                           anchor_class=d["a"]["anchor_class"])
    assert len(records) == 2 * 2 * len(methods)
    summ = summarize(records)
    assert set(summ) == set(methods) and set(summ["procrustes"]) == {"12", "40"}
    pr = summ["procrustes"]["40"]
    # The planted map is a (semi-)orthogonal map plus shifts: Procrustes recovers it for both modalities.
    assert pr["image/cos"]["mean"] > 0.95 and pr["text/cos"]["mean"] > 0.95 and pr["image/cos"]["n"] == 2
    assert pr["zeroshot/all/top1"]["mean"] > 0.9 and pr["b_text->a_image/R@1"]["mean"] > 0.9
    assert summ["identity"]["40"]["image/cos"]["mean"] < pr["image/cos"]["mean"] - 0.3
    assert 1 <= pr["anchor_classes"]["mean"] <= C
    refs = reference_metrics(d["ea"], d["eb"], d["zs"])
    assert refs["b/zeroshot/all/top1"] > 0.9 and "a/text->image/R@1" in refs
    png = plot_sweep(summ, [("image/cos", "image"), ("text/cos", "text")], tmp_path / "p.png",
                     references={"text/cos|ref": 1.0})
    assert png.stat().st_size > 1000
    out = write_json_atomic(tmp_path / "r" / "s.json", {"summary": summ})
    assert json.loads(out.read_text())["summary"]["procrustes"]["40"]["image/cos"]["n"] == 2


def test_evaluate_map_keys_and_unpaired_study():
    d = planted(1)
    m = evaluate_map(identity_map(DB), d["ea"], d["eb"], d["zs"])
    assert {"image/cos", "text/top1", "class_text/mean_rank", "a_text->b_image/R@1", "zeroshot/all/top1"} <= set(m)
    g = torch.Generator().manual_seed(3)
    q = random_orthogonal(DB, DA, g, torch.float32)
    xa = F.normalize(torch.randn(300, DA, generator=g) * torch.linspace(2, 0.2, DA), dim=-1)
    xb = F.normalize(torch.randn(300, DA, generator=g) * torch.linspace(2, 0.2, DA), dim=-1) @ q.T
    ta = F.normalize(torch.randn(50, DA, generator=g) * torch.linspace(2, 0.2, DA), dim=-1)
    v2v = {"latent_dim": 8, "hidden_dim": 16}
    out = unpaired_study(xa, xb, ta, ta @ q.T, paired_a=xa[:100], paired_b=xa[:100] @ q.T,
                         vec2vec_seeds=[0, 1], vec2vec_steps=5, vec2vec_kwargs=v2v,
                         sinkhorn_kwargs={"iters": 3, "sinkhorn_iters": 30})
    assert {"identity", "mnn_procrustes", "sinkhorn_procrustes", "vec2vec/seed0", "vec2vec/seed1", "vec2vec/mean",
            "vec2vec/selected", "oracle_paired_procrustes"} <= set(out)
    # The selected seed is the one train_vec2vec_best keeps, and its figures are that seed's.
    _, scores = train_vec2vec_best(xa, xb, seeds=[0, 1], steps=5, **v2v)
    chosen = min(scores, key=lambda r: r["score"])["seed"]
    assert out["vec2vec/selected"]["seed"] == chosen
    assert [out[f"vec2vec/seed{s}"]["unsupervised_score"] for s in (0, 1)] == pytest.approx(
        [r["score"] for r in scores])
    sel = out[f"vec2vec/seed{chosen}"]
    assert all(out["vec2vec/selected"][k] == sel[k] for k in ("mean_cosine", "top1", "mean_rank"))
    assert out["oracle_paired_procrustes"]["mean_cosine"] > 0.9  # 10 -> 8 dims loses a little
    assert all(set(v) >= {"mean_cosine", "top1", "mean_rank"} for v in out.values())
