"""Accumulators against brute force on tiny data, and merge(any split) == one pass."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from pipeline.accumulators import ChannelStats, PositiveMean, TopK, rf_box


def _batches(seed: int, n: int = 11, c: int = 3, h: int = 5, w: int = 4, levels: int = 3):
    """Activations with many exact ties (few integer levels, many zeros) and shuffled indices."""
    g = torch.Generator().manual_seed(seed)
    acts = torch.randint(0, levels, (n, c, h, w), generator=g).float()
    indices = torch.randperm(100, generator=g)[:n]
    images = torch.randint(0, 256, (n, 3, 9, 8), generator=g, dtype=torch.uint8)
    return acts, indices, images


def _brute_topk(acts, indices, k, neuron):
    n, c, h, w = acts.shape
    out = []
    for ch in range(c):
        cands = []
        for i in range(n):
            if neuron == "center":
                y, x = h // 2, w // 2
            else:  # the first maximum in raster order
                best = None
                for yy in range(h):
                    for xx in range(w):
                        if best is None or acts[i, ch, yy, xx] > acts[i, ch, best[0], best[1]]:
                            best = (yy, xx)
                y, x = best
            cands.append((-float(acts[i, ch, y, x]), int(indices[i]), y, x))
        out.append(sorted(cands)[:k])
    return out


def _as_rows(acc: TopK):
    return [[(-float(a), int(i), int(y), int(x)) for a, i, y, x in
             zip(acc.activation[ch], acc.image_index[ch], acc.y[ch], acc.x[ch])]
            for ch in range(acc.channels)]


@pytest.mark.parametrize("neuron", ["any", "center"])
@pytest.mark.parametrize("k", [1, 4, 20])
def test_topk_equals_brute_force(neuron, k):
    acts, indices, _ = _batches(seed=k)
    acc = TopK(acts.shape[1], k, neuron)
    for i in range(0, len(acts), 3):
        acc.update(acts[i:i + 3], indices[i:i + 3])
    assert _as_rows(acc) == _brute_topk(acts, indices, k, neuron)


def _patch(image, top, left, s):
    """Brute-force RF patch (black outside) and in-image mask, pixel by pixel."""
    _, hh, ww = image.shape
    patch = np.zeros((3, s, s)); mask = np.zeros((s, s))
    for dy in range(s):
        for dx in range(s):
            yy, xx = top + dy, left + dx
            if 0 <= yy < hh and 0 <= xx < ww:
                patch[:, dy, dx] = image[:, yy, xx].numpy()
                mask[dy, dx] = 1
    return patch, mask


GEOMS = [(5, 2, -1), (3, 1, -1), (7, 2, -3), (4, 3, 1), (9, 1, -4)]  # (size, jump, first) incl. RFs past the edges


@pytest.mark.parametrize("size,jump,first", GEOMS)
@pytest.mark.parametrize("neuron", ["center", "all"])
def test_positive_mean_equals_brute_force(size, jump, first, neuron):
    acts, _, images = _batches(seed=size + jump, levels=2)
    n, c, h, w = acts.shape
    acc = PositiveMean(c, size, jump, first, neuron)
    for i in range(0, n, 4):
        acc.update(acts[i:i + 4], images[i:i + 4])
    want_sum = np.zeros((c, 3, size, size)); want_w = np.zeros((c, size, size)); want_n = np.zeros(c)
    positions = [(h // 2, w // 2)] if neuron == "center" else [(y, x) for y in range(h) for x in range(w)]
    for i in range(n):
        for ch in range(c):
            for y, x in positions:
                if acts[i, ch, y, x] > 0:
                    top, left = rf_box(y, x, jump, first)
                    p, m = _patch(images[i], top, left, size)
                    want_sum[ch] += p; want_w[ch] += m; want_n[ch] += 1
    assert np.array_equal(acc.sum.numpy(), want_sum)
    assert np.array_equal(acc.weight.numpy(), want_w)
    assert np.array_equal(acc.count.numpy(), want_n)
    mean = acc.mean().numpy()
    wb = np.broadcast_to(want_w[:, None], want_sum.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        want_mean = np.where(wb > 0, want_sum / 255.0 / wb, np.nan)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-12, equal_nan=True)
    if (size, jump, first) == (9, 1, -4):  # centre RF rows -2..6 of a 9-row image
        assert np.isnan(mean).any(), "the RF sticks out of the image: those pixels must be NaN"


def test_channel_stats_equals_brute_force():
    acts, _, _ = _batches(seed=3, levels=4)
    acts[:, 1] = 0.0                       # an inactive channel
    acts = acts * torch.rand(acts.shape)    # non-integer values for the mean
    acc = ChannelStats(acts.shape[1])
    for i in range(0, len(acts), 5):
        acc.update(acts[i:i + 5])
    a = acts.double().numpy()
    t = acc.to_table("m", "pool1").to_pydict()
    assert t["images"] == [len(acts)] * 3
    assert t["max"] == [float(np.float32(a[:, ch].max())) for ch in range(3)]
    np.testing.assert_allclose(t["mean"], a.mean((0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(t["positive_fraction"], (a > 0).mean((0, 2, 3)), rtol=1e-12)
    assert t["inactive"] == [False, True, False]


def _all_accs(c=3):
    return [TopK(c, 5, "any"), TopK(c, 5, "center"), PositiveMean(c, 5, 2, -1, "center"),
            PositiveMean(c, 4, 3, 1, "all"), ChannelStats(c)]


def _feed(accs, batch):
    acts, idx, images = batch
    for a in accs:
        if isinstance(a, TopK):
            a.update(acts, idx)
        elif isinstance(a, PositiveMean):
            a.update(acts, images)
        else:
            a.update(acts)


def _assert_same(a, b):
    sa, sb = a.state(), b.state()
    assert sa.keys() == sb.keys()
    for key in sa:
        if key == "sum" and isinstance(a, ChannelStats):
            np.testing.assert_allclose(sa[key], sb[key], rtol=1e-12)
        elif isinstance(sa[key], np.ndarray):
            assert np.array_equal(sa[key], sb[key]), key   # exact, also the float64 RF sums
        else:
            assert sa[key] == sb[key], key


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), nbatch=st.integers(1, 6), data=st.data())
def test_any_split_merged_in_any_order_equals_one_pass(seed, nbatch, data):
    g = torch.Generator().manual_seed(seed)
    sizes = [int(s) for s in torch.randint(0, 5, (nbatch,), generator=g)]
    perm = torch.randperm(1000, generator=g)
    batches, at = [], 0
    for s in sizes:
        acts = torch.randint(0, 3, (s, 3, 5, 4), generator=g).float() * 0.5
        images = torch.randint(0, 256, (s, 3, 9, 8), generator=g, dtype=torch.uint8)
        batches.append((acts, perm[at:at + s], images)); at += s
    one = _all_accs()
    for b in batches:
        _feed(one, b)
    groups = data.draw(st.lists(st.integers(0, 3), min_size=nbatch, max_size=nbatch))
    parts = {gid: _all_accs() for gid in set(groups)}
    for gid, b in zip(groups, batches):
        _feed(parts[gid], b)
    order = data.draw(st.permutations(sorted(parts)))
    # shipped as state (as Ray / _partials would), merged in a random order
    merged = [type(a).from_state(pickle.loads(pickle.dumps(a.state()))) for a in parts[order[0]]]
    for gid in order[1:]:
        for m, p in zip(merged, parts[gid]):
            m.merge(p)
    for a, b in zip(one, merged):
        _assert_same(a, b)


def test_tables_follow_the_design_columns():
    accs = _all_accs()
    _feed(accs, _batches(seed=5))
    topk = accs[0].to_table("resnet18", "conv3")
    assert topk.column_names[:9] == ["model", "layer", "channel", "neuron", "rank", "activation",
                                    "image_index", "y", "x"]
    assert topk.num_rows == 3 * 5
    mean = accs[2].to_table("resnet18", "conv3")
    assert len(mean["mean"][0].as_py()) == 3 * 5 * 5
    row = mean.slice(0, 1).to_pylist()[0]
    s, w = np.array(row["sum"]), np.array(row["weight"])
    np.testing.assert_allclose(np.array(row["mean"]), np.where(w > 0, s / np.where(w > 0, w, 1), np.nan),
                               rtol=1e-6, equal_nan=True)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="allowed: any, center"):
        TopK(3, 4, "middle")
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        TopK(3, 4).update(torch.zeros(2, 4, 3, 3), [0, 1])
    with pytest.raises(ValueError, match="cannot merge"):
        TopK(3, 4).merge(TopK(3, 5))
