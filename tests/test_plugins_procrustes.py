"""Closed-form Procrustes Q, whitening, map files and the bad-input checks."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from dualenc.plugins import (FewAnchorsWarning, MapMismatchError, ModelId, OrthogonalMap, Whitening, fit_procrustes,
                             fit_whitening, load_map)
from dualenc.plugins.mapfile import read_map
from dualenc.plugins.procrustes import procrustes_q
from dualenc.plugins.synthetic import planted_pair

EYE_TOL = 1e-5


def assert_orthogonal(q: torch.Tensor) -> None:
    small = min(q.shape)
    gram = q.T @ q if q.shape[0] >= q.shape[1] else q @ q.T
    assert torch.allclose(gram, torch.eye(small, dtype=q.dtype), atol=EYE_TOL), (gram - torch.eye(small)).abs().max()


def test_recovers_planted_rotation_and_shift_exactly():
    p = planted_pair(n=64, d_source=8, seed=0)
    m = fit_procrustes(p.source_image, p.target_image, source="A", target="B")
    assert_orthogonal(m.q)
    torch.testing.assert_close(m.q, p.q, atol=1e-10, rtol=0)
    torch.testing.assert_close(m.apply(p.source_image), p.target_image, atol=1e-10, rtol=0)
    assert m.meta.extra["relative_residual"] < 1e-12
    assert m.meta.anchors == 64 and m.meta.source == ModelId("A", 8) and m.meta.target == ModelId("B", 8)


def test_matches_scipy_orthogonal_procrustes():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 6, generator=g, dtype=torch.float64), torch.randn(40, 6, generator=g, dtype=torch.float64)
    xc, yc = x - x.mean(0), y - y.mean(0)
    q_torch = procrustes_q(xc, yc, use_scipy=False)
    r, _ = scipy_linalg.orthogonal_procrustes(xc.numpy(), yc.numpy())
    torch.testing.assert_close(q_torch, torch.from_numpy(r.T.copy()), atol=1e-10, rtol=0)
    torch.testing.assert_close(procrustes_q(xc, yc, use_scipy=True), q_torch, atol=1e-10, rtol=0)
    assert_orthogonal(q_torch)


@pytest.mark.parametrize("d_s,d_t", [(6, 9), (9, 6)])
def test_semi_orthogonal_when_dims_differ(d_s, d_t):
    if d_t >= d_s:  # the target is an isometric copy in a bigger space: exact recovery
        p = planted_pair(n=50, d_source=d_s, d_target=d_t, seed=2)
        m = fit_procrustes(p.source_image, p.target_image)
        assert m.q.shape == (d_t, d_s)
        assert_orthogonal(m.q)
        torch.testing.assert_close(m.apply(p.source_image), p.target_image, atol=1e-9, rtol=0)
    else:  # projection to fewer dims: still a semi-orthogonal (row-orthonormal) Q
        g = torch.Generator().manual_seed(2)
        m = fit_procrustes(torch.randn(50, d_s, generator=g), torch.randn(50, d_t, generator=g))
        assert m.q.shape == (d_t, d_s)
        assert_orthogonal(m.q)
    inv = m.inverse()
    assert inv.q.shape == (d_s, d_t) and inv.meta.source.dim == d_t


def test_same_q_maps_text_with_its_own_means():
    p = planted_pair(n=80, d_source=8, seed=3)
    m = fit_procrustes(p.source_image, p.target_image, source_text=p.source_text, target_text=p.target_text)
    # Q came from images only; text has other means on both sides, yet maps exactly.
    torch.testing.assert_close(m.apply(p.source_text, "text"), p.target_text, atol=1e-10, rtol=0)
    # Using the image means for text would be wrong: the check that the means matter.
    wrong = (p.source_text - m.means["image_source"]) @ m.q.T + m.means["image_target"]
    assert (wrong - p.target_text).abs().max() > 0.1
    back = m.inverse().apply(p.target_text, "text")
    torch.testing.assert_close(back, p.source_text, atol=1e-10, rtol=0)


def test_text_without_text_means_is_a_clear_error():
    p = planted_pair(n=20, d_source=4)
    m = fit_procrustes(p.source_image, p.target_image)
    with pytest.raises(ValueError, match="no text means"):
        m.apply(p.source_text, "text")


def test_noisy_fit_close_and_orthogonal():
    p = planted_pair(n=400, d_source=16, seed=4, noise=0.01)
    m = fit_procrustes(p.source_image.float(), p.target_image.float())
    assert_orthogonal(m.q)
    assert (m.q - p.q).abs().max() < 0.02


def test_save_load_round_trip(tmp_path):
    p = planted_pair(n=30, d_source=5, seed=5)
    src = ModelId("model-a", 5, "aaaa")
    tgt = ModelId("model-b", 5, "bbbb")
    m = fit_procrustes(p.source_image, p.target_image, source_text=p.source_text, target_text=p.target_text,
                       source=src, target=tgt)
    path = m.save(tmp_path / "maps" / "a2b.safetensors")
    assert not [f for f in path.parent.iterdir() if f.name.startswith(".")]  # no temp file left
    meta, tensors = read_map(path)
    assert meta.kind == "procrustes" and meta.anchors == 30 and meta.source == src and meta.target == tgt
    assert meta.fit_date.startswith("20") and "relative_residual" in meta.extra
    assert set(tensors) == {"Q", "mean_image_source", "mean_image_target", "mean_text_source", "mean_text_target"}
    loaded = load_map(path, source=src, target=tgt)
    assert isinstance(loaded, OrthogonalMap)
    torch.testing.assert_close(loaded.q, m.q, atol=0, rtol=0)
    for mod in ("image", "text"):
        x = getattr(p, f"source_{mod}")
        torch.testing.assert_close(loaded.apply(x, mod), m.apply(x, mod), atol=0, rtol=0)


def test_map_applied_to_the_wrong_model_fails(tmp_path):
    p = planted_pair(n=30, d_source=5, seed=6)
    m = fit_procrustes(p.source_image, p.target_image, source=ModelId("model-a", 5, "aaaa"), target="model-b")
    path = m.save(tmp_path / "m.safetensors")
    with pytest.raises(MapMismatchError, match="model-a.*model-c|different model"):
        load_map(path, source=ModelId("model-c", 5, "cccc"))
    with pytest.raises(MapMismatchError, match="not 'model-c'"):
        load_map(path, target="model-c")
    loaded = load_map(path)
    with pytest.raises(MapMismatchError, match="5-dim"):
        loaded.apply(torch.randn(3, 7, dtype=torch.float64))
    with pytest.raises(MapMismatchError, match="8-dim"):
        loaded.apply(torch.randn(3, 5, dtype=torch.float64), source=ModelId("model-a", 8))
    loaded.apply(p.source_image, source=ModelId("renamed-a", 5, "aaaa"))  # same weights, other name: fine
    with pytest.raises(ValueError, match="not a dualenc map"):
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
        load_map(tmp_path / "other.safetensors")


def test_bad_inputs_are_clear_errors():
    p = planted_pair(n=30, d_source=5)
    with pytest.raises(ValueError, match="anchor counts differ.*30.*29"):
        fit_procrustes(p.source_image, p.target_image[:29])
    nan = p.source_image.clone()
    nan[3, 1] = float("nan")
    nan[7, 0] = float("inf")
    with pytest.raises(ValueError, match=r"2 of 30 embeddings contain NaN or inf \(rows 3, 7\)"):
        fit_procrustes(nan, p.target_image)
    with pytest.raises(ValueError, match="NaN"):
        fit_procrustes(p.source_image, p.target_image).apply(nan)
    with pytest.raises(ValueError, match="at least 2"):
        fit_procrustes(p.source_image[:1], p.target_image[:1])
    with pytest.raises(ValueError, match="2-D"):
        fit_procrustes(p.source_image[0], p.target_image[0])
    with pytest.raises(ValueError, match="both source_text and target_text"):
        fit_procrustes(p.source_image, p.target_image, source_text=p.source_text)


def test_too_few_anchors_warns_or_refuses():
    p = planted_pair(n=5, d_source=8, seed=7)
    with pytest.raises(ValueError, match="5 anchors for 8 dimensions"):
        fit_procrustes(p.source_image, p.target_image, on_few_anchors="error")
    with pytest.warns(FewAnchorsWarning, match="only determined on that subspace"):
        m = fit_procrustes(p.source_image, p.target_image)
    assert_orthogonal(m.q)  # the fallback is still orthogonal, and exact on the anchors themselves
    torch.testing.assert_close(m.apply(p.source_image), p.target_image, atol=1e-9, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_procrustes(planted_pair(n=9, d_source=8).source_image, planted_pair(n=9, d_source=8).target_image)


def test_numpy_inputs_accepted():
    p = planted_pair(n=20, d_source=4)
    m = fit_procrustes(p.source_image.numpy(), p.target_image.numpy())
    torch.testing.assert_close(m.q, p.q, atol=1e-10, rtol=0)
    with pytest.raises(TypeError, match="object arrays"):
        fit_procrustes(np.array([[None]], dtype=object), p.target_image)


# ---- whitening -----------------------------------------------------------------------------------


def test_whitening_gives_identity_covariance_and_topk(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64) + 3
    w = fit_whitening(x, source="bert")
    z = w.apply(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(6, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(torch.cov(z.T), torch.eye(6, dtype=torch.float64), atol=1e-10, rtol=0)
    w3 = fit_whitening(x, k=3, source="bert")
    z3 = w3.apply(x)
    assert z3.shape == (500, 3)
    torch.testing.assert_close(torch.cov(z3.T), torch.eye(3, dtype=torch.float64), atol=1e-10, rtol=0)
    # The top-k directions carry the most variance of the original data.
    var_kept = (x - x.mean(0)) @ w3.w / w3.w.norm(dim=0)
    assert var_kept.var(0).min() >= torch.linalg.eigvalsh(torch.cov(x.T))[-3] - 1e-8
    path = w3.save(tmp_path / "white.safetensors")
    loaded = load_map(path, source="bert")
    assert isinstance(loaded, Whitening) and loaded.out_dim == 3 and loaded.meta.extra["k"] == 3
    torch.testing.assert_close(loaded.apply(x), z3, atol=0, rtol=0)
    with pytest.raises(MapMismatchError):
        load_map(path, source="other-model")


def test_whitening_bad_inputs():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="Pass k <= 4"):
        fit_whitening(torch.randn(5, 8, generator=g))
    fit_whitening(torch.randn(5, 8, generator=g), k=4)
    with pytest.raises(ValueError, match="degenerate"):
        x = torch.randn(50, 3, generator=g, dtype=torch.float64)
        fit_whitening(torch.cat([x, x[:, :1]], 1))
    with pytest.raises(ValueError, match=r"k must be in \[1, 3\]"):
        fit_whitening(torch.randn(50, 3, generator=g), k=4)
