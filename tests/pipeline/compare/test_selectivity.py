"""Class selectivity against a direct computation (per-class means of per-image spatial means of
max(activation, 0)), unknown labels, absent classes, dead channels, any split merged."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from pipeline.compare.selectivity import ClassMeans


def _batch(seed: int, n: int, classes: int = 5, c: int = 4):
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn((n, c, 3, 2), generator=g) + 0.2      # pre-ReLU: max(., 0) matters
    labels = torch.randint(-1, classes, (n,), generator=g).numpy()
    labels[labels == 3] = 2                                   # class 3 never has an image
    return acts, labels


def _direct(acts: torch.Tensor, labels: np.ndarray) -> list[dict]:
    """Straight from the definition, one channel and one class at a time."""
    out = []
    x = np.maximum(acts.double().numpy(), 0).mean((2, 3))
    for ch in range(acts.shape[1]):
        means = {k: x[labels == k, ch].mean() for k in sorted(set(labels.tolist()) - {-1})}
        top = max(means, key=lambda k: (means[k], -k))
        rest = np.mean([v for k, v in means.items() if k != top])
        si = (means[top] - rest) / (means[top] + rest) if means[top] + rest > 0 else np.nan
        out.append({"channel": ch, "selectivity": si, "top_class": top,
                    "n_classes": len(means), "mu_max": means[top], "mu_rest": rest})
    return out


def _acc(batches, classes=5) -> ClassMeans:
    acc = ClassMeans("conv3", batches[0][0].shape[1], classes)
    for acts, labels in batches:
        acc.update(acts, labels)
    return acc


def test_selectivity_equals_direct_computation():
    batches = [_batch(s, n) for s, n in enumerate((7, 12, 3))]
    acc = _acc(batches)
    acts = torch.cat([a for a, _ in batches])
    labels = np.concatenate([l for _, l in batches])
    rows = acc.to_table("resnet34").to_pylist()
    want = _direct(acts, labels)
    assert len(rows) == 4
    for got, w in zip(rows, want):
        assert got["net"] == "resnet34" and got["layer"] == "conv3"
        assert got["channel"] == w["channel"] and got["top_class"] == w["top_class"]
        assert got["n_classes"] == w["n_classes"] == 4            # 0, 1, 2, 4
        assert got["images"] == int((labels >= 0).sum())
        for k in ("selectivity", "mu_max", "mu_rest"):
            assert got[k] == pytest.approx(w[k], rel=1e-6, abs=1e-12)   # float32 image sums
        assert 0 < got["selectivity"] < 1


def test_dead_channel_and_single_class_are_nan():
    acts = torch.randn((6, 2, 2, 2))
    acts[:, 1] = -1.0                                       # max(., 0) = 0 everywhere
    acc = ClassMeans("x", 2, 3)
    acc.update(acts, np.array([0, 1, 2, 0, 1, -1]))
    rows = acc.to_table("A").to_pylist()
    assert np.isfinite(rows[0]["selectivity"]) and np.isnan(rows[1]["selectivity"])
    one = ClassMeans("x", 2, 3)
    one.update(acts, np.array([2] * 6))
    rows = one.to_table("A").to_pylist()
    assert all(np.isnan(r["selectivity"]) and r["n_classes"] == 1 and r["top_class"] == 2
               for r in rows)
    none = ClassMeans("x", 2, 3).update(acts, np.full(6, -1))
    assert [r["top_class"] for r in none.to_table("A").to_pylist()] == [None, None]


def test_bad_labels_and_shapes_raise():
    acc = ClassMeans("x", 2, 3)
    with pytest.raises(ValueError, match="label 3 outside the 3 classes"):
        acc.update(torch.zeros((2, 2, 1, 1)), np.array([0, 3]))
    with pytest.raises(ValueError, match="3 labels for 2 images"):
        acc.update(torch.zeros((2, 2, 1, 1)), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="expected 2 channels"):
        acc.update(torch.zeros((2, 5, 1, 1)), np.array([0, 1]))


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(0, 8), min_size=1, max_size=6), st.data())
def test_any_split_merged_equals_one_pass(sizes, data):
    batches = [_batch(s, n) for s, n in enumerate(sizes)]
    whole = _acc(batches)
    cuts = sorted(data.draw(st.sets(st.integers(1, len(sizes) - 1), max_size=len(sizes) - 1))
                  if len(sizes) > 1 else [])
    parts = [_acc(batches[a:b]) for a, b in zip([0, *cuts], [*cuts, len(sizes)])]
    merged = ClassMeans.from_state(parts[0].state())
    for p in parts[1:]:
        merged.merge(ClassMeans.from_state(p.state()))
    np.testing.assert_array_equal(merged.counts.numpy(), whole.counts.numpy())
    np.testing.assert_allclose(merged.sums.numpy(), whole.sums.numpy(), rtol=1e-13)
    a, b = merged.to_table("A"), whole.to_table("A")
    assert a.drop(["selectivity", "mu_max", "mu_rest"]).equals(
        b.drop(["selectivity", "mu_max", "mu_rest"]))
    np.testing.assert_allclose(a["selectivity"].to_numpy(), b["selectivity"].to_numpy(),
                               rtol=1e-12, equal_nan=True)


def test_as_an_accumulator_of_a_collection_on_the_batch_labels():
    """`Use.of(ClassMeans, classes=K)`: one instance per (network, layer) spec, fed
    `Batch.labels`; rows name the network and the layer apart and equal the direct
    computation; a batch without labels is refused."""
    from pipeline.compare.scan import feature
    from pipeline.results.state import check_state
    from pipeline.stats.analysis import AnalysisResult
    from pipeline.stats.collection import Collection, LayerSpec, Use

    specs = [LayerSpec(feature(net, "conv3"), 4, 1, 1, 0, 2) for net in ("A", "B")]
    res = AnalysisResult(specs, Collection((Use.of(ClassMeans, classes=5),)))
    batches = [_batch(s, n, c=4) for s, n in enumerate((7, 12))]
    acts = {n: [a[:, :, :2, :2].contiguous() * (1 + i) for a, _ in batches]
            for i, n in enumerate(("A", "B"))}
    for k, (_, labels) in enumerate(batches):
        res.update({feature(n, "conv3"): acts[n][k] for n in ("A", "B")},
                   torch.zeros((len(labels), 3, 2, 2), dtype=torch.uint8),
                   np.arange(len(labels)) + 100 * k, torch.as_tensor(labels))
    check_state(res.state())
    rows = res.tables("")["selectivity"].to_pylist()
    labels = np.concatenate([l for _, l in batches])
    for net in ("A", "B"):
        want = _direct(torch.cat(acts[net]), labels)
        got = [r for r in rows if r["net"] == net]
        assert [r["layer"] for r in got] == ["conv3"] * 4
        for g, w in zip(got, want):
            assert g["top_class"] == w["top_class"]
            assert g["selectivity"] == pytest.approx(w["selectivity"], rel=1e-6, abs=1e-12)
    with pytest.raises(ValueError, match="needs the batch's labels"):
        res.update({feature(n, "conv3"): acts[n][0] for n in ("A", "B")},
                   torch.zeros((7, 3, 2, 2), dtype=torch.uint8), np.arange(7) + 500)
