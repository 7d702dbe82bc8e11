"""Chunked retrieval metrics against a brute-force full-matrix reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_eval_support import one_thread  # noqa: F401 - autouse fixture

from dualenc.eval.compose import compose_query, nearest
from dualenc.eval.retrieval import metrics_from_ranks, recall_curve, retrieval_metrics, retrieval_ranks, topk_search


def brute_force(img: torch.Tensor, txt: torch.Tensor, owner: torch.Tensor,
                pessimistic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks from the full float64 similarity matrix: 1 + #(non-positives strictly above the best positive)
    (or at least as high, if ``pessimistic``)."""
    s = (img[:, None, :].double() * txt[None, :, :].double()).sum(-1)  # every pair by the same formula
    above = torch.ge if pessimistic else torch.gt
    n, m = s.shape
    pos = torch.zeros(n, m, dtype=torch.bool)
    pos[owner, torch.arange(m)] = True
    text_ranks = torch.zeros(n, dtype=torch.long)
    for i in range(n):
        if pos[i].any():
            best = s[i][pos[i]].max()
            text_ranks[i] = 1 + int((above(s[i], best) & ~pos[i]).sum())
    image_ranks = torch.tensor([1 + int((above(s[:, t], s[owner[t], t]) & ~pos[:, t]).sum()) for t in range(m)])
    return text_ranks, image_ranks


def brute_metrics(text_ranks: torch.Tensor, image_ranks: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    out = {}
    for prefix, r in (("image_retrieval", image_ranks), ("text_retrieval", text_ranks[text_ranks > 0])):
        r = r.numpy()
        out.update({f"{prefix}_recall@{k}": float(np.mean(r <= k)) for k in ks})
        out[f"{prefix}_mean_rank"] = float(np.mean(r))
        out[f"{prefix}_median_rank"] = float(np.median(r))
    return out


def data(seed: int, n: int = 23, m: int = 50, d: int = 8, ties: str = ""):
    g = torch.Generator().manual_seed(seed)
    if ties == "int":  # small integers: many exact ties between different vectors
        img = torch.randint(-2, 3, (n, d), generator=g).float()
        txt = torch.randint(-2, 3, (m, d), generator=g).float()
    else:
        img = F.normalize(torch.randn(n, d, generator=g), dim=-1)
        txt = F.normalize(torch.randn(m, d, generator=g), dim=-1)
    if ties:  # duplicate captions and images (float32 matmuls need not score copies identically)
        txt[5] = txt[4]
        txt[20:26] = txt[7]
        img[3] = img[2]
    owner = torch.randint(0, n - 3, (m,), generator=g)  # several captions per image; the last 3 images own none
    owner[:3] = torch.tensor([0, 0, 0])
    return img, txt, owner


@pytest.mark.parametrize("ties", ["", "int", "copies"])
@pytest.mark.parametrize("chunks", [(4, 7), (1, 3), (23, 50), (5, 1000), (1000, 3)])
def test_chunked_ranks_equal_brute_force(ties: str, chunks: tuple[int, int]) -> None:
    for seed in range(2):
        img, txt, owner = data(seed, d=8 if ties == "int" else 200, ties=ties)
        ref_text, ref_image = brute_force(img, txt, owner)
        r = retrieval_ranks(img, txt, owner, topk=0, image_chunk=chunks[0], text_chunk=chunks[1])
        assert torch.equal(r.text_ranks, ref_text)
        assert torch.equal(r.image_ranks, ref_image)
        assert (r.text_ranks[-3:] == 0).all()  # images without captions are no queries
        got = metrics_from_ranks(r) if seed else retrieval_metrics(img, txt, owner, image_chunk=chunks[0],
                                                                  text_chunk=chunks[1])
        ref = brute_metrics(ref_text, ref_image)
        assert {k: got[k] for k in ref} == pytest.approx(ref, abs=1e-12)
        queries = int((torch.bincount(owner, minlength=23) > 0).sum())
        assert (got["images"], got["texts"], got["image_queries"]) == (23, 50, queries)


def test_ranks_do_not_depend_on_chunking_or_scale() -> None:
    # Many duplicate captions (as in real caption sets) and 512-d vectors: float32 block scores of
    # copies differ in their last bits between matmul shapes; the float64 recheck makes them tie.
    img, txt, owner = data(5, n=40, m=90, d=512, ties="copies")
    txt[30:60] = txt[0]
    ref = retrieval_ranks(img, txt, owner, image_chunk=40, text_chunk=90)
    for chunks in ((3, 7), (16, 64), (1, 90)):
        r = retrieval_ranks(img, txt, owner, image_chunk=chunks[0], text_chunk=chunks[1])
        assert torch.equal(r.text_ranks, ref.text_ranks) and torch.equal(r.image_ranks, ref.image_ranks)
    ref_text, ref_image = brute_force(img, txt, owner)
    assert torch.equal(ref.text_ranks, ref_text) and torch.equal(ref.image_ranks, ref_image)
    # Scale does not matter either (the rounding bound scales with the norms).
    r = retrieval_ranks(img * 1000, txt * 0.01, owner, image_chunk=7, text_chunk=11)
    assert torch.equal(r.text_ranks, ref.text_ranks) and torch.equal(r.image_ranks, ref.image_ranks)


def test_collapsed_embeddings_tie_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    import dualenc.eval.retrieval as retrieval

    monkeypatch.setattr(retrieval, "RECHECK_CHUNK", 7)  # the float64 recheck runs in several pieces
    img, txt = torch.ones(9, 4), torch.ones(20, 4)  # a collapsed model: every score is the same
    owner = torch.arange(20) % 8  # image 8 owns no caption
    r = retrieval_ranks(img, txt, owner, image_chunk=4, text_chunk=6)
    assert r.image_ranks.tolist() == [1] * 20 and r.text_ranks.tolist() == [1] * 8 + [0]


def test_ties_count_in_the_querys_favour_or_against_it() -> None:
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # images 0 and 1 are identical
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # captions 0 and 2 are identical
    owner = torch.tensor([1, 2, 0])
    r = retrieval_ranks(img, txt, owner, image_chunk=1, text_chunk=2)
    assert r.image_ranks.tolist() == [1, 1, 1]  # the tied image 0 does not push image 1 down
    assert r.text_ranks.tolist() == [1, 1, 1]
    r = retrieval_ranks(img, txt, owner, image_chunk=2, text_chunk=1, ties="pessimistic")
    assert r.image_ranks.tolist() == [2, 1, 2] and r.text_ranks.tolist() == [2, 2, 1]
    img, txt, owner = data(1, d=8, ties="int")
    r = retrieval_ranks(img, txt, owner, image_chunk=4, text_chunk=7, ties="pessimistic")
    ref_text, ref_image = brute_force(img, txt, owner, pessimistic=True)
    assert torch.equal(r.text_ranks, ref_text) and torch.equal(r.image_ranks, ref_image)
    assert not torch.equal(ref_image, brute_force(img, txt, owner)[1])  # the data does have ties
    with pytest.raises(ValueError, match="ties"):
        retrieval_ranks(img, txt, owner, ties="random")


def test_topk_lists_match_full_sort() -> None:
    img, txt, owner = data(7)
    s = img @ txt.T
    r = retrieval_ranks(img, txt, owner, topk=6, image_chunk=4, text_chunk=9)
    assert torch.equal(r.text_topk, s.topk(6, dim=1).indices)
    assert torch.equal(r.image_topk, s.T.topk(6, dim=1).indices)
    # Recall from ranks agrees with membership of a positive in the top-k list (no ties here).
    for k in (1, 3, 6):
        hit = torch.tensor([bool((owner[r.text_topk[i, :k]] == i).any()) for i in range(23)])
        has = torch.bincount(owner, minlength=23) > 0
        assert torch.equal(hit[has], (r.text_ranks[has] <= k))
    big = retrieval_ranks(img, txt, owner, topk=500)  # k larger than either side is clamped
    assert big.text_topk.shape == (23, 50) and big.image_topk.shape == (50, 23)


def test_topk_search_and_recall_curve() -> None:
    img, txt, _ = data(3)
    v, i = topk_search(txt, img, k=5, query_chunk=7, gallery_chunk=4)
    ref = (txt @ img.T).topk(5, dim=1)
    assert torch.equal(i, ref.indices) and torch.allclose(v, ref.values)
    curve = recall_curve(torch.tensor([1, 2, 0, 7]), [1, 2, 10])  # rank 0: no answer, left out
    assert curve == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 10: 1.0}


def test_compose_query_and_nearest() -> None:
    img = torch.tensor([1.0, 0.0, 0.0])
    txt = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    q = compose_query(img, txt, [1.0, -0.5])
    assert torch.allclose(q, F.normalize(torch.tensor([[1.0, 1.0, -0.5]]), dim=-1))
    gallery = F.normalize(torch.tensor([[1.0, 1.0, -0.5], [1.0, 0.0, 0.0], [0.0, 1.0, 0.5], [1.0, 1.0, -0.4]]), dim=-1)
    scores, idx = nearest(q, gallery, k=2)
    assert idx.tolist() == [[0, 3]] and scores[0, 0] == pytest.approx(1.0)
    _, idx = nearest(q, gallery, k=2, exclude=[0])
    assert idx.tolist() == [[3, 1]]
    with pytest.raises(ValueError, match="zero vector"):
        compose_query(img, torch.tensor([[1.0, 0.0, 0.0]]), -1.0)
    with pytest.raises(ValueError, match="weight"):
        compose_query(img, txt, [1.0, 2.0, 3.0])


@pytest.mark.parametrize("bad, match", [
    ((torch.randn(4, 8), torch.randn(6, 5), torch.zeros(6, dtype=torch.long)), "embedding sizes differ"),
    ((torch.randn(4, 8), torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 4, 0])), "outside 0..3"),
    ((torch.randn(0, 8), torch.randn(6, 8), torch.zeros(6, dtype=torch.long)), "empty"),
    ((torch.randn(4, 8), torch.randn(6, 8), torch.zeros(5, dtype=torch.long)), "one image index per text"),
])
def test_bad_inputs_name_the_problem(bad, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(*bad)
    with pytest.raises(ValueError, match="embedding sizes differ"):
        topk_search(torch.randn(2, 3), torch.randn(5, 4), 2)
