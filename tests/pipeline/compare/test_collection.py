"""A whole comparison on two real (tiny, seeded) networks, run as a collection by the analysis's
own `AnalysisResult`: the minibatch rule, shards merged (through npz states, no pickle) == one
pass, every table against a computation from the captured activations, self-comparison."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.compare.cka import minibatch_of
from pipeline.compare.collection import ComparePlan, shard_ranges
from pipeline.compare.runner import PairRunner, runner_from_blobs, same_network
from pipeline.data.preprocess import IMAGENET
from pipeline.models.hooks import capture
from pipeline.models.layers import resolve_layers
from pipeline.models.zoo import build_model
from pipeline.results.state import check_state, from_npz_bytes, to_npz_bytes
from pipeline.stats.analysis import AnalysisResult, layer_specs, merge_states
from pipeline.stats.worker import model_blob

LAYERS = ("pool1", "conv3", "conv5", "conv9")
N, B, CLASSES = 23, 5, 4


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    a = build_model("resnet18", num_classes=CLASSES, width=8).eval()
    torch.manual_seed(1)
    b = build_model("plainnet18", num_classes=CLASSES, width=8).eval()
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (N, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(-1, CLASSES, (N,), generator=g).numpy()
    return a, b, images, labels


def _spec(a, b, names=("resnet18", "plainnet18"), precision="float64",
          in_place=False) -> ComparePlan:
    specs = [tuple(layer_specs(m, resolve_layers(m, list(LAYERS)), 32)) for m in (a, b)]
    return ComparePlan(names, specs[0], specs[1], CLASSES, B, precision, in_place)


class _Run:
    """A merged result and its tables (the job's: `AnalysisResult.tables`)."""

    def __init__(self, result: AnalysisResult):
        self.result = result
        self.cka = result.entries[next(k for k in result.entries if "/cka(" in k)][2]

    @property
    def images(self) -> int:
        return self.result.images

    def tables(self):
        return self.result.tables("")


def _run(runner, spec, images, labels, keep=None, ranges=None) -> _Run:
    """Minibatches of `ranges` (default one shard) through the runner; `keep`: readable mask.
    Each shard's state goes through the engine's npz form and merges as the job's do."""
    keep = np.ones(len(images), bool) if keep is None else keep
    coll, results = spec.collection(), []
    for start, stop in ranges or [(0, len(images))]:
        r = AnalysisResult(spec.specs, coll)
        for s in range(start, stop, B):
            idx = np.arange(s, min(s + B, stop))[keep[s:min(s + B, stop)]]
            runner.step(spec, r, images[idx], idx, labels[idx])
        state = r.state()
        check_state(state)
        results.append(from_npz_bytes(to_npz_bytes(state)))
    state = results[0]
    for s in results[1:]:
        state = merge_states(state, s, coll)
    return _Run(AnalysisResult.from_state(state, coll))


def _runner(a, b, same=False):
    return PairRunner((a, b), (IMAGENET, IMAGENET),
                      (resolve_layers(a, list(LAYERS)), resolve_layers(b, list(LAYERS))), "cpu",
                      same)


def test_shard_ranges_cut_at_whole_minibatches():
    assert shard_ranges(23, 5, shards=2) == [(0, 15), (15, 23)]
    assert shard_ranges(23, 5, shards=99) == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    assert shard_ranges(23, 5, shard_size=7) == [(0, 10), (10, 20), (20, 23)]
    assert shard_ranges(4, 256, shards=3) == [(0, 4)]
    for n, b, k in ((1000, 64, 7), (50, 7, 3), (9, 9, 2)):
        r = shard_ranges(n, b, shards=k)
        assert r[0][0] == 0 and r[-1][1] == n
        assert all(x == y for (_, x), (y, _) in zip(r, r[1:]))
        assert all(a % b == 0 for a, _ in r)
    assert minibatch_of(np.array([10, 12, 14]), 5) == 2
    with pytest.raises(ValueError, match="spans minibatches"):
        minibatch_of(np.array([9, 10]), 5)


def test_tables_against_the_captured_activations(pair):
    a, b, images, labels = pair
    spec = _spec(a, b)
    res = _run(_runner(a, b), spec, images, labels)
    assert res.images == N and res.cka.minibatches == [0, 1, 2, 3, 4]
    t = res.tables()
    assert list(t) == ["matches", "selectivity", "cka"]
    x = images.float() / 255.0
    with torch.no_grad():
        fa = capture(a, IMAGENET(x), resolve_layers(a, list(LAYERS)))
        fb = capture(b, IMAGENET(x), resolve_layers(b, list(LAYERS)))
    # CKA of conv5 (A) against conv9 (B) over the 4 counted minibatches (the last holds 3)
    def hsic(p, q):
        n = len(p)
        k, l = p @ p.T, q @ q.T
        np.fill_diagonal(k, 0)
        np.fill_diagonal(l, 0)
        one = np.ones(n)
        return (np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3))
    p = [fa["conv5"][s:s + B].double().reshape(B, -1).numpy() for s in range(0, 20, B)]
    q = [fb["conv9"][s:s + B].double().reshape(B, -1).numpy() for s in range(0, 20, B)]
    hs = [np.mean([hsic(u, v) for u, v in zip(s1, s2)]) for s1, s2 in ((p, q), (p, p), (q, q))]
    row = [r for r in t["cka"].to_pylist() if (r["net_a"], r["layer_a"], r["net_b"], r["layer_b"])
           == ("resnet18", "conv5", "plainnet18", "conv9")]
    assert len(row) == 1 and (row[0]["n_images"], row[0]["n_batches"]) == (20, 4)
    assert abs(row[0]["cka"] - hs[0] / np.sqrt(hs[1] * hs[2])) < 1e-9
    assert t["cka"].num_rows == 3 * len(LAYERS) ** 2
    # matches of conv3: np.corrcoef over every image and position (all 23 images)
    xa = fa["conv3"].double().permute(1, 0, 2, 3).reshape(8, -1).numpy()
    xb = fb["conv3"].double().permute(1, 0, 2, 3).reshape(8, -1).numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.corrcoef(xa, xb)[:8, 8:]
    m = [row for row in t["matches"].to_pylist() if row["layer"] == "conv3"]
    for row in m:
        if np.isnan(r[row["channel_a"]]).all():
            assert row["best_b"] is None
            continue
        assert row["best_b"] == int(np.nanargmax(r[row["channel_a"]]))
        assert abs(row["best_r"] - np.nanmax(r[row["channel_a"]])) < 1e-9
        assert row["samples"] == N * 8 * 8
    # selectivity of pool1 in B: per-class means of per-image spatial means (labels -1 left out)
    sb = np.maximum(fb["pool1"].double().numpy(), 0).mean((2, 3))
    present = sorted(set(labels.tolist()) - {-1})
    means = np.stack([sb[labels == k].mean(0) for k in present])
    sel = [row for row in t["selectivity"].to_pylist()
           if (row["net"], row["layer"]) == ("plainnet18", "pool1")]
    for row in sel:
        c = row["channel"]
        top = int(np.argmax(means[:, c]))
        rest = (means[:, c].sum() - means[top, c]) / (len(present) - 1)
        if means[top, c] + rest == 0:
            assert np.isnan(row["selectivity"])
            continue
        assert row["top_class"] == present[top] and row["n_classes"] == len(present)
        assert abs(row["selectivity"] - (means[top, c] - rest) / (means[top, c] + rest)) < 1e-6     # float32 image sums


def test_shards_merged_equal_one_pass(pair):
    a, b, images, labels = pair
    spec, runner = _spec(a, b), _runner(a, b)
    one = _run(runner, spec, images, labels).tables()
    for ranges in (shard_ranges(N, B, shards=3), shard_ranges(N, B, shards=5)):
        many = _run(runner, spec, images, labels, ranges=ranges).tables()
        for name in ("cka", "matches", "selectivity"):
            x, y = one[name], many[name]
            floats = [f.name for f in x.schema if f.type == "double"]
            assert x.drop(floats).equals(y.drop(floats)), name
            for f in floats:
                np.testing.assert_allclose(x[f].to_numpy(), y[f].to_numpy(), rtol=0, atol=1e-9,
                                           equal_nan=True, err_msg=f"{name}.{f}")


def test_unreadable_images_shrink_their_own_minibatch(pair):
    a, b, images, labels = pair
    keep = np.ones(N, bool)
    keep[[6, 7, 21]] = False                 # minibatch 1 keeps 3 (< 4), minibatch 4 keeps 2
    res = _run(_runner(a, b), _spec(a, b), images, labels, keep=keep)
    row = res.tables()["cka"].to_pylist()[0]
    assert (row["n_images"], row["n_batches"]) == (15, 3)
    assert res.images == N - 3
    assert res.tables()["matches"].to_pylist()[0]["samples"] == (N - 3) * 8 * 8


def test_self_comparison_of_one_network(pair):
    a, _, images, labels = pair
    blob = model_blob(a, "resnet18", IMAGENET)
    assert same_network(blob, model_blob(a, "resnet18", IMAGENET))
    torch.manual_seed(5)
    other = build_model("resnet18", num_classes=CLASSES, width=8)
    assert not same_network(blob, model_blob(other, "resnet18", IMAGENET))
    runner = runner_from_blobs((blob, blob), (LAYERS, LAYERS))
    assert runner.same and runner.models[0] is runner.models[1]
    spec = _spec(a, a, names=("resnet18_a", "resnet18_b"), precision="float32", in_place=True)
    t = _run(runner, spec, images, labels).tables()
    for row in t["cka"].to_pylist():
        if row["layer_a"] == row["layer_b"]:
            assert abs(row["cka"] - 1) < 1e-9
    grid = {(r["net_a"], r["layer_a"], r["net_b"], r["layer_b"]): r["cka"]
            for r in t["cka"].to_pylist()}
    for x in LAYERS:
        for y in LAYERS:
            assert abs(grid[("resnet18_a", x, "resnet18_a", y)]
                       - grid[("resnet18_a", y, "resnet18_a", x)]) < 1e-12
    for row in t["matches"].to_pylist():
        if row["best_b"] is not None:
            assert row["best_b"] == row["matched_b"] == row["channel_a"]
            assert abs(row["best_r"] - 1) < 1e-9 and abs(row["matched_r"] - 1) < 1e-9
    sel = t["selectivity"].to_pandas()
    ra, rb = (sel[sel.net == n].reset_index(drop=True) for n in ("resnet18_a", "resnet18_b"))
    np.testing.assert_array_equal(ra["selectivity"].to_numpy(), rb["selectivity"].to_numpy())


def test_misuse_raises(pair):
    a, b, images, labels = pair
    spec = _spec(a, b)
    r, runner = AnalysisResult(spec.specs, spec.collection()), _runner(a, b)
    runner.step(spec, r, images[:5], np.arange(5), labels[:5])
    with pytest.raises(ValueError, match="minibatch 0 added twice"):
        runner.step(spec, r, images[:5], np.arange(5), labels[:5])
    with pytest.raises(ValueError, match="spans minibatches"):
        runner.step(spec, r, images[8:12], np.arange(8, 12), labels[8:12])
    with pytest.raises(ValueError, match="share minibatches"):
        AnalysisResult.from_state(r.state(), spec.collection()).merge(r)
    with pytest.raises(ValueError, match="distinct names"):
        _spec(a, b, names=("x", "x"))
    with pytest.raises(ValueError, match="contains '/'"):
        _spec(a, b, names=("x/1", "y"))
    with pytest.raises(ValueError, match="another collection"):     # other B: no merge
        AnalysisResult.from_state(r.state(), replace(spec, batch_size=6).collection())


def _assert_plain(state, path="state"):
    """Only numeric numpy arrays, JSON scalars, lists of them and dicts with str keys: a
    partial that loads without pickle (the rule of the accumulators' stored states)."""
    assert isinstance(state, dict), path
    for k, v in state.items():
        assert isinstance(k, str), f"{path}: key {k!r}"
        where = f"{path}[{k!r}]"
        if isinstance(v, dict):
            _assert_plain(v, where)
        elif isinstance(v, np.ndarray):
            assert v.dtype.kind in "biufc", where
        elif isinstance(v, list):
            assert all(isinstance(x, (str, int, float, bool, type(None))) for x in v), where
        else:
            assert isinstance(v, (str, int, float, bool, type(None))), where


def test_state_is_plain_values_and_round_trips(pair):
    a, b, images, labels = pair
    spec = _spec(a, b, precision="float32")
    res = _run(_runner(a, b), spec, images, labels, ranges=shard_ranges(N, B, shards=2))
    s = res.result.state()
    _assert_plain(s)
    back = _Run(AnalysisResult.from_state(from_npz_bytes(to_npz_bytes(s)), spec.collection()))
    assert back.result.specs == spec.specs and back.cka.minibatches == res.cka.minibatches
    for name, t in back.tables().items():
        assert t.equals(res.tables()[name]), name
