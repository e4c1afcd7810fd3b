"""Colour whitening: whitened covariance is the identity, merged parts equal the whole."""
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from hypothesis import given, settings, strategies as st

from pipeline.data.preprocess import IMAGENET, WhiteningStats, preprocess_from_state


def _correlated(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 12, 12, generator=g, dtype=torch.float64)
    mix = torch.tensor([[1.0, 0.0, 0.0], [0.7, 0.3, 0.0], [0.2, 0.5, 0.3]], dtype=torch.float64)
    return torch.einsum("ij,njhw->nihw", mix, x)


def test_zca_whitens_to_identity_covariance_and_is_symmetric():
    x = _correlated()
    zca = WhiteningStats().update(x).fit(eps=0.0)
    y = zca(x)
    px = y.permute(1, 0, 2, 3).reshape(3, -1)
    cov = torch.cov(px, correction=0)
    torch.testing.assert_close(cov, torch.eye(3, dtype=torch.float64), atol=1e-8, rtol=0)
    torch.testing.assert_close(px.mean(1), torch.zeros(3, dtype=torch.float64), atol=1e-10, rtol=0)
    w = np.asarray(zca.matrix)
    assert np.allclose(w, w.T)  # ZCA (not PCA) whitening: the symmetric square root
    torch.testing.assert_close(zca.inverse(y), x, atol=1e-10, rtol=0)


def test_stats_equal_numpy_moments():
    x = _correlated(n=3, seed=4)
    s = WhiteningStats().update(x)
    px = x.permute(1, 0, 2, 3).reshape(3, -1).numpy()
    mean, cov = s.mean_cov()
    assert s.n == px.shape[1]
    np.testing.assert_allclose(mean, px.mean(1), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(px, bias=True), rtol=1e-10, atol=1e-14)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 7), min_size=1, max_size=8), st.randoms(use_true_random=False))
def test_merge_of_any_split_equals_the_whole(assignment, rnd):
    x = _correlated(n=len(assignment), seed=len(assignment))
    whole = WhiteningStats().update(x)
    parts: dict[int, WhiteningStats] = {}
    for i, part in enumerate(assignment):
        parts.setdefault(part, WhiteningStats()).update(x[i:i + 1])
    order = list(parts.values())
    rnd.shuffle(order)
    merged = WhiteningStats()
    for p in order:
        merged.merge(WhiteningStats.from_state(p.state()))
    assert merged.n == whole.n
    np.testing.assert_allclose(merged.sum, whole.sum, rtol=1e-12)
    np.testing.assert_allclose(merged.sum_outer, whole.sum_outer, rtol=1e-12)


def test_normalize_equals_torchvision_and_round_trips():
    x = torch.rand(2, 3, 8, 8)
    want = TF.normalize(x, IMAGENET.mean, IMAGENET.std)
    torch.testing.assert_close(IMAGENET(x), want)
    torch.testing.assert_close(IMAGENET.inverse(IMAGENET(x)), x)


def test_state_round_trip_restores_the_same_function():
    x = _correlated().float()
    for p in (IMAGENET, WhiteningStats().update(x.double()).fit()):
        q = preprocess_from_state(p.state())
        assert type(q) is type(p)
        torch.testing.assert_close(q(x), p(x))
    with pytest.raises(ValueError, match="allowed: identity, normalize, zca"):
        preprocess_from_state({"kind": "pca"})
