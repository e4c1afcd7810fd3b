"""The analysis runs whatever collection it is given: accumulators declared in one place only."""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.results.catalog import Table
from pipeline.results.state import check_state, from_npz_bytes, to_npz_bytes
from pipeline.stats.accumulators import ChannelStats, TopK
from pipeline.stats.analysis import AnalysisOptions, AnalysisResult, merge_states
from pipeline.stats.collection import Accumulator, Batch, Collection, LayerSpec, Use

SPECS = [LayerSpec("a/conv", 3, 5, 2, -2, 4), LayerSpec("b/conv", 2, 5, 2, -2, 4)]
PAIRS = Table("pairs", pa.schema([("layer_a", pa.string()), ("layer_b", pa.string()),
                                  ("channel_a", pa.int32()), ("channel_b", pa.int32()),
                                  ("images", pa.int64()), ("dot", pa.float64())]),
              sort=("layer_a", "layer_b", "channel_a", "channel_b"), job="test",
              about="sum over images of the product of two channels' centre activations")


class _Pair:
    """A pair of layers of two models: what `PairDot.for_layers` builds instances for."""

    def __init__(self, a: LayerSpec, b: LayerSpec):
        self.a, self.b, self.name = a, b, f"{a.name}~{b.name}"


class PairDot(Accumulator):
    """Everything about this accumulator is here (the collection needs nothing else): the
    centre activations of channel i of model a times channel j of model b, summed over images
    (float64) - the shape of a cross-correlation sum of two models fed the same images."""

    kind = "pairdot"
    table = PAIRS

    def __init__(self, ca: int, cb: int):
        self.images, self.dot = 0, torch.zeros(ca, cb, dtype=torch.float64)

    @classmethod
    def for_layers(cls, layers, **options):
        a = [s for s in layers if s.name.startswith("a/")]
        b = [s for s in layers if s.name.startswith("b/")]
        return [(_Pair(x, y), cls(x.channels, y.channels)) for x in a for y in b]

    def add(self, batch: Batch, pair: _Pair) -> None:
        ca, cb = (batch.scans[s.name].center.to(torch.float64) for s in (pair.a, pair.b))
        self.dot += ca.T @ cb
        self.images += batch.n

    def merge(self, other: "PairDot") -> "PairDot":
        self.images += other.images
        self.dot += other.dot
        return self

    def state(self) -> dict[str, Any]:
        return {"images": self.images, "dot": self.dot.numpy().copy()}

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> "PairDot":
        acc = cls(*s["dot"].shape)
        acc.images, acc.dot = int(s["images"]), torch.from_numpy(s["dot"].copy())
        return acc

    def rows(self, model: str, pair: _Pair) -> pa.Table:
        ca, cb = self.dot.shape
        i, j = np.meshgrid(np.arange(ca), np.arange(cb), indexing="ij")
        return pa.table({"layer_a": [pair.a.name] * (ca * cb), "layer_b": [pair.b.name] * (ca * cb),
                         "channel_a": i.ravel().astype(np.int32),
                         "channel_b": j.ravel().astype(np.int32),
                         "images": np.full(ca * cb, self.images), "dot": self.dot.numpy().ravel()})


def _feed(result: AnalysisResult, acts: dict[str, torch.Tensor], images: torch.Tensor,
          start: int, stop: int) -> AnalysisResult:
    return result.update({k: v[start:stop] for k, v in acts.items()}, images[start:stop],
                         np.arange(start, stop))


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(5)
    acts = {s.name: torch.randn(9, s.channels, s.feature_size, s.feature_size, generator=g)
            for s in SPECS}
    images = torch.randint(0, 256, (9, 3, 8, 8), generator=g, dtype=torch.uint8)
    return acts, images


def test_a_new_accumulator_runs_beside_the_others_over_two_models(data):
    """Two models' activations in one batch; a pair accumulator declared in this file only."""
    acts, images = data
    coll = Collection((Use.of(PairDot), Use.of(TopK, k=2, neuron="center"), Use.of(ChannelStats)))
    res = _feed(AnalysisResult(SPECS, coll), acts, images, 0, 9)
    tables = res.tables("m")
    assert list(tables) == ["pairs", "stimuli/topk", "stimuli/channels"]
    got = tables["pairs"].to_pylist()
    ca, cb = (acts[s.name][:, :, 2, 2].double() for s in SPECS)   # centre (4 // 2, 4 // 2)
    want = (ca.T @ cb).numpy()
    assert [(r["channel_a"], r["channel_b"]) for r in got] == [(i, j) for i in range(3)
                                                               for j in range(2)]
    assert np.allclose([r["dot"] for r in got], want.ravel(), rtol=1e-12)
    assert {r["layer"] for r in tables["stimuli/topk"].to_pylist()} == {"a/conv", "b/conv"}
    # stored without pickle, merged in any order, equal to one pass
    parts = [_feed(AnalysisResult(SPECS, coll), acts, images, a, b).state()
             for a, b in ((0, 4), (4, 9))]
    for p in parts:
        check_state(p)
    merged = merge_states(*(from_npz_bytes(to_npz_bytes(p)) for p in reversed(parts)), coll)
    again = AnalysisResult.from_state(merged, coll).tables("m")
    assert again["stimuli/topk"].equals(tables["stimuli/topk"])
    assert np.allclose(again["pairs"]["dot"].to_numpy(), tables["pairs"]["dot"].to_numpy(),
                       rtol=1e-12)


def test_the_job_collection_and_its_tables():
    coll = AnalysisOptions(top_k=3, mean_neurons=("center", "all")).collection()
    assert [u.key for u in coll.uses] == [
        "topk(k=3,neuron=any)", "topk(k=3,neuron=center)", "mean(neuron=center)",
        "mean(neuron=all)", "channels()", "baseline(neuron=center)", "baseline(neuron=all)"]
    assert [t.name for t in coll.tables] == ["stimuli/topk", "stimuli/mean", "stimuli/channels",
                                             "stimuli/baseline"]
    with pytest.raises(ValueError, match="listed twice"):
        Collection((Use.of(ChannelStats), Use.of(ChannelStats)))


def test_results_of_other_collections_or_layers_never_merge(data):
    acts, images = data
    one = Collection((Use.of(ChannelStats),))
    two = Collection((Use.of(ChannelStats), Use.of(TopK, k=1)))
    a = _feed(AnalysisResult(SPECS, one), acts, images, 0, 3)
    with pytest.raises(ValueError, match="different layers or collections"):
        a.merge(_feed(AnalysisResult(SPECS, two), acts, images, 0, 3))
    with pytest.raises(ValueError, match="different layers or collections"):
        a.merge(_feed(AnalysisResult(SPECS[:1], one), acts, images, 0, 3))
    with pytest.raises(ValueError, match="another collection"):
        AnalysisResult.from_state(a.state(), two)
