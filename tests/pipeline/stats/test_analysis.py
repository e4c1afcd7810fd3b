"""Shard compute against brute force on a tiny ResNet, and independence of batching/sharding."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.results.state import check_state, from_npz_bytes, to_npz_bytes
from pipeline.stats.analysis import (AnalysisOptions, AnalysisResult, ShardRunner, accumulator_timing,
                                     layer_specs, merge_states, state_nbytes)
from pipeline.models.hooks import capture
from pipeline.models.layers import resolve_layers
from pipeline.models.zoo import build_model
from pipeline.data.preprocess import IMAGENET

SIZE = 40


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=5, width=8).eval()
    layers = resolve_layers(model, "pool1,conv3,conv7")
    specs = layer_specs(model, layers, SIZE)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (13, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)
    indices = np.arange(100, 113)[::-1].copy()   # image_index need not follow batch order
    return model, layers, specs, images, indices


def _same(a, b) -> bool:
    """Tables equal value for value, NaN equal to NaN (the mean patches mark unseen pixels)."""
    if a.schema != b.schema or a.num_rows != b.num_rows:
        return False
    for name in a.column_names:
        x, y = a[name].combine_chunks(), b[name].combine_chunks()
        if pa.types.is_list(x.type) and pa.types.is_floating(x.type.value_type):
            if not (x.offsets.equals(y.offsets) and np.array_equal(
                    x.flatten().to_numpy(), y.flatten().to_numpy(), equal_nan=True)):
                return False
        elif not x.equals(y):
            return False
    return True


def _run(setup, ranges, batch_size, options=AnalysisOptions(top_k=4, mean_neurons=("center", "all"))):
    model, layers, specs, images, indices = setup
    runner = ShardRunner(model, IMAGENET, specs, options, batch_size=batch_size)
    total = None
    for start, stop in ranges:
        part = runner.run((images[i:min(i + batch_size, stop)], indices[i:min(i + batch_size, stop)])
                          for i in range(start, stop, batch_size))
        total = part if total is None else total.merge(part)
    return total


def test_rf_box_covers_exactly_the_gradient_support(setup):
    """Autograd: the centre neuron's input gradient lives inside its RF box (and touches its edges)."""
    model, layers, specs, _, _ = setup
    for layer, spec in zip(layers, specs):
        x = torch.rand(1, 3, SIZE + 64, SIZE + 64, requires_grad=True)   # big enough: no clipping
        big = layer_specs(model, [layer], SIZE + 64)[0]
        acts = capture(model, x, [layer], detach=False)[layer.name]
        cy = big.feature_size // 2
        # Sum over channels so that no dead channel hides the support.
        acts[0, :, cy, cy].sum().backward()
        support = (x.grad[0].abs().sum(0) > 0).nonzero()
        top, left = big.box(cy, cy)
        assert support[:, 0].min() >= top and support[:, 0].max() <= top + big.size - 1
        assert support[:, 1].min() >= left and support[:, 1].max() <= left + big.size - 1
        assert (big.size, big.jump) == (spec.size, spec.jump)


def test_runner_equals_brute_force(setup):
    model, layers, specs, images, indices = setup
    got = _run(setup, [(0, 13)], batch_size=5).tables("resnet18")
    got = {k.split("/")[1]: v for k, v in got.items()}
    with torch.no_grad():
        acts = capture(model, IMAGENET(images.float() / 255), layers)
    topk = got["topk"].to_pylist()
    for spec in specs:
        a = acts[spec.name]
        n, c, h, w = a.shape
        for ch in range(c):
            # neuron any: each image's first maximum, then (activation desc, image_index asc)
            flat = a[:, ch].reshape(n, -1)
            best = [(-float(flat[i].max()), int(indices[i]), int(flat[i].argmax()) // w,
                     int(flat[i].argmax()) % w) for i in range(n)]
            want = sorted(best)[:4]
            rows = [r for r in topk if r["layer"] == spec.name and r["channel"] == ch
                    and r["neuron"] == "any"]
            assert [(r["image_index"], r["y"], r["x"]) for r in rows] == [b[1:] for b in want]
            assert [-r["activation"] for r in rows] == \
                pytest.approx([b[0] for b in want], rel=1e-5, abs=1e-6)
            assert [r["image_index"] for r in rows] == [b[1] for b in want]
            assert all((r["top"], r["left"]) == spec.box(r["y"], r["x"]) and r["size"] == spec.size
                       for r in rows)
        # centre mean: sum of the centre RF patches of the positive images, brute force
        cy = h // 2
        top, left = spec.box(cy, cy)
        pos = a[:, :, cy, cy] > 0
        img = images.double().numpy() / 255
        mrows = [r for r in got["mean"].to_pylist() if r["layer"] == spec.name and r["neuron"] == "center"]
        for ch in range(c):
            s = np.zeros((3, spec.size, spec.size)); w8 = np.zeros((spec.size, spec.size))
            for i in range(n):
                if pos[i, ch]:
                    for dy in range(spec.size):
                        yy = top + dy
                        if 0 <= yy < SIZE:
                            xs = np.arange(left, left + spec.size)
                            ok = (xs >= 0) & (xs < SIZE)
                            s[:, dy, ok] += img[i][:, yy, xs[ok]]
                            w8[dy, ok] += 1
            assert mrows[ch]["count"] == int(pos[:, ch].sum())
            np.testing.assert_allclose(np.array(mrows[ch]["sum"]).reshape(3, spec.size, spec.size), s,
                                       rtol=1e-12, atol=1e-12)
            wb = np.broadcast_to(w8, s.shape)
            want = np.where(wb > 0, s / np.where(wb > 0, wb, 1), np.nan)
            np.testing.assert_allclose(np.array(mrows[ch]["mean"]).reshape(s.shape), want,
                                       rtol=1e-6, equal_nan=True)
        ch = got["channels"].to_pylist()
        rows = [r for r in ch if r["layer"] == spec.name]
        assert [r["max"] for r in rows] == [float(v) for v in a.amax((0, 2, 3))]
        assert [r["inactive"] for r in rows] == [bool(v == 0) for v in a.amax((0, 2, 3))]


def test_identical_for_any_sharding(setup):
    one = _run(setup, [(0, 13)], batch_size=4)
    many = _run(setup, [(7, 13), (0, 3), (3, 7)], batch_size=4)   # shards merged out of order
    t1, t2 = ({k.split("/")[1]: v for k, v in r.tables("m").items()} for r in (one, many))
    assert set(t1) == {"topk", "mean", "channels", "baseline"}
    assert t1["topk"].equals(t2["topk"])
    # exact: the RF sums are integers in float64 (NaN marks never-seen pixels: compare as arrays)
    assert t1["mean"].drop(["mean"]).equals(t2["mean"].drop(["mean"]))
    m1, m2 = (t["mean"]["mean"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
              for t in (t1, t2))
    assert np.isnan(m1).any() and np.array_equal(m1, m2, equal_nan=True)
    c1, c2 = t1["channels"], t2["channels"]
    assert c1.drop(["mean", "sum"]).equals(c2.drop(["mean", "sum"]))
    np.testing.assert_allclose(c1["sum"].to_numpy(), c2["sum"].to_numpy(), rtol=1e-12)


def test_state_round_trip_and_size(setup):
    opts = AnalysisOptions(top_k=4, mean_neurons=("center", "all"))
    res = _run(setup, [(0, 6)], batch_size=4, options=opts)
    state = res.state()
    check_state(state)            # plain arrays and JSON scalars: stored without pickle
    back = AnalysisResult.from_state(from_npz_bytes(to_npz_bytes(state)), opts)
    for name, table in res.tables("m").items():
        assert _same(back.tables("m")[name], table), name
    with pytest.raises(ValueError, match="another collection"):
        AnalysisResult.from_state(state, AnalysisOptions(top_k=5))
    # O(layers x channels x (k + RF^2)): the centre-mean sums dominate
    specs = setup[2]
    assert state_nbytes(res.state()) >= sum(s.channels * 3 * s.size ** 2 * 8 for s in specs)
    assert res.images == 6 and back.images == 6


def test_merged_states_equal_one_pass(setup):
    """The job's merge tree folds states: shards merged as states equal one pass, bit for bit."""
    opts = AnalysisOptions(top_k=3, mean_neurons=("center", "all"))
    whole = _run(setup, [(0, 13)], batch_size=4, options=opts)
    parts = [_run(setup, [r], batch_size=4, options=opts).state() for r in ((0, 5), (5, 13))]
    merged = AnalysisResult.from_state(merge_states(parts[1], parts[0], opts.collection()), opts)
    for name, table in whole.tables("m").items():
        got = merged.tables("m")[name]
        if name == "stimuli/channels":   # float64 sums of per-image sums: order-dependent bits
            np.testing.assert_allclose(got["sum"].to_numpy(), table["sum"].to_numpy(), rtol=1e-12)
            got, table = got.drop(["sum", "mean"]), table.drop(["sum", "mean"])
        assert _same(got, table), name


def test_accumulator_timing_reports_the_floor_and_leaves_no_trace(setup):
    """The jobs.bench helper: steady and cold ms per batch against one amax read."""
    model, layers, specs, images, indices = setup
    with torch.no_grad():
        acts = capture(model, IMAGENET(images[:4].float() / 255), layers)
    t = accumulator_timing(specs, AnalysisOptions(top_k=2), acts, images[:4], indices[:4],
                           repeats=1, compile=False)
    assert set(t) == {"accumulator_ms_per_batch", "accumulator_cold_ms_per_batch",
                      "amax_floor_ms_per_batch", "accumulator_floor_ratio"}
    assert all(v > 0 for v in t.values())
    # one shared Scan per layer gives the same tables as accumulators fed one by one
    opts = AnalysisOptions(top_k=2, mean_neurons=("center", "all"))
    res = AnalysisResult(specs, opts)
    res.update(acts, images[:4], torch.as_tensor(indices[:4]))
    for spec in specs:
        solo = AnalysisResult([spec], opts)
        solo.update({spec.name: acts[spec.name]}, images[:4], indices[:4])
        for key, acc in solo.by_layer()[spec.name].items():
            want = res.by_layer()[spec.name][key].rows("m", spec)
            assert _same(acc.rows("m", spec), want), key


def test_default_batch_size_holds_about_64_images_of_224_px_in_powers_of_two():
    from pipeline.stats.analysis import default_batch_size
    assert [default_batch_size(c) for c in (32, 64, 112, 128, 160, 224, 256, 299, 1024)] == \
        [256, 256, 256, 128, 64, 64, 64, 64, 64]
