"""Unpaired matching pieces on a planted rotation of REAL MiniLM embeddings (no pairs), at a test-suite size.

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

from dualenc.plugins.synthetic import random_orthogonal

pytestmark = pytest.mark.usefixtures("single_thread")
FIXTURE = Path(__file__).parent / "fixtures" / "minilm_wordnet_8192.npy"


@pytest.fixture(scope="module")
def planted():
    x = F.normalize(torch.from_numpy(np.load(FIXTURE)).double(), dim=-1)
    r = random_orthogonal(x.shape[1], x.shape[1], torch.Generator().manual_seed(0))
    return x[:4096], x[4096:] @ r.T, r


def test_similarity_profiles_are_rotation_invariant_and_start_on_the_planted_rotation(planted):
    """Same items on both sides, shuffled and rotated: the profiles match exactly, so VecMap's start pairs
    every item with itself and its Procrustes map is the planted rotation (the robust loop's full test is
    tests/test_plugins_translate_real.py, on disjoint items)."""
    from dualenc.plugins.unpaired import similarity_init, similarity_profiles

    a, _, r = planted
    x = a[:1000]
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(1))
    y = (x @ r.T)[perm]
    px, py = similarity_profiles(x), similarity_profiles(y)
    assert torch.allclose(px[perm], py, atol=1e-4)
    xc = x - x.mean(0)
    q = similarity_init(xc, y - y.mean(0), points=1000)
    # On the data, not on Q itself: MiniLM's centred embeddings span 381 of 384 directions, so Q is free in 3.
    assert (xc @ q.double().T - xc @ r.T).abs().max() < 1e-6


def test_csls_pairs_pair_every_point_both_ways():
    from dualenc.plugins.unpaired import csls_pairs

    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 16, generator=g)
    perm = torch.randperm(300, generator=g)
    i, j = csls_pairs(a, a[perm])  # the same points shuffled: CSLS's best match is the true one
    assert len(i) == 600
    assert bool((perm[j] == i).all())
