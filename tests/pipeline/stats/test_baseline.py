"""BaselineMean (stimuli/baseline.parquet) against brute force, split/merge and its state."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from pipeline.results import catalog
from pipeline.results.state import check_state, from_npz_bytes, to_npz_bytes
from pipeline.stats.accumulators import ImageIndex, Scan
from pipeline.stats.baseline import BaselineMean
from pipeline.stats.collection import Batch, LayerSpec

SIZE = 23


def _batch(images: torch.Tensor, spec: LayerSpec) -> Batch:
    acts = torch.rand(images.shape[0], spec.channels, spec.feature_size, spec.feature_size)
    return Batch(images, ImageIndex(np.arange(images.shape[0]), images.shape[0]),
                 {spec.name: Scan(acts)})


def _brute(images: np.ndarray, spec: LayerSpec, neuron: str) -> tuple[np.ndarray, np.ndarray]:
    """Sum (uint8 units) and per-pixel weight of every box, one pixel at a time."""
    s, h = spec.size, spec.feature_size
    total, weight = np.zeros((3, s, s)), np.zeros((s, s))
    spots = [(h // 2, h // 2)] if neuron == "center" else [(y, x) for y in range(h)
                                                            for x in range(h)]
    for img in images.astype(np.float64):
        for y, x in spots:
            top, left = spec.first + spec.jump * y, spec.first + spec.jump * x
            for dy in range(s):
                for dx in range(s):
                    r, c = top + dy, left + dx
                    if 0 <= r < img.shape[1] and 0 <= c < img.shape[2]:
                        total[:, dy, dx] += img[:, r, c]
                        weight[dy, dx] += 1
    return total, weight


# RF size, jump, first row, feature size: padding on both sides, boxes past the image, jump 1
GEOMETRIES = [LayerSpec("a", 2, 7, 2, -3, 12), LayerSpec("b", 2, 11, 4, -5, 6),
              LayerSpec("c", 2, 3, 1, 0, 21), LayerSpec("d", 2, 35, 8, -16, 3)]


@pytest.mark.parametrize("spec", GEOMETRIES, ids=lambda s: s.name)
@pytest.mark.parametrize("neuron", ["center", "all"])
def test_equals_brute_force(spec, neuron):
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (5, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)
    acc = BaselineMean.build(spec, neuron=neuron)
    acc.add(_batch(images, spec), spec)
    total, weight = _brute(images.numpy(), spec, neuron)
    assert np.array_equal(acc.sum.numpy(), total) and np.array_equal(acc.weight.numpy(), weight)
    row = acc.rows("m", spec).to_pylist()[0]
    assert (row["model"], row["layer"], row["neuron"], row["images"], row["size"]) == \
        ("m", spec.name, neuron, 5, spec.size)
    w3 = np.broadcast_to(weight, total.shape)
    want = np.where(w3 > 0, total / 255 / np.where(w3 > 0, w3, 1), np.nan).astype(np.float32)
    assert np.array_equal(np.array(row["mean"], np.float32).reshape(total.shape), want,
                          equal_nan=True)
    assert np.array_equal(np.array(row["sum"]), (total / 255).reshape(-1))
    assert np.array_equal(np.array(row["weight"]), w3.reshape(-1))
    assert acc.rows("m", spec).schema == catalog.BASELINE.schema


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=4), st.sampled_from(["center", "all"]),
       st.permutations(range(4)))
def test_any_split_merged_in_any_order_equals_one_pass(sizes, neuron, order):
    spec = GEOMETRIES[1]
    g = torch.Generator().manual_seed(sum(sizes))
    images = torch.randint(0, 256, (sum(sizes), 3, SIZE, SIZE), generator=g, dtype=torch.uint8)
    whole = BaselineMean.build(spec, neuron=neuron)
    whole.add(_batch(images, spec), spec)
    cuts = np.cumsum([0, *sizes])
    parts = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        acc = BaselineMean.build(spec, neuron=neuron)
        acc.add(_batch(images[a:b], spec), spec)
        parts.append(acc)
    parts = [parts[i] for i in order if i < len(parts)]
    merged = parts[0]
    for p in parts[1:]:
        merged.merge(BaselineMean.from_state(from_npz_bytes(to_npz_bytes(p.state()))))
    assert merged.images == whole.images
    assert merged.sum.numpy().tobytes() == whole.sum.numpy().tobytes()
    assert merged.weight.numpy().tobytes() == whole.weight.numpy().tobytes()


def test_state_is_plain_and_merge_checks_geometry():
    spec = GEOMETRIES[0]
    acc = BaselineMean.build(spec, neuron="all")
    acc.add(_batch(torch.zeros(2, 3, SIZE, SIZE, dtype=torch.uint8), spec), spec)
    check_state(acc.state())
    with pytest.raises(ValueError, match="other geometry or neuron"):
        acc.merge(BaselineMean.build(spec, neuron="center"))
    with pytest.raises(ValueError, match="allowed: center, all"):
        BaselineMean.build(spec, neuron="any")


def test_one_image_sum_per_batch_serves_every_layer():
    """The batch's image sum is computed once, whatever the number of baselines reading it."""
    images = torch.randint(0, 256, (3, 3, SIZE, SIZE), dtype=torch.uint8)
    batch = _batch(images, GEOMETRIES[0])
    batch.scans.update(_batch(images, GEOMETRIES[2]).scans)
    first = batch.image_sum()
    for spec in (GEOMETRIES[0], GEOMETRIES[2]):
        BaselineMean.build(spec).add(batch, spec)
    assert batch.image_sum() is first
    assert torch.equal(first, images.to(torch.int64).sum(0))


@pytest.mark.parametrize("neuron", ["center", "all"])
def test_is_the_mean_stimulus_of_a_neuron_positive_everywhere(neuron):
    """The null's definition: a channel positive on every image and position averages to it."""
    from pipeline.stats.accumulators import PositiveMean

    spec = GEOMETRIES[0]
    images = torch.randint(0, 256, (4, 3, SIZE, SIZE), dtype=torch.uint8)
    batch = _batch(images, spec)                 # torch.rand activations: positive everywhere
    base, pos = BaselineMean.build(spec, neuron=neuron), PositiveMean.build(spec, neuron=neuron)
    base.add(batch, spec)
    pos.add(batch, spec)
    for ch in range(spec.channels):
        assert torch.equal(pos.sum[ch], base.sum) and torch.equal(pos.weight[ch], base.weight)


def test_the_image_sum_is_exact_past_the_uint16_chunk():
    """More images than one uint16 chunk holds (257 at 255): still the exact int64 sum."""
    images = torch.full((600, 3, 4, 5), 255, dtype=torch.uint8)
    images[::7] = torch.randint(0, 256, images[::7].shape, dtype=torch.uint8)
    got = Batch(images, ImageIndex(np.arange(600), 600), {}).image_sum()
    assert got.dtype == torch.int64 and torch.equal(got, images.to(torch.int64).sum(0))
