"""One comparison's accumulators and its minibatch rule: what a shard of `jobs.compare` computes.

    spec = CompareSpec(names=("resnet34", "plainnet34"), layers=("pool1", "conv3"),
                       shapes_a=((64, 16, 16), (64, 16, 16)), shapes_b=(...), classes=8,
                       batch_size=16)
    result = Comparison(spec)
    result.update(acts_a, acts_b, indices, labels)   # one minibatch (all images of one k)
    result.merge(other)                              # other shards, any order
    tables = result.tables()                         # {"cka", "matches", "selectivity"}

Minibatches: minibatch k holds the readable images with image_index in [k·B, (k+1)·B), B the
batch size. `shard_ranges` cuts shards at multiples of B, so no minibatch straddles two shards and
the minibatches never depend on shards or workers; an unreadable image shrinks its own minibatch
and never shifts the others. A minibatch counts for CKA when it holds >= 4 images (`MIN_IMAGES`);
matches and selectivity use every image.

The collection: `CKA` over every (network, layer) feature, one `CrossSums` per layer (both
networks have each layer name), one `ClassMeans` per (network, layer). Each declares its table
(`name`, `schema`); `state()` is plain numpy arrays and small values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from torch import Tensor

from pipeline.compare.cka import CKA, CKA_SCHEMA
from pipeline.compare.pearson import MATCHES_SCHEMA, CrossSums
from pipeline.compare.scan import LayerScan
from pipeline.compare.selectivity import SELECTIVITY_SCHEMA, ClassMeans

__all__ = ["CompareSpec", "Comparison", "shard_ranges", "minibatch_of", "merge_states",
           "SCHEMAS"]

SCHEMAS = {"cka": CKA_SCHEMA, "matches": MATCHES_SCHEMA, "selectivity": SELECTIVITY_SCHEMA}


def shard_ranges(n: int, batch_size: int, shards: int | None = None,
                 shard_size: int | None = None) -> list[tuple[int, int]]:
    """Contiguous [start, stop) image ranges covering 0..n whose inner boundaries are multiples
    of `batch_size`: `shards` groups of whole minibatches (sizes differ by at most one
    minibatch; never more shards than minibatches), or `shard_size` images per shard rounded up
    to whole minibatches."""
    from pipeline.data.listing import shard_ranges as even

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = math.ceil(n / batch_size)
    if shard_size is not None:
        shard_size = max(1, math.ceil(shard_size / batch_size))
    groups = even(batches, shards=shards, shard_size=shard_size)
    return [(a * batch_size, min(b * batch_size, n)) for a, b in groups]


def minibatch_of(indices: np.ndarray, batch_size: int) -> int:
    """The minibatch k that every image_index of a batch lies in; ValueError when they straddle
    two (a batch must be one minibatch, never a mix)."""
    k = np.unique(np.asarray(indices, dtype=np.int64) // batch_size)
    if k.size != 1:
        raise ValueError(f"a batch spans minibatches {k.tolist()} of size {batch_size}; batches "
                         f"must be cut at multiples of the batch size")
    return int(k[0])


@dataclass(frozen=True)
class CompareSpec:
    """What the accumulators need: names, layers and their output shapes, classes, minibatch."""

    names: tuple[str, str]                 # network A's and B's labels in the tables
    layers: tuple[str, ...]                # layer names present in both networks
    shapes_a: tuple[tuple[int, int, int], ...]   # per layer: (C, H, W) of A's output
    shapes_b: tuple[tuple[int, int, int], ...]   # ((C, 1, 1) for an (N, C) output)
    classes: int                           # labels are 0 .. classes-1 (-1: unknown)
    batch_size: int                        # B: the minibatch of the CKA estimator
    precision: str = "float64"             # the Gram products (pipeline.compare.cka)

    def __post_init__(self) -> None:
        if self.names[0] == self.names[1]:
            raise ValueError(f"the two networks need distinct names, got {self.names[0]!r} twice")
        if not self.layers:
            raise ValueError("no layer to compare")
        if not len(self.layers) == len(self.shapes_a) == len(self.shapes_b):
            raise ValueError("one shape per layer and network")
        if any(len(s) != 3 for s in (*self.shapes_a, *self.shapes_b)):
            raise ValueError("shapes are (C, H, W)")

    def state(self) -> dict[str, Any]:
        """Plain values (lists of str, int64 arrays of the shapes)."""
        return {"names": list(self.names), "layers": list(self.layers),
                "shapes_a": np.asarray(self.shapes_a, np.int64).reshape(-1, 3),
                "shapes_b": np.asarray(self.shapes_b, np.int64).reshape(-1, 3),
                "classes": self.classes, "batch_size": self.batch_size,
                "precision": self.precision}

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> "CompareSpec":
        return cls(tuple(s["names"]), tuple(s["layers"]),
                   tuple(tuple(int(v) for v in r) for r in np.asarray(s["shapes_a"])),
                   tuple(tuple(int(v) for v in r) for r in np.asarray(s["shapes_b"])),
                   int(s["classes"]), int(s["batch_size"]), str(s["precision"]))

    def per(self, i: int) -> str:
        """Pearson samples of layer i: positions when both maps have one size, else images."""
        return "position" if self.shapes_a[i][1:] == self.shapes_b[i][1:] else "image"


class Comparison:
    """The accumulators of one comparison; update per minibatch, merge, state, tables."""

    def __init__(self, spec: CompareSpec):
        self.spec = spec
        na, nb = spec.names
        self.cka = CKA([(na, spec.layers), (nb, spec.layers)], spec.precision)
        self.cross = {layer: CrossSums(layer, sa[0], sb[0], spec.per(i))
                      for i, (layer, sa, sb) in enumerate(zip(spec.layers, spec.shapes_a,
                                                              spec.shapes_b))}
        self.select = {(net, layer): ClassMeans(layer, shape[0], spec.classes)
                       for net, shapes in ((na, spec.shapes_a), (nb, spec.shapes_b))
                       for layer, shape in zip(spec.layers, shapes)}
        self.images = 0
        self.batches: list[int] = []           # minibatches seen (any size), for the checks

    def update(self, acts_a: dict[str, Tensor], acts_b: dict[str, Tensor],
               indices: np.ndarray, labels: np.ndarray, overwrite: bool = False) -> "Comparison":
        """One minibatch: each network's activations per layer (n, ...) of the same images,
        their image_index (n,) (all in one minibatch) and labels (n,). Each layer is read once
        for the per-image figures (`LayerScan`) that matches and selectivity share; the CKA
        comes last and, with `overwrite` (the caller is done with the activations), centres
        them in place."""
        n = len(indices)
        if n == 0:
            return self
        k = minibatch_of(indices, self.spec.batch_size)
        if k in self.batches:
            raise ValueError(f"minibatch {k} given twice")
        self.batches.append(k)
        layers, (na, nb) = self.spec.layers, self.spec.names
        scans: dict[int, LayerScan] = {}        # one tensor (a self-comparison): one scan
        for t in (*(acts_a[x] for x in layers), *(acts_b[x] for x in layers)):
            if id(t) not in scans:
                scans[id(t)] = LayerScan.of(t)
        for layer in layers:
            a, b = acts_a[layer], acts_b[layer]
            self.cross[layer].update(a, b, (scans[id(a)], scans[id(b)]))
            self.select[(na, layer)].update(a, labels, scans[id(a)])
            self.select[(nb, layer)].update(b, labels, scans[id(b)])
        self.cka.update([acts_a[x] for x in layers] + [acts_b[x] for x in layers], overwrite)
        self.images += n
        return self

    def merge(self, other: "Comparison") -> "Comparison":
        if other.spec != self.spec:
            raise ValueError("cannot merge comparisons of other networks, layers or settings")
        if set(self.batches) & set(other.batches):
            raise ValueError("the two results share minibatches: a shard counted twice")
        self.cka.merge(other.cka)
        for layer, acc in self.cross.items():
            acc.merge(other.cross[layer])
        for key, acc in self.select.items():
            acc.merge(other.select[key])
        self.images += other.images
        self.batches = sorted(self.batches + other.batches)
        return self

    def state(self) -> dict[str, Any]:
        """Plain numpy arrays and JSON values only (no pickled objects): `cross` by layer,
        `select` by network then layer."""
        select: dict[str, dict] = {}
        for (net, layer), acc in self.select.items():
            select.setdefault(net, {})[layer] = acc.state()
        return {"spec": self.spec.state(), "images": self.images,
                "batches": np.asarray(self.batches, np.int64), "cka": self.cka.state(),
                "cross": {layer: a.state() for layer, a in self.cross.items()},
                "select": select}

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> "Comparison":
        r = cls(CompareSpec.from_state(s["spec"]))
        r.images, r.batches = int(s["images"]), [int(k) for k in s["batches"]]
        r.cka = CKA.from_state(s["cka"])
        r.cross = {layer: CrossSums.from_state(x) for layer, x in s["cross"].items()}
        r.select = {(net, layer): ClassMeans.from_state(s["select"][net][layer])
                    for net, layer in r.select}
        return r

    def tables(self) -> dict[str, pa.Table]:
        na, nb = self.spec.names
        return {
            "cka": self.cka.to_table(),
            "matches": _concat([a.to_table(na, nb) for a in self.cross.values()],
                               MATCHES_SCHEMA),
            "selectivity": _concat([a.to_table(net) for (net, _), a in self.select.items()],
                                   SELECTIVITY_SCHEMA),
        }


def _concat(parts: list[pa.Table], schema: pa.Schema) -> pa.Table:
    return pa.concat_tables(parts).cast(schema) if parts else schema.empty_table()


def merge_states(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Merge two `Comparison.state()`s: what the job's merge tree folds."""
    return Comparison.from_state(a).merge(Comparison.from_state(b)).state()
