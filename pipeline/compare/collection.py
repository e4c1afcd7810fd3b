"""One comparison as a collection of accumulators, and its minibatch rule.

    plan = ComparePlan(names=("resnet34", "plainnet34"), a=specs_a, b=specs_b, classes=8,
                       batch_size=16)       # specs: pipeline.stats.analysis.layer_specs per network
    result = AnalysisResult(plan.specs, plan.collection())   # pipeline.stats.analysis
    result.update(plan.acts(acts_a, acts_b), images, indices, labels)   # one minibatch
    result.merge(other)                      # other shards, any order
    tables = result.tables("")               # {"matches": ..., "selectivity": ..., "cka": ...}

The collection (`ComparePlan.collection`): `CrossSums` per layer name of both networks (matches),
`ClassMeans` per (network, layer) (selectivity), `CKA` over every (network, layer) feature, in
this order: CKA last, since it may centre the batch's activations in place (`in_place`). Both
networks' layers are `LayerSpec`s of one Batch, named `<network>/<layer>`
(`pipeline.compare.scan.feature`). Nothing else is special to the comparison: it runs, merges and
stores (`AnalysisResult.state`, plain arrays) like any collection.

Minibatches: minibatch k holds the readable images with image_index in [k·B, (k+1)·B), B the
batch size. `shard_ranges` cuts shards at multiples of B, so no minibatch straddles two shards and
the minibatches never depend on shards or workers; an unreadable image shrinks its own minibatch
and never shifts the others. A minibatch counts for CKA when it holds >= 4 images (`MIN_IMAGES`);
matches and selectivity use every image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor

from pipeline.compare.cka import CKA
from pipeline.compare.pearson import CrossSums
from pipeline.compare.scan import feature
from pipeline.compare.selectivity import ClassMeans
from pipeline.stats.collection import Collection, LayerSpec, Use

__all__ = ["ComparePlan", "shard_ranges"]


def shard_ranges(n: int, batch_size: int, shards: int | None = None,
                 shard_size: int | None = None) -> list[tuple[int, int]]:
    """Contiguous [start, stop) image ranges covering 0..n whose inner boundaries are multiples
    of `batch_size`: `shards` groups of whole minibatches (sizes differ by at most one
    minibatch; never more shards than minibatches), or `shard_size` images per shard rounded up
    to whole minibatches."""
    from pipeline.data.shards import shard_ranges as even

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = math.ceil(n / batch_size)
    if shard_size is not None:
        shard_size = max(1, math.ceil(shard_size / batch_size))
    groups = even(batches, shards=shards, shard_size=shard_size)
    return [(a * batch_size, min(b * batch_size, n)) for a, b in groups]


@dataclass(frozen=True)
class ComparePlan:
    """What a comparison's accumulators need: the networks' names, each one's layers (the same
    names, in forward order), the classes, the minibatch and the Grams' precision."""

    names: tuple[str, str]                 # network A's and B's labels in the tables
    a: tuple[LayerSpec, ...]               # A's layers (pipeline.stats.analysis.layer_specs)
    b: tuple[LayerSpec, ...]               # B's layers, the same names
    classes: int                           # labels are 0 .. classes-1 (-1: unknown)
    batch_size: int                        # B: the minibatch of the CKA estimator
    precision: str = "float64"             # the Gram products (pipeline.compare.cka)
    in_place: bool = False                 # the CKA may centre the activations in place

    def __post_init__(self) -> None:
        if self.names[0] == self.names[1]:
            raise ValueError(f"the two networks need distinct names, got {self.names[0]!r} twice")
        for net in self.names:
            feature(net, "")                     # a name with the separator: ValueError
        if not self.a:
            raise ValueError("no layer to compare")
        if [s.name for s in self.a] != [s.name for s in self.b]:
            raise ValueError("both networks need the same layer names, in the same order")

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.a)

    @property
    def specs(self) -> list[LayerSpec]:
        """A's layers then B's, named `<network>/<layer>`: the specs of the AnalysisResult."""
        return [replace(s, name=feature(net, s.name))
                for net, specs in zip(self.names, (self.a, self.b)) for s in specs]

    def collection(self) -> Collection:
        na, nb = self.names
        return Collection((
            Use.of(CrossSums, net_a=na, net_b=nb),
            Use.of(ClassMeans, classes=self.classes),
            Use.of(CKA, net_a=na, net_b=nb, batch_size=self.batch_size,
                   precision=self.precision, in_place=self.in_place)))

    def acts(self, acts_a: dict[str, Tensor], acts_b: dict[str, Tensor]) -> dict[str, Tensor]:
        """Both networks' activations by layer name -> one dict by feature name (the Batch's)."""
        return {feature(net, layer): acts[layer]
                for net, acts in zip(self.names, (acts_a, acts_b)) for layer in self.layers}

    def describe(self) -> dict[str, Any]:
        """What decides the numbers besides the models and images (the fingerprint's part)."""
        return {"names": list(self.names), "layers": list(self.layers),
                "specs": [vars(s) for s in self.specs], "classes": self.classes,
                "batch_size": self.batch_size, "collection": self.collection().describe()}
