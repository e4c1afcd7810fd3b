"""Channel matching against numpy and scipy on the concatenated data: Pearson r from merged sums,
best match, the one-to-one assignment, constant channels, maps of different sizes, any split."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy.optimize import linear_sum_assignment

from pipeline.compare.pearson import CrossSums, match


def _pair(seed: int, n: int, ca: int = 5, cb: int = 4, hw=(3, 4), hw_b=None):
    """Activations of two 'networks' on the same n images: B's channels mix A's (plus noise)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.relu(torch.randn((n, ca, *hw), generator=g) + 0.3)
    mix = torch.randn((ca, cb), generator=g)
    b = torch.einsum("nchw,cd->ndhw", a, mix) + 0.5 * torch.randn((n, cb, *hw), generator=g)
    if hw_b is not None:
        b = torch.nn.functional.avg_pool2d(b, 2) if hw_b == "half" else b
    return a, torch.relu(b)


def _numpy_r(a: torch.Tensor, b: torch.Tensor, per: str) -> np.ndarray:
    """np.corrcoef over the concatenated samples (positions, or spatial means per image)."""
    if per == "image":
        x, y = a.double().mean((2, 3)).numpy().T, b.double().mean((2, 3)).numpy().T
    else:
        x = a.double().permute(1, 0, 2, 3).reshape(a.shape[1], -1).numpy()
        y = b.double().permute(1, 0, 2, 3).reshape(b.shape[1], -1).numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.corrcoef(x, y)[:len(x), len(x):]


def _acc(batches, per="position") -> CrossSums:
    a0, b0 = batches[0]
    acc = CrossSums("conv3", a0.shape[1], b0.shape[1], per)
    for a, b in batches:
        acc.update(a, b)
    return acc


def test_pearson_and_assignment_equal_numpy_and_scipy_on_concatenated_data():
    batches = [_pair(s, n) for s, n in enumerate((6, 9, 1, 4))]
    acc = _acc(batches)
    a = torch.cat([x for x, _ in batches])
    b = torch.cat([y for _, y in batches])
    want = _numpy_r(a, b, "position")
    np.testing.assert_allclose(acc.correlation(), want, rtol=0, atol=1e-12)
    t = acc.to_table("A", "B").to_pylist()
    assert [r["channel_a"] for r in t] == list(range(5))
    assert [r["best_b"] for r in t] == list(np.argmax(want, 1))
    rows, cols = linear_sum_assignment(want, maximize=True)
    got = {r["channel_a"]: r["matched_b"] for r in t}
    assert {int(i): int(j) for i, j in zip(rows, cols)} == {k: v for k, v in got.items()
                                                             if v is not None}
    assert sum(v is None for v in got.values()) == 5 - 4      # B has 4 channels: one left over
    for r in t:
        assert r["samples"] == a.shape[0] * 12 and r["per"] == "position"
        if r["matched_b"] is not None:
            assert r["matched_r"] == pytest.approx(want[r["channel_a"], r["matched_b"]], abs=1e-12)
        else:
            assert np.isnan(r["matched_r"])


def test_maps_of_different_sizes_use_spatial_means_per_image():
    batches = [_pair(s, n, hw=(4, 4), hw_b="half") for s, n in enumerate((5, 7))]
    acc = _acc(batches, per="image")
    a = torch.cat([x for x, _ in batches])
    b = torch.cat([y for _, y in batches])
    np.testing.assert_allclose(acc.correlation(), _numpy_r(a, b, "image"), rtol=0, atol=1e-12)
    assert acc.n == 12
    with pytest.raises(ValueError, match="differ; use per='image'"):
        CrossSums("x", 5, 4, "position").update(a, b)


def test_self_comparison_matches_every_channel_to_itself_with_r_one():
    g = torch.Generator().manual_seed(0)
    acc = CrossSums("conv3", 6, 6)
    for n in (5, 8):
        a = torch.relu(torch.randn((n, 6, 3, 3), generator=g))
        a[:, 4] = 0.0                                    # a dead channel
        acc.update(a, a.clone())
    t = acc.to_table("A", "A2").to_pylist()
    for r in t:
        if r["channel_a"] == 4:
            assert r["best_b"] is None and r["matched_b"] is None
            assert np.isnan(r["best_r"]) and np.isnan(r["matched_r"])
        else:
            assert r["best_b"] == r["matched_b"] == r["channel_a"]
            assert abs(r["best_r"] - 1) < 1e-9 and abs(r["matched_r"] - 1) < 1e-9


def test_constant_channel_of_b_is_matched_only_when_nothing_else_is_left():
    g = torch.Generator().manual_seed(1)
    a = torch.randn((20, 3, 2, 2), generator=g)
    b = torch.randn((20, 3, 2, 2), generator=g)
    b[:, 1] = 0.7                                        # constant, not zero: the sums round
    acc = CrossSums("x", 3, 3)
    acc.update(a, b)
    r = acc.correlation()
    assert np.isnan(r[:, 1]).all() and np.isfinite(r[:, [0, 2]]).all()
    best_b, best_r, matched_b, matched_r = match(r, acc.constant()[0])
    assert 1 not in best_b.tolist()
    assert sorted(matched_b.tolist()) == [0, 1, 2]        # 3 x 3: the constant one goes last
    k = matched_b.tolist().index(1)
    assert np.isnan(matched_r[k])
    # which A channel gets it: the one whose loss is smallest (scipy on r with NaN -> -1)
    rows, cols = linear_sum_assignment(np.where(np.isnan(r), -1, r), maximize=True)
    assert dict(zip(rows.tolist(), cols.tolist())) == dict(enumerate(matched_b.tolist()))
    # two A channels, two live B channels left for them: the constant one stays unmatched
    _, _, matched_b, _ = match(r[:2], np.zeros(2, bool))
    assert sorted(matched_b.tolist()) == [0, 2]


def test_every_b_channel_constant_still_assigns_and_has_no_best():
    acc = CrossSums("x", 2, 2)
    acc.update(torch.randn((6, 2, 2, 2)), torch.zeros((6, 2, 2, 2)))
    t = acc.to_table("A", "B").to_pylist()
    assert [r["best_b"] for r in t] == [None, None]
    assert sorted(r["matched_b"] for r in t) == [0, 1]
    assert all(np.isnan(r["matched_r"]) for r in t)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=6), st.data())
def test_any_split_merged_equals_one_pass(sizes, data):
    batches = [_pair(s, n) for s, n in enumerate(sizes)]
    whole = _acc(batches)
    cuts = sorted(data.draw(st.sets(st.integers(1, len(sizes) - 1), max_size=len(sizes) - 1))
                  if len(sizes) > 1 else [])
    parts = [_acc(batches[a:b]) for a, b in zip([0, *cuts], [*cuts, len(sizes)])]
    merged = CrossSums.from_state(parts[0].state())
    for p in parts[1:]:
        merged.merge(CrossSums.from_state(p.state()))
    assert merged.n == whole.n
    np.testing.assert_allclose(merged.correlation(), whole.correlation(), rtol=0, atol=1e-12)
    assert merged.to_table("A", "B").drop(["best_r", "matched_r"]).equals(
        whole.to_table("A", "B").drop(["best_r", "matched_r"]))


def test_large_batches_are_cut_into_chunks_with_the_same_sums(monkeypatch):
    import pipeline.compare.pearson as pearson

    a, b = _pair(0, 12)
    whole = _acc([(a, b)])
    monkeypatch.setattr(pearson, "_CHUNK_ELEMENTS", 100)      # 1 image per chunk
    chunked = _acc([(a, b)])
    np.testing.assert_allclose(chunked.sxy.numpy(), whole.sxy.numpy(), rtol=1e-13)
    np.testing.assert_allclose(chunked.correlation(), whole.correlation(), atol=1e-12)


def test_as_an_accumulator_of_a_collection_pairs_the_shared_layer_names():
    """`Use.of(CrossSums, ...)`: one instance per layer both networks have (A's order), samples
    per image where the maps differ in size; its rows equal the direct update's."""
    from pipeline.compare.scan import feature
    from pipeline.results.state import check_state
    from pipeline.stats.analysis import AnalysisResult
    from pipeline.stats.collection import Collection, LayerSpec, Use

    specs = [LayerSpec(feature("A", "p"), 3, 1, 1, 0, 4), LayerSpec(feature("A", "q"), 2, 1, 1, 0, 4),
             LayerSpec(feature("A", "only_a"), 2, 1, 1, 0, 4),
             LayerSpec(feature("B", "p"), 4, 1, 1, 0, 4), LayerSpec(feature("B", "q"), 2, 1, 1, 0, 2)]
    res = AnalysisResult(specs, Collection((Use.of(CrossSums, net_a="A", net_b="B"),)))
    assert [(p.layer, p.per) for _, p, _ in res.entries.values()] == [("p", "position"),
                                                                      ("q", "image")]
    g = torch.Generator().manual_seed(2)
    acts = {s.name: torch.randn((6, s.channels, s.feature_size, s.feature_size), generator=g)
            for s in specs}
    res.update(acts, torch.zeros((6, 3, 4, 4), dtype=torch.uint8), np.arange(6))
    check_state(res.state())
    t = res.tables("")["matches"]
    for layer, per in (("p", "position"), ("q", "image")):
        want = CrossSums(layer, acts[feature("A", layer)].shape[1],
                         acts[feature("B", layer)].shape[1], per).update(
            acts[feature("A", layer)], acts[feature("B", layer)]).to_table("A", "B")
        got = t.filter(pa.compute.equal(t["layer"], layer))
        assert got.equals(want), layer
