"""Accumulators against brute force on tiny data, merge(any split) == one pass, the tie rule,
device-resident state, and the eager and compiled scans against each other."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import pipeline.stats.accumulators as accumulators
from pipeline.stats.accumulators import ChannelStats, PositiveMean, Scan, TopK
from pipeline.models.geometry import RF

# A torch warning here is a bug (e.g. an `out=` slice of the wrong length, which torch resizes).
pytestmark = pytest.mark.filterwarnings("error::UserWarning")


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
                    top, left, _ = RF.square_grid(size, jump, first).box(y, x)
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
    # per-image float32 sums added in float64 (see Scan): ~1e-7 off an exact sum
    np.testing.assert_allclose(t["mean"], a.mean((0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(t["positive_fraction"], (a > 0).mean((0, 2, 3)), rtol=1e-12)
    assert t["inactive"] == [False, True, False]


def _all_accs(c=3):
    return [TopK(c, 5, "any"), TopK(c, 5, "center"), PositiveMean(c, 5, 2, -1, "center"),
            PositiveMean(c, 4, 3, 1, "all"), ChannelStats(c)]


def _feed(accs, batch, shared=False):
    acts, idx, images = batch
    if shared:   # one Scan for every accumulator, as pipeline.stats.analysis does
        acts = Scan(acts)
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
        # few levels (ties), negatives and both signed zeros (-0.0 ties with 0.0)
        acts = (torch.randint(-2, 3, (s, 3, 5, 4), generator=g).float() * 0.5).clamp_min(-0.5)
        acts = torch.where(torch.rand(acts.shape, generator=g) < 0.2, -0.0 * acts.abs(), acts)
        images = torch.randint(0, 256, (s, 3, 9, 8), generator=g, dtype=torch.uint8)
        batches.append((acts, perm[at:at + s], images)); at += s
    one = _all_accs()
    for b in batches:
        _feed(one, b, shared=data.draw(st.booleans()))
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


def test_tie_rule_with_deliberate_ties():
    """Equal activations across images, -0.0 against 0.0, negatives, several maxima per map, and
    one image_index offered twice with different positions: (activation desc, image_index asc,
    y asc, x asc), whatever the batching."""
    acts = torch.zeros(6, 2, 3, 3)
    acts[0, 0, 2, 2] = acts[0, 0, 1, 0] = 2.0            # two maxima: the first in raster order
    acts[1, 0, 0, 1] = 2.0
    acts[2, 0] = -0.0                                      # ties with image 3's 0.0
    acts[4, 0] = -1.0
    acts[5, 0, 2, 0] = 2.0
    acts[:, 1] = torch.tensor([1.0, 1.0, -0.0, 0.0, 1.0, 1.0]).view(6, 1, 1)
    indices = torch.tensor([9, 4, 7, 3, 8, 4])             # index 4 twice, at other positions
    want = {n: _brute_topk(acts, indices, 5, n) for n in ("any", "center")}
    for split in ([6], [1, 1, 1, 1, 1, 1], [4, 2], [2, 3, 1]):
        for n in ("any", "center"):
            parts, at = [], 0
            for size in split:
                parts.append(TopK(2, 5, n).update(acts[at:at + size], indices[at:at + size]))
                at += size
            merged = parts[-1]
            for p in parts[-2::-1]:
                merged.merge(p)
            assert _as_rows(merged) == want[n], (split, n)
    got = TopK(2, 6, "any").update(acts, indices)
    assert got.image_index[0].tolist() == [4, 4, 9, 3, 7, 8]
    assert (got.y[0].tolist(), got.x[0].tolist()) == ([0, 2, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0])


def test_per_image_sums_do_not_depend_on_the_batch():
    """The float32 per-image sums (Scan's justification) are the same bits in any batch."""
    g = torch.Generator().manual_seed(4)
    acts = torch.rand(5, 3, 37, 41, generator=g) * 100 - 20
    whole = Scan(acts)
    for i in range(5):
        one = Scan(acts[i:i + 1])
        assert torch.equal(whole.image_sum[i], one.image_sum[0])
        assert torch.equal(whole.image_positive[i], one.image_positive[0])
    single = Scan(acts[2:3, 1:2])                          # one (image, channel) row
    assert torch.equal(single.image_sum[0, 0], whole.image_sum[2, 1])
    f = acts.double().reshape(5, 3, -1)
    np.testing.assert_allclose(whole.image_sum.numpy(), f.sum(2).numpy(), rtol=1e-6)
    assert torch.equal(whole.image_positive, (f > 0).sum(2))
    assert torch.equal(whole.image_max, acts.amax((2, 3)))


def test_state_lives_on_the_activations_device_and_state_is_host_data():
    acts, idx, images = _batches(seed=8)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    states = []
    for dev in devices:
        accs = _all_accs()
        _feed(accs, (acts.to(dev), idx, images.to(dev)), shared=True)
        for a in accs:
            assert all(getattr(a, t).device.type == dev for t in a._tensors), (type(a), dev)
            s = a.state()
            assert all(isinstance(v, np.ndarray) for k, v in s.items() if k in a._tensors)
        states.append(accs)
        # merging a host-side state into a device-resident one stays on the device
        back = [type(a).from_state(pickle.loads(pickle.dumps(a.state()))) for a in accs]
        for a, b in zip(accs, back):
            assert all(getattr(b, t).device.type == "cpu" for t in b._tensors)
            a.merge(b)
            assert all(getattr(a, t).device.type == dev for t in a._tensors)
    for a, b in zip(states[0], states[-1]):
        _assert_same(a, b)
    # state() is a copy: mutating it leaves the accumulator alone
    acc = states[0][0]
    s = acc.state()
    s["activation"][:] = -1
    assert (acc.activation != -1).all()


@pytest.mark.skipif(os.environ.get(accumulators.COMPILE_ENV, "").strip() == "0",
                    reason="PREFERRED_STIMULI_COMPILE=0: torch.compile switched off")
def test_compiled_scan_agrees_with_eager():
    """The one compiled test (compiling costs ~10 s; PREFERRED_STIMULI_COMPILE=0 skips it): max,
    counts and every top-k exactly, the float64 channel sums to 1e-6 (the eager CPU path sums
    each image in float32)."""
    g = torch.Generator().manual_seed(6)
    acts = torch.relu(torch.randn(4, 3, 7, 6, generator=g)).round(decimals=1)   # ties
    idx = torch.tensor([5, 1, 3, 2])
    eager, comp = Scan(acts, compiled=False), Scan(acts, compiled=True)
    assert torch.equal(eager.image_max, comp.image_max)
    assert torch.equal(eager.image_positive, comp.image_positive)
    np.testing.assert_allclose(eager.image_sum.numpy(), comp.image_sum.numpy(), rtol=1e-6)
    for make in (lambda: TopK(3, 3, "any"), lambda: TopK(3, 3, "center")):
        assert _as_rows(make().update(eager, idx)) == _as_rows(make().update(comp, idx))
    ca, cb = ChannelStats(3).update(eager), ChannelStats(3).update(comp)
    assert np.array_equal(ca.state()["max"], cb.state()["max"])
    assert np.array_equal(ca.state()["positive"], cb.state()["positive"])
    # a batch of another shape reuses the dynamic kernel
    other = Scan(acts[:3, :2, :5], compiled=True)
    assert torch.equal(other.image_max, acts[:3, :2, :5].amax((2, 3)))


def test_compile_failure_falls_back_to_eager(monkeypatch):
    """A compiler failure warns once and leaves the eager results (the CI fallback path)."""
    def broken(acts):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setitem(accumulators._COMPILED, "fused", broken)
    acts, idx, _ = _batches(seed=2)
    with pytest.warns(RuntimeWarning, match="eager path"):
        comp = ChannelStats(3).update(Scan(acts, compiled=True))
    eager = ChannelStats(3).update(Scan(acts, compiled=False))
    _assert_same(comp, eager)
    assert accumulators._COMPILED["fused"] is accumulators._fused_failed


def test_compile_switch_reads_the_environment(monkeypatch):
    monkeypatch.delenv(accumulators.COMPILE_ENV, raising=False)
    assert accumulators.use_compile() is False
    monkeypatch.setenv(accumulators.COMPILE_ENV, "1")
    assert accumulators.use_compile() is True and Scan(torch.zeros(1, 1, 1, 1)).compiled
    monkeypatch.setenv(accumulators.COMPILE_ENV, "maybe")
    with pytest.raises(ValueError, match="allowed: 0, 1"):
        accumulators.use_compile()


def test_image_index_range_is_checked():
    with pytest.raises(ValueError, match=r"image_index must lie in \[0, 4294967296\)"):
        TopK(3, 4).update(torch.zeros(1, 3, 2, 2), [-1])


@pytest.mark.parametrize("neuron", ["any", "center"])
def test_topk_of_batches_larger_than_k_equals_brute_force(neuron):
    """Batches of more than k images: only each channel's k best candidates of a batch go on
    (distinct indices), or all of them (an index twice in a batch); shards merged as state."""
    g = torch.Generator().manual_seed(11)
    acts = torch.randint(0, 4, (60, 3, 5, 4), generator=g).float()        # many exact ties
    acts[7:9] = acts[7:9] * -1.0                                            # and -0.0
    indices = torch.randperm(1000, generator=g)[:60]
    indices[21] = indices[20]                                               # once twice
    want = _brute_topk(acts, indices, 4, neuron)
    for sizes in ([60], [13, 17, 30], [25, 35]):
        parts, at = [], 0
        for size in sizes:
            acc = TopK(3, 4, neuron)
            for i in range(at, at + size, 9):
                stop = min(i + 9, at + size)
                acc.update(acts[i:stop], indices[i:stop])
            parts.append(TopK.from_state(pickle.loads(pickle.dumps(acc.state()))))
            at += size
        merged = parts[0]
        for p in parts[1:]:
            merged.merge(p)
        assert _as_rows(merged) == want, sizes


def test_blocked_scan_and_first_maximum_equal_brute_force(monkeypatch):
    """The eager scan in many cache blocks (several rows each, some left over) and rows whose
    length is no multiple of 8 or needs several 127-word groups; the first-maximum search in
    blocks too; layers of other shapes in between (the reused count buffers)."""
    monkeypatch.setattr(accumulators, "_SCAN_BYTES", 3 * 4 * 1517)
    monkeypatch.setattr(accumulators, "_BLOCK_BYTES", 2 * 4 * 1517)
    g = torch.Generator().manual_seed(12)
    for shape in [(5, 3, 37, 41), (4, 2, 3, 5), (7, 3, 37, 41), (6, 5, 16, 16)]:
        acts = torch.randint(-2, 3, shape, generator=g).float() * torch.rand(shape, generator=g)
        scan = Scan(acts)
        f = acts.reshape(*shape[:2], -1)
        assert torch.equal(scan.image_max, f.amax(2))
        assert torch.equal(scan.image_positive, (f > 0).sum(2))
        np.testing.assert_allclose(scan.image_sum.numpy(), f.double().sum(2).numpy(), rtol=1e-6,
                                   atol=1e-6 * float(f.abs().sum(2).max()))   # float32 sums
        assert torch.equal(scan.center, acts[:, :, shape[2] // 2, shape[3] // 2])
        indices = torch.arange(shape[0])
        acc = TopK(shape[1], 3, "any").update(scan, indices)
        assert _as_rows(acc) == _brute_topk(acts, indices, 3, "any")


def test_centre_mean_sums_stay_exact_past_float32_integers(monkeypatch):
    """255 * images passes 2**24 (float32's last exact integer): the waiting crops are summed
    at most `_FLUSH_IMAGES` images at a time, so the float64 state is still exact."""
    monkeypatch.setattr(PositiveMean, "_DEFER_IMAGES", 10 ** 6)
    monkeypatch.setattr(PositiveMean, "_DEFER_BYTES", 10 ** 9)
    n = PositiveMean._FLUSH_IMAGES + 10
    assert 255 * n > 2 ** 24
    acc = PositiveMean(1, 1, 1, 0, "center")
    acc.update(torch.ones(n, 1, 1, 1), torch.full((n, 3, 1, 1), 255, dtype=torch.uint8))
    assert acc.sum.flatten().tolist() == [255.0 * n] * 3
    assert acc.count.tolist() == [n] and acc.weight.flatten().tolist() == [float(n)]


@pytest.mark.parametrize("defer", [1, 3, 1024])
def test_centre_mean_equals_brute_force_whenever_it_flushes(monkeypatch, defer):
    """Crops wait for `defer` images at most; any flush point gives the same sums."""
    monkeypatch.setattr(PositiveMean, "_DEFER_IMAGES", defer)
    test_positive_mean_equals_brute_force(7, 2, -3, "center")


@pytest.mark.parametrize("neuron", ["any", "center"])
def test_accelerator_top_k_path_agrees_with_the_host_path(neuron):
    """TopK's accelerator path (torch, no host synchronisation), run here on CPU tensors, keeps
    the same state as the numpy host path: batches larger than k, an index twice, merges."""
    g = torch.Generator().manual_seed(13)
    acts = torch.randint(0, 3, (40, 3, 5, 4), generator=g).float()
    indices = torch.randperm(500, generator=g)[:40]
    indices[11] = indices[10]
    host, dev = TopK(3, 4, neuron), TopK(3, 4, neuron)
    for i in range(0, 40, 9):
        scan = Scan(acts[i:i + 9])
        ix = accumulators.ImageIndex(indices[i:i + 9], len(scan.acts))
        host.update(scan, ix)
        dev._update_device(scan, ix, (scan.center if neuron == "center" else scan.image_max).T)
    assert _as_rows(dev) == _as_rows(host) == _brute_topk(acts, indices, 4, neuron)
    other = TopK.from_state(host.state())        # every entry offered twice: ties everywhere
    dev._keep_device(other.activation, other._key, other._pos)
    host.merge(other)
    assert _as_rows(dev) == _as_rows(host)
    _assert_same(dev, host)


def test_stacked_top_k_update_equals_each_accumulator_alone_and_brute_force():
    """`update_topk` stacks the accumulators of one batch (both neurons of layers with other
    channel counts and sizes) into one numpy update; each must end exactly where its own update
    and brute force put it, through batches larger and smaller than k, an index offered twice
    (no preselection then), and an accumulator whose fill differs (updated in its own group)."""
    g = torch.Generator().manual_seed(21)
    layers = [torch.randint(0, 3, (30, c, h, w), generator=g).float()
              for c, h, w in ((3, 5, 4), (2, 3, 3), (4, 6, 6))]
    indices = torch.randperm(400, generator=g)[:30]
    indices[17] = indices[16]
    stacked = [TopK(a.shape[1], 5, n) for a in layers for n in ("any", "center")]
    alone = [TopK(a.shape[1], 5, n) for a in layers for n in ("any", "center")]
    late = TopK(layers[0].shape[1], 5, "any")          # starts later: another fill, own group
    for i, j in ((0, 2), (2, 11), (11, 12), (12, 30)):
        scans = [Scan(a[i:j]) for a in layers]
        pairs = [(acc, scans[m // 2]) for m, acc in enumerate(stacked)]
        if i >= 2:
            pairs.append((late, scans[0]))
        accumulators.update_topk(pairs, indices[i:j])
        for m, acc in enumerate(alone):
            acc.update(layers[m // 2][i:j], indices[i:j])
    for m, acc in enumerate(stacked):
        a = layers[m // 2]
        assert _as_rows(acc) == _as_rows(alone[m]) == _brute_topk(a, indices, 5, acc.neuron)
    assert _as_rows(late) == _brute_topk(layers[0][2:], indices[2:], 5, "any")


def test_top_k_position_breaks_a_tie_at_the_kth_entry_of_a_full_state():
    """An image offered again with the k-th entry's activation (the same key) at an earlier
    position takes that rank with its own (y, x), also when the state is full (the host path
    searches positions only for candidates that can enter: this one can)."""
    a = torch.zeros(2, 1, 3, 3)
    a[0, 0, 1, 1], a[1, 0, 2, 2] = 5, 3
    b = torch.zeros(1, 1, 3, 3)
    b[0, 0, 1, 0] = 3
    acc = TopK(1, 2, "any").update(a, [7, 9]).update(b, [9])
    assert _as_rows(acc) == [[(-5.0, 7, 1, 1), (-3.0, 9, 1, 0)]]
    assert _as_rows(acc) == _brute_topk(torch.cat([a, b]), [7, 9, 9], 2, "any")


def test_centre_mean_int8_product_equals_the_float_product():
    """On the CPU uint8 crops are summed by an int8 product (int32 sums, crops shifted by 128);
    float images take the float32 matmul: the same integers, the same float64 state."""
    g = torch.Generator().manual_seed(11)
    acts = torch.relu(torch.randn(37, 5, 7, 7, generator=g))
    images = torch.randint(0, 256, (37, 3, 30, 30), generator=g, dtype=torch.uint8)
    images[:3] = 255                                   # the extremes: 255 and 0
    images[3:5] = 0
    ints, floats = (PositiveMean(5, 11, 4, -3, "center") for _ in range(2))
    for a in range(0, 37, 8):
        assert accumulators._int8_sums_apply(images[a:a + 8])
        ints.update(acts[a:a + 8], images[a:a + 8])
        floats.update(acts[a:a + 8], images[a:a + 8].float())
    assert not accumulators._int8_sums_apply(images.float())
    _assert_same(ints, floats)
    assert ints.count.sum() > 0 and ints.sum.max() > 255


def test_scans_compile_by_default_only_past_a_cpu_workers_break_even(monkeypatch):
    """compile_by_default: the environment decides when set; else a CPU worker with at least
    200,000 images' worth of 224-px pixels compiles, a smaller one or a GPU worker does not."""
    from pipeline.stats.accumulators import COMPILE_BREAK_EVEN_PIXELS, compile_by_default

    monkeypatch.delenv(accumulators.COMPILE_ENV, raising=False)
    assert COMPILE_BREAK_EVEN_PIXELS == 200_000 * 224 * 224
    assert not compile_by_default(199_999, 224, "cpu")
    assert compile_by_default(200_000, 224, "cpu")
    assert not compile_by_default(50_000, 224, "cpu")                 # ImageNet val, one worker
    assert compile_by_default(2_450_000, 64, "cpu")                   # (224 / 64)^2 = 12.25x
    assert not compile_by_default(2_449_999, 64, "cpu")
    assert not compile_by_default(10 ** 9, 224, "cuda")
    monkeypatch.setenv(accumulators.COMPILE_ENV, "0")
    assert not compile_by_default(10 ** 9, 224, "cpu")
    monkeypatch.setenv(accumulators.COMPILE_ENV, "1")
    assert compile_by_default(1, 64, "cuda")


def test_a_workers_compile_setting_reaches_its_scans(monkeypatch):
    """FeedSpec.compile -> runner_from_blob -> ShardRunner -> AnalysisResult -> Scan, over the
    environment's setting."""
    from pipeline.data.preprocess import IMAGENET
    from pipeline.models.layers import resolve_layers
    from pipeline.models.zoo import build_model
    from pipeline.stats.analysis import AnalysisOptions, layer_specs
    from pipeline.stats.worker import model_blob, runner_from_blob

    monkeypatch.setenv(accumulators.COMPILE_ENV, "1")
    model = build_model("resnet18", num_classes=4, width=8)
    specs = layer_specs(model, resolve_layers(model, ["conv3"]), 32)
    runner = runner_from_blob(model_blob(model, "resnet18", IMAGENET), specs, AnalysisOptions(),
                              compile=False)
    result = runner.new_result()
    runner.step(result, torch.zeros(2, 3, 32, 32, dtype=torch.uint8), np.arange(2))
    assert runner.compile is False and result.compile is False
