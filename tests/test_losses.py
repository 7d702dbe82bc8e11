"""Losses against naive references, and the per-rank decomposition simulated in one process."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from dualenc.losses import LOSSES, LossSpec, contrastive_loss, get_loss, sigmoid_loss

DT = torch.float64


def _features(n: int = 8, d: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=DT), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=DT), dim=-1)
    return img.requires_grad_(), txt.requires_grad_()


def _scale_bias(scale: float = 3.0, bias: float = -1.5) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.tensor(scale, dtype=DT, requires_grad=True),
        torch.tensor(bias, dtype=DT, requires_grad=True),
    )


# ---- naive references: explicit loops, no batching tricks -----------------------------------


def _naive_ce(rows, cols, scale, bias, eps):
    """Mean over rows of label-smoothed CE where row i's target is column i."""
    n = rows.shape[0]
    total = rows.new_zeros(())
    for i in range(n):
        logits = torch.stack([scale * torch.dot(rows[i], cols[j]) + bias for j in range(n)])
        log_z = torch.log(torch.exp(logits).sum())
        nll = [log_z - logits[j] for j in range(n)]
        total = total + (1 - eps) * nll[i] + eps * sum(nll) / n
    return total / n


def naive_contrastive(img, txt, scale, bias=None, eps=0.0):
    b = 0.0 if bias is None else bias
    return 0.5 * (_naive_ce(img, txt, scale, b, eps) + _naive_ce(txt, img, scale, b, eps))


def naive_sigmoid(img, txt, scale, bias):
    n = img.shape[0]
    total = img.new_zeros(())
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            logit = scale * torch.dot(img[i], txt[j]) + bias
            total = total - torch.log(torch.sigmoid(z * logit))
    return total / n


def _grads(loss, inputs):
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def _assert_close_all(a, b, atol=1e-10, rtol=1e-9):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if x is None or y is None:
            assert x is None or torch.count_nonzero(x) == 0
            assert y is None or torch.count_nonzero(y) == 0
            continue
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol)


# ---- value and gradient vs reference --------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_contrastive_matches_naive(eps):
    img, txt = _features()
    scale, _ = _scale_bias()
    inputs = (img, txt, scale)
    got = contrastive_loss(img, txt, scale, label_smoothing=eps)
    ref = naive_contrastive(img, txt, scale, eps=eps)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)
    _assert_close_all(_grads(got, inputs), _grads(ref, inputs))


def test_contrastive_bias_is_shift_invariant():
    img, txt = _features()
    scale, bias = _scale_bias()
    inputs = (img, txt, scale, bias)
    got = contrastive_loss(img, txt, scale, bias)
    ref = naive_contrastive(img, txt, scale, bias)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got, contrastive_loss(img, txt, scale), atol=1e-12, rtol=1e-12)
    g_got, g_ref = _grads(got, inputs), _grads(ref, inputs)
    _assert_close_all(g_got, g_ref)
    assert abs(g_got[3].item()) < 1e-12  # softmax ignores a constant shift


def test_sigmoid_matches_naive():
    img, txt = _features()
    scale, bias = _scale_bias()
    inputs = (img, txt, scale, bias)
    got = sigmoid_loss(img, txt, scale, bias)
    ref = naive_sigmoid(img, txt, scale, bias)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)
    _assert_close_all(_grads(got, inputs), _grads(ref, inputs))


# ---- simulated ranks: local rows x global columns, no processes ------------------------------


def _per_rank_mean(fn, img, txt, scale, bias, world, **kw):
    n = img.shape[0]
    local = n // world
    losses = []
    for r in range(world):
        sl = slice(r * local, (r + 1) * local)
        losses.append(
            fn(img[sl], txt[sl], scale, bias, all_image_features=img, all_text_features=txt,
               offset=r * local, **kw)
        )
    return torch.stack(losses).mean()


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize(
    "fn, kw",
    [(contrastive_loss, {}), (contrastive_loss, {"label_smoothing": 0.1}), (sigmoid_loss, {})],
    ids=["contrastive", "contrastive-ls", "siglip"],
)
def test_simulated_ranks_equal_full_batch(fn, kw, world):
    img, txt = _features(n=12, d=6, seed=1)
    scale, bias = _scale_bias()
    inputs = (img, txt, scale, bias)
    full = fn(img, txt, scale, bias, **kw)
    split = _per_rank_mean(fn, img, txt, scale, bias, world, **kw)
    torch.testing.assert_close(split, full, atol=1e-12, rtol=1e-12)
    _assert_close_all(_grads(split, inputs), _grads(full, inputs))


def test_sigmoid_ignores_all_image_features():
    img, txt = _features()
    scale, bias = _scale_bias()
    a = sigmoid_loss(img[:4], txt[:4], scale, bias, all_text_features=txt, offset=0)
    b = sigmoid_loss(img[:4], txt[:4], scale, bias, all_image_features=img,
                     all_text_features=txt, offset=0)
    torch.testing.assert_close(a, b)


def test_bad_offset_or_partial_gather_raises():
    img, txt = _features()
    scale, bias = _scale_bias()
    with pytest.raises(ValueError):
        contrastive_loss(img[:4], txt[:4], scale, all_image_features=img,
                         all_text_features=txt, offset=6)
    with pytest.raises(ValueError):
        contrastive_loss(img[:4], txt[:4], scale, all_text_features=txt)
    with pytest.raises(ValueError):
        sigmoid_loss(img[:4], txt[:4], scale, bias, offset=4)


# ---- behaviour -----------------------------------------------------------------------------


def test_label_smoothing_mixes_in_uniform_term():
    img, txt = _features()
    scale, _ = _scale_bias()
    eps = 0.2
    with torch.no_grad():
        plain = contrastive_loss(img, txt, scale)
        smooth = contrastive_loss(img, txt, scale, label_smoothing=eps)
        # Uniform term: mean over every (row, class) of -log p, both directions.
        uniform = 0.5 * sum(
            -(F.log_softmax(scale * a @ b.T, dim=-1)).mean() for a, b in ((img, txt), (txt, img))
        )
    torch.testing.assert_close(smooth, (1 - eps) * plain + eps * uniform)
    assert not torch.isclose(smooth, plain)


def test_aligned_features_give_near_zero_contrastive_loss():
    feats = torch.eye(6, dtype=DT)  # orthonormal: each image matches exactly its own text
    loss = contrastive_loss(feats, feats.clone(), torch.tensor(100.0, dtype=DT))
    assert loss.item() < 1e-30
    random_loss = contrastive_loss(*_features(n=6), torch.tensor(1.0, dtype=DT))
    assert random_loss.item() > 1.0


def test_registry_names_and_aliases():
    assert {"contrastive", "clip", "align", "siglip"} <= set(LOSSES.names())
    spec = get_loss("contrastive")
    assert isinstance(spec, LossSpec)
    assert get_loss("clip") is spec and get_loss("align") is spec
    assert spec.fn is contrastive_loss and not spec.uses_bias and spec.init_logit_bias is None
    assert spec.init_logit_scale == pytest.approx(math.log(1 / 0.07))
    sig = get_loss("siglip")
    assert sig.fn is sigmoid_loss and sig.uses_bias
    assert sig.init_logit_scale == pytest.approx(math.log(10.0))
    assert sig.init_logit_bias == -10.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        sig.uses_bias = False  # type: ignore[misc]


def test_unknown_loss_lists_known_names():
    with pytest.raises(KeyError) as err:
        get_loss("no-such-loss")
    msg = str(err.value)
    for name in ("contrastive", "siglip", "clip", "align"):
        assert name in msg
