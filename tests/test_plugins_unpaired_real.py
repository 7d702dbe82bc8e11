"""Unpaired recovery of a planted rotation of REAL MiniLM embeddings (no pairs), at a test-suite size.

The fixture holds 8,192 real all-MiniLM-L6-v2 embeddings of WordNet glosses (float16, written by
bench/make_minilm_fixture.py from bench/real_text_data.py's cache). Source: the first 4,096; target: the
other 4,096, rotated by a random orthogonal R. The map is scored on the source rows, whose rotated
versions were never shown (the two sides are disjoint items).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dualenc.plugins.crossmodel import translation_metrics
from dualenc.plugins.synthetic import random_orthogonal
from dualenc.plugins.unpaired import fit_mnn_procrustes

pytestmark = pytest.mark.usefixtures("single_thread")
FIXTURE = Path(__file__).parent / "fixtures" / "minilm_wordnet_8192.npy"


@pytest.fixture(scope="module")
def planted():
    x = F.normalize(torch.from_numpy(np.load(FIXTURE)).double(), dim=-1)
    r = random_orthogonal(x.shape[1], x.shape[1], torch.Generator().manual_seed(0))
    return x[:4096], x[4096:] @ r.T, r


def test_robust_mnn_procrustes_recovers_a_planted_rotation_of_real_minilm(planted):
    a, b, r = planted
    m = fit_mnn_procrustes(a, b, robust=True)
    metrics = translation_metrics(m.apply(a).float(), (a @ r.T).float())
    assert metrics["candidates"] == 4096
    assert metrics["top1"] >= 0.95, metrics
    # Not just ranks: translations land on their true targets (0.915 measured; identity scores ~0).
    assert metrics["mean_cosine"] >= 0.85, metrics


def test_csls_pairs_pair_every_point_both_ways():
    from dualenc.plugins.unpaired import csls_pairs

    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 16, generator=g)
    perm = torch.randperm(300, generator=g)
    i, j = csls_pairs(a, a[perm])  # the same points shuffled: CSLS's best match is the true one
    assert len(i) == 600
    assert bool((perm[j] == i).all())
