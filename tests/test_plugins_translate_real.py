"""vec2vec's shipped default on REAL MiniLM embeddings, no pairs: planted rotation, and rotation + nonlinearity.

Fixture: 8,192 real all-MiniLM-L6-v2 embeddings of WordNet glosses (float16; bench/make_minilm_fixture.py).
Source: the first 4,096; target: the other 4,096 (disjoint items), planted. Scored on the source rows
against their planted targets (never shown), among 4,096. The default is vec2vec started from an
unpaired matching (robust MNN-Procrustes + soft Procrustes), not the paper's random start, which stays at
chance here (docs/alignment.md). Steps and widths are cut for speed; init, refinement and selection are
the defaults.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dualenc.plugins.checks import FewAnchorsWarning
from dualenc.plugins.crossmodel import translation_metrics
from dualenc.plugins.synthetic import random_orthogonal
from dualenc.plugins.translate import train_vec2vec
from dualenc.plugins.unpaired import fit_mnn_procrustes

pytestmark = pytest.mark.usefixtures("single_thread")
FIXTURE = Path(__file__).parent / "fixtures" / "minilm_wordnet_8192.npy"
FAST = dict(steps=30, hidden_dim=64, batch_size=128, score_rows=512)


@pytest.fixture(scope="module")
def minilm():
    return F.normalize(torch.from_numpy(np.load(FIXTURE)).float(), dim=-1)


def planted(x: torch.Tensor, eps: float, seed: int = 0) -> torch.Tensor:
    """``normalize(R normalize(x + eps tanh(3 W x)))`` (as bench/study_real_text.py::planted_target)."""
    g = torch.Generator().manual_seed(seed)
    r = random_orthogonal(x.shape[1], x.shape[1], g, torch.float32)
    w = torch.randn(x.shape[1], x.shape[1], generator=g) / x.shape[1] ** 0.5
    y = x + eps * torch.tanh(3 * x @ w.T) if eps else x
    return F.normalize(F.normalize(y, dim=-1) @ r.T, dim=-1)


@pytest.fixture(scope="module")
def starts(minilm):
    """eps -> robust MNN-Procrustes (the default start of vec2vec), fitted once per planted case."""
    cache: dict[float, object] = {}

    def get(eps: float):
        if eps not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FewAnchorsWarning)
                cache[eps] = fit_mnn_procrustes(minilm[:4096].double(), planted(minilm[4096:], eps).double(), robust=True)
        return cache[eps]
    return get


def test_robust_mnn_procrustes_recovers_a_planted_rotation_of_real_minilm(minilm, starts):
    """The start alone: similarity profiles, then CSLS self-learning with stochastic induction."""
    a = minilm[:4096]
    m = starts(0.0)
    r = translation_metrics(m.apply(a.double()).float(), planted(a, 0.0))
    assert r["candidates"] == 4096
    assert r["top1"] >= 0.99, r  # measured 1.000 (identity: 0.000)
    assert r["mean_cosine"] >= 0.88, r  # measured 0.919: a rotation fitted to near-miss pairs of disjoint sets
    assert m.meta.extra["start"] == "similarity" and m.meta.extra["final_keep"] == 1.0


def test_vec2vec_default_recovers_a_planted_rotation_of_real_minilm(minilm, starts):
    a, b = minilm[:4096], planted(minilm[4096:], 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FewAnchorsWarning)
        m, _ = train_vec2vec(a, b, init=starts(0.0), **FAST)  # the default init ("robust_mnn"), fitted once above
    lin = translation_metrics(starts(0.0).apply(a.double()).float(), planted(a, 0.0))
    r = translation_metrics(m.apply(a), planted(a, 0.0))
    assert r["candidates"] == 4096
    assert r["top1"] >= 0.99, r  # measured 1.000
    assert r["mean_cosine"] >= lin["mean_cosine"] + 0.03, (r, lin)  # measured 0.919 -> 0.966 (soft_procrustes)
    assert m.meta.extra["refine"] == 3
    assert len(m.meta.extra["checks"]) == 11 and m.meta.extra["checks"][0]["step"] == 0


def test_vec2vec_default_recovers_rotation_plus_nonlinearity(minilm, starts):
    """The issue's bar (top-1 >= 0.9 with a small nonlinearity, eps 0.1) at 4,096 a side. The old PCA-axis
    start failed here (top-1 0.003; it needed 6,144 a side); eps 0.2 also passes (bench/planted_real_text.py)."""
    eps = 0.1
    a, b = minilm[:4096], planted(minilm[4096:], eps)
    truth = planted(a, eps)
    rot_only = translation_metrics(planted(a, 0.0), truth)["mean_cosine"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FewAnchorsWarning)
        m, _ = train_vec2vec(a, b, init=starts(eps), **FAST)
    lin = translation_metrics(starts(eps).apply(a.double()).float(), truth)
    r = translation_metrics(m.apply(a), truth)
    assert r["candidates"] == 4096
    assert r["top1"] >= 0.95, r  # measured 1.000
    assert r["mean_cosine"] >= lin["mean_cosine"] + 0.03, (r, lin, rot_only)  # measured 0.909 -> 0.954
    assert rot_only < 0.97  # the planted nonlinearity is real: 0.960 cos between rotation alone and the target
