"""The minibatch CKA against brute force: the U-statistic over every 4-tuple of images, an
independent numpy loop of the closed form, the properties a wrong estimator fails (orthogonal and
isotropic invariance, self-comparison), not the biased estimator, any split merged == one pass,
and the float32 Gram within 1e-6 of float64 on real post-ReLU features."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from pipeline.compare.cka import CKA, MIN_IMAGES, cka_grid, gram, unbiased_hsic


def _u_statistic(x: np.ndarray, y: np.ndarray) -> float:
    """HSIC as the U-statistic of Song et al. 2012 (Theorem 2): the mean over every ordered
    4-tuple of distinct images of k_ij l_ij + k_ij l_qr - 2 k_ij l_iq (linear kernels)."""
    k, l = x @ x.T, y @ y.T
    n = len(x)
    total = 0.0
    tuples = list(itertools.permutations(range(n), 4))
    for i, j, q, r in tuples:
        total += k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]
    return total / len(tuples)


def _closed_form_loops(x: np.ndarray, y: np.ndarray) -> float:
    """The closed form with explicit sums (no matrix products, no centring)."""
    n = len(x)
    k, l = x @ x.T, y @ y.T
    for m in (k, l):
        for i in range(n):
            m[i, i] = 0.0
    tr = sum(k[i, j] * l[j, i] for i in range(n) for j in range(n))
    sk, sl = k.sum(), l.sum()
    kl1 = sum(k[i, j] * l[j, q] for i in range(n) for j in range(n) for q in range(n))
    return (tr + sk * sl / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * kl1) / (n * (n - 3))


def _biased_cka(xs: list[np.ndarray], ys: list[np.ndarray]) -> float:
    """The biased estimator tr(KHLH)/(n-1)^2 averaged the same way (what we must NOT compute)."""
    def h(x, y):
        n = len(x)
        c = np.eye(n) - 1.0 / n
        return np.trace(x @ x.T @ c @ y @ y.T @ c) / (n - 1) ** 2
    ab = np.mean([h(x, y) for x, y in zip(xs, ys)])
    aa = np.mean([h(x, x) for x in xs])
    bb = np.mean([h(y, y) for y in ys])
    return ab / np.sqrt(aa * bb)


def _features(seed: int, n: int, shapes=((3, 4, 4), (5, 2, 3))) -> list[torch.Tensor]:
    """Post-ReLU-like features (non-negative, a common mean) of two layers, float64; the second
    depends on the first, so that their CKA is well inside (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.relu(torch.randn((n, *shapes[0]), generator=g, dtype=torch.float64) + 0.5)
    mix = torch.randn((a[0].numel(), int(np.prod(shapes[1]))), generator=g, dtype=torch.float64)
    b = torch.relu(a.reshape(n, -1) @ mix + torch.randn((n, mix.shape[1]), generator=g,
                                                         dtype=torch.float64)).reshape(n, *shapes[1])
    return [a, b]


def _acc(batches: list[list[torch.Tensor]], precision: str = "float64") -> CKA:
    acc = CKA([("A", ["x"]), ("B", ["y"])], precision)
    for feats in batches:
        acc.update(feats)
    return acc


def _grid(acc: CKA) -> dict[tuple[str, str, str, str], float]:
    t = acc.to_table().to_pylist()
    return {(r["net_a"], r["layer_a"], r["net_b"], r["layer_b"]): r["cka"] for r in t}


def test_hsic_equals_the_u_statistic_over_every_4_tuple():
    for seed, n in ((0, 4), (1, 5), (2, 7)):
        x, y = (f.reshape(n, -1).numpy() for f in _features(seed, n))
        got = unbiased_hsic(torch.stack([gram(torch.from_numpy(x)), gram(torch.from_numpy(y))]))
        for (i, a), (j, b) in itertools.product(enumerate((x, y)), repeat=2):
            want = _u_statistic(a, b)
            assert abs(float(got[i, j]) - want) <= 1e-9 * max(1.0, abs(want)), (n, i, j)


def test_cka_equals_brute_force_over_minibatches():
    sizes = (9, 12, 7, 4)                    # the last two: a short and a minimal minibatch
    batches = [_features(s, n) for s, n in enumerate(sizes)]
    acc = _acc(batches)
    flat = [[f.reshape(len(f), -1).numpy() for f in b] for b in batches]
    h = {(i, j): np.mean([_closed_form_loops(b[i], b[j]) for b in flat])
         for i in range(2) for j in range(2)}
    want = h[0, 1] / np.sqrt(h[0, 0] * h[1, 1])
    rows = acc.to_table().to_pylist()
    ab = next(r for r in rows if r["net_a"] == "A" and r["net_b"] == "B")
    assert abs(ab["cka"] - want) < 1e-9
    assert abs(ab["hsic_ab"] - h[0, 1]) <= 1e-9 * abs(h[0, 1])
    assert abs(ab["hsic_aa"] - h[0, 0]) <= 1e-9 * h[0, 0]
    assert abs(ab["hsic_bb"] - h[1, 1]) <= 1e-9 * h[1, 1]
    assert (ab["n_images"], ab["n_batches"]) == (sum(sizes), len(sizes))
    assert 0.05 < want < 0.99                  # a test that a constant would not pass


def test_minibatches_below_four_images_do_not_count():
    acc = _acc([_features(0, 8)])
    before = acc.mean_hsic().copy()
    assert acc.update(_features(1, MIN_IMAGES - 1)) is False
    assert (acc.batches, acc.images) == (1, 8)
    np.testing.assert_array_equal(acc.mean_hsic(), before)
    with pytest.raises(ValueError, match="at least 4 images"):
        unbiased_hsic(torch.zeros((1, 3, 3), dtype=torch.float64))


def test_self_comparison_diagonal_one_and_symmetric_grid():
    g = torch.Generator().manual_seed(3)
    layers = ["l1", "l2", "l3"]
    acc = CKA([("A", layers), ("A2", layers)])
    for n in (10, 16, 6):
        feats = [torch.relu(torch.randn((n, 4, 3, 3), generator=g)) for _ in layers]
        acc.update(feats + [f.clone() for f in feats])      # the same network twice
    grid = _grid(acc)
    for x in layers:
        for net_a, net_b in (("A", "A2"), ("A", "A"), ("A2", "A2")):
            assert abs(grid[(net_a, x, net_b, x)] - 1.0) < 1e-9
        for y in layers:
            assert abs(grid[("A", x, "A", y)] - grid[("A", y, "A", x)]) < 1e-12
            assert abs(grid[("A", x, "A2", y)] - grid[("A", x, "A", y)]) < 1e-12
    assert len(grid) == 3 * len(layers) ** 2                 # A×B, A×A, B×B


def test_invariant_to_orthogonal_transform_and_isotropic_scaling():
    batches = [_features(s, n) for s, n in enumerate((8, 11, 6))]
    base = _grid(_acc(batches))[("A", "x", "B", "y")]
    d = batches[0][0][0].numel()
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(d, d)))
    q = torch.from_numpy(q)
    turned = [[a.reshape(len(a), -1) @ q, b * 7.5] for a, b in batches]
    assert abs(_grid(_acc(turned))[("A", "x", "B", "y")] - base) < 1e-9
    # a per-feature (anisotropic) scaling is no symmetry of CKA: the test can fail
    w = torch.linspace(0.1, 5.0, d, dtype=torch.float64)
    skewed = [[a.reshape(len(a), -1) * w, b] for a, b in batches]
    assert abs(_grid(_acc(skewed))[("A", "x", "B", "y")] - base) > 1e-3


def test_not_the_biased_estimator_on_small_minibatches():
    batches = [_features(s, 6) for s in range(5)]
    ours = _grid(_acc(batches))[("A", "x", "B", "y")]
    flat = [[f.reshape(len(f), -1).numpy() for f in b] for b in batches]
    biased = _biased_cka([b[0] for b in flat], [b[1] for b in flat])
    assert abs(ours - biased) > 0.02


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(4, 12), min_size=1, max_size=6), st.data())
def test_any_split_merged_equals_one_pass(sizes, data):
    batches = [_features(s, n) for s, n in enumerate(sizes)]
    whole = _acc(batches)
    cuts = sorted(data.draw(st.sets(st.integers(1, len(sizes) - 1), max_size=len(sizes) - 1))
                  if len(sizes) > 1 else [])
    parts = [_acc(batches[a:b]) for a, b in zip([0, *cuts], [*cuts, len(sizes)])]
    merged = CKA.from_state(parts[0].state())
    for p in parts[1:]:
        merged.merge(CKA.from_state(p.state()))
    np.testing.assert_allclose(merged.mean_hsic(), whole.mean_hsic(), rtol=1e-12, atol=0)
    assert (merged.batches, merged.images) == (whole.batches, whole.images)
    a, b = merged.to_table(), whole.to_table()
    np.testing.assert_allclose(a["cka"].to_numpy(), b["cka"].to_numpy(), rtol=0, atol=1e-12)


def test_constant_layer_has_nan_cka():
    g = torch.Generator().manual_seed(0)
    acc = CKA([("A", ["live", "dead"])])
    for n in (6, 9):
        acc.update([torch.relu(torch.randn((n, 3, 2, 2), generator=g)),
                    torch.full((n, 3, 2, 2), 0.25)])
    grid = _grid(acc)
    assert abs(grid[("A", "live", "A", "live")] - 1.0) < 1e-12
    assert np.isnan(grid[("A", "dead", "A", "dead")]) and np.isnan(grid[("A", "live", "A", "dead")])


def test_float32_gram_within_1e6_of_float64_on_real_features():
    """A real (untrained, seeded) ResNet's post-ReLU layers: large common means, the case
    where an uncentred float32 Gram would cancel badly."""
    from pipeline.models.hooks import capture
    from pipeline.models.layers import resolve_layers
    from pipeline.models.zoo import build_model

    torch.manual_seed(0)
    net = build_model("resnet18", num_classes=4, width=16).eval()
    layers = resolve_layers(net, "pool1,conv3,conv5,conv9,conv13,conv17")
    names = [x.name for x in layers]
    g = torch.Generator().manual_seed(1)
    both = {p: CKA([("A", names), ("B", names)], p) for p in ("float32", "float64")}
    for n in (32, 32, 17):
        images = torch.rand((n, 3, 64, 64), generator=g) + 0.5       # bright: large means
        with torch.no_grad():
            a = capture(net, images, layers)
            b = capture(net, images.flip(3), layers)                 # B sees mirrored images
        feats = [a[x] for x in names] + [b[x] for x in names]
        both["float64"].update(feats)
        both["float32"].update([f.clone() for f in feats], overwrite=True)   # the job's path
    c32, c64 = (cka_grid(both[p].mean_hsic()) for p in ("float32", "float64"))
    assert np.isfinite(c64).all() and c64.min() < 0.95
    assert np.abs(c32 - c64).max() < 1e-6


def test_state_is_plain_arrays_and_device_follows_features():
    acc = _acc([_features(0, 8)])
    s = acc.state()
    assert isinstance(s["hsic"], np.ndarray) and s["hsic"].dtype == np.float64
    back = CKA.from_state(s)
    np.testing.assert_array_equal(back.mean_hsic(), acc.mean_hsic())
    with pytest.raises(ValueError, match="cannot merge"):
        back.merge(CKA([("A", ["x"]), ("C", ["y"])]))
    with pytest.raises(ValueError, match="invalid precision"):
        CKA([("A", ["x"])], "float16")


def test_gram_paths_agree_and_overwrite_centres_in_place():
    """Large minibatches take the three-block product; `overwrite` centres the caller's float32
    tensor in place (also a Trace output made under inference_mode) and gives the same Gram."""
    g = torch.Generator().manual_seed(4)
    x = torch.relu(torch.randn((80, 5, 6, 6), generator=g) + 1.0)
    flat = x.double().reshape(80, -1).numpy()
    c = flat - flat.mean(0)
    want = c @ c.T
    np.fill_diagonal(want, 0.0)
    np.testing.assert_allclose(gram(x, "float64").numpy(), want, rtol=1e-12, atol=1e-9)
    copy = gram(x, "float32")
    with torch.inference_mode():
        owned = x.clone()
    in_place = gram(owned, "float32", overwrite=True)
    np.testing.assert_allclose(in_place.numpy(), copy.numpy(), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(in_place.numpy(), want, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(owned.reshape(80, -1).double().numpy(), c, atol=1e-5)  # centred
    assert torch.equal(gram(x, "float32"), copy)                     # x itself untouched
    acc = CKA([("A", ["l"]), ("B", ["l"])], "float32")
    assert acc.update([owned, owned], overwrite=True)                 # one tensor: one Gram
    assert abs(acc.to_table().to_pylist()[0]["cka"] - 1.0) < 1e-12


def test_as_an_accumulator_of_a_collection_each_batch_one_minibatch():
    """`Use.of(CKA, ...)` in an AnalysisResult: one instance over both networks' features,
    equal to the closed form per minibatch; a batch straddling minibatches or given twice is
    refused; the state passes check_state and survives the npz round trip."""
    from pipeline.compare.scan import feature
    from pipeline.results.state import check_state, from_npz_bytes, to_npz_bytes
    from pipeline.stats.analysis import AnalysisResult
    from pipeline.stats.collection import Collection, LayerSpec, Use

    specs = [LayerSpec(feature(net, "x"), 3, 1, 1, 0, 4) for net in ("A", "B")]
    coll = Collection((Use.of(CKA, net_a="A", net_b="B", batch_size=8),))
    res = AnalysisResult(specs, coll)
    g = torch.Generator().manual_seed(7)
    feats = torch.relu(torch.randn((16, 2, 3, 4, 4), generator=g) + 0.3)   # 16 images, 2 nets
    images = torch.zeros((16, 3, 4, 4), dtype=torch.uint8)
    for k in range(2):
        sl = slice(8 * k, 8 * k + 8)
        res.update({s.name: feats[sl, i].contiguous() for i, s in enumerate(specs)},
                   images[sl], np.arange(sl.start, sl.stop))
    (grid_key, (_, grid, acc)), = res.entries.items()
    assert grid.layers == ("x",) and acc.minibatches == [0, 1]
    flat = [[feats[8 * k:8 * k + 8, i].double().reshape(8, -1).numpy() for i in range(2)]
            for k in range(2)]
    h = {(i, j): np.mean([_closed_form_loops(f[i], f[j]) for f in flat])
         for i in range(2) for j in range(2)}
    row = res.tables("")["cka"].to_pylist()[0]
    assert (row["net_a"], row["net_b"], row["n_batches"], row["n_images"]) == ("A", "B", 2, 16)
    assert abs(row["cka"] - h[0, 1] / np.sqrt(h[0, 0] * h[1, 1])) < 1e-9
    with pytest.raises(ValueError, match="spans minibatches"):
        res.update({s.name: feats[4:12, i].contiguous() for i, s in enumerate(specs)},
                   images[4:12], np.arange(4, 12))
    with pytest.raises(ValueError, match="minibatch 1 added twice"):
        res.update({s.name: feats[8:, i].contiguous() for i, s in enumerate(specs)},
                   images[8:], np.arange(8, 16))
    state = res.state()
    check_state(state)
    back = AnalysisResult.from_state(from_npz_bytes(to_npz_bytes(state)), coll)
    assert back.tables("")["cka"].equals(res.tables("")["cka"])
