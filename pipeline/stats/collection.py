"""Accumulators as a collection: what one is, and how a collection of them is run and stored.

An accumulator is ONE class (subclass `Accumulator`) that declares everything that belongs to it:

    class MyStat(Accumulator):
        kind = "mystat"                       # its name in states and fingerprints
        table = catalog.MYSTAT                # the table its rows go to (pipeline.results.catalog)

        @classmethod
        def build(cls, layer: LayerSpec, **options) -> "MyStat": ...   # one per analysed layer
        def add(self, batch: Batch, layer: LayerSpec) -> None: ...     # one batch
        def merge(self, other: "MyStat") -> "MyStat": ...              # any split == one pass
        def state(self) -> dict: ...            # plain arrays + JSON scalars (results.state)
        @classmethod
        def from_state(cls, state: dict) -> "MyStat": ...
        def rows(self, model: str, layer: LayerSpec) -> pa.Table: ... # rows of `table`

A collection lists the accumulators a job runs, each with its options (`Use`):

    coll = Collection((Use.of(TopK, k=16, neuron="any"), Use.of(ChannelStats)))

and `pipeline.stats.analysis.AnalysisResult(specs, coll)` runs it: one of each per layer, every
accumulator updated from the same `Batch`, merged, stored (`state()`: plain arrays, see
`pipeline.results.state`) and turned into the tables the collection declares.

A `Batch` holds one batch of images as every accumulator of the collection sees it: the uint8
images, their image_index (checked once), each layer's activations reduced once (`Scan`,
keyed by the layer's name), and what is shared and computed on first use (`image_sum`; any
other figure through `shared(key, compute)`). A job that feeds two models (one image read, two
forwards) names the layers of both apart (e.g. `resnet34/conv3`) and passes both models'
activations in one `Batch` (`pipeline.compare` does). An accumulator class may
also override `add_all` (several of its instances from one batch at once: `TopK` stacks every
layer's update into one) and `for_layers` (instances for something other than one layer each,
e.g. a pair of layers).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import numpy as np
import torch
from torch import Tensor

from pipeline.models.geometry import RF
from pipeline.results.catalog import Table

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["LayerSpec", "Batch", "Accumulator", "Use", "Collection"]


@dataclass(frozen=True)
class LayerSpec:
    """What the accumulators of one layer need to know: channels and RF geometry."""

    name: str
    channels: int
    size: int          # RF side in input pixels
    jump: int          # input pixels between neighbouring neurons
    first: int         # top (= left) input row of neuron 0's RF; may be negative
    feature_size: int  # H = W of the feature map for the analysed input size

    @property
    def rf(self) -> RF:
        return RF.square_grid(self.size, self.jump, self.first, self.feature_size)

    def box(self, y: int, x: int) -> tuple[int, int]:
        return self.rf.box(y, x)[:2]


@dataclass
class Batch:
    """One batch as every accumulator of a collection sees it."""

    images: Tensor                     # uint8 (N, 3, H, W) RGB: the analysed crops
    # the accumulators' own types (pipeline.stats.accumulators builds them; named here only,
    # so that the contract module imports nothing above it)
    index: Any                         # ImageIndex: image_index of each image, checked once
    scans: dict[str, Any]              # per layer name: its Scan of (N, C, h, w), read once
    labels: Tensor | None = None       # (N,) class labels, when the job has them
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return int(self.images.shape[0])

    def shared(self, key: str, compute: Callable[[], Any]) -> Any:
        """`compute()` once per batch for every accumulator that asks under `key` (e.g. one
        per-image reduction of a layer that several accumulators read)."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def image_sum(self) -> Tensor:
        """(3, H, W) int64 sum of the batch's images on their device: exact, computed once
        for every accumulator that wants it (the unconditional mean patches)."""
        if "image_sum" not in self._cache:
            self._cache["image_sum"] = _sum_images(self.images)
        return self._cache["image_sum"]


_U16_IMAGES = (2 ** 16 - 1) // 255      # 257 uint8 images sum exactly in uint16


def _sum_images(images: Tensor) -> Tensor:
    """Exact int64 sum over the first axis. On the CPU numpy adds uint8 images into uint16,
    257 at a time (255 * 257 < 2**16): ~1 ms for 64 images of 224 px against ~40 ms for torch's
    int64 reduction (which converts every value first); elsewhere torch's sum."""
    if images.device.type != "cpu" or images.dtype != torch.uint8:
        return images.sum(0, dtype=torch.int64)
    a = images.numpy()
    out = np.zeros(a.shape[1:], np.int64)
    for i in range(0, len(a), _U16_IMAGES):
        out += np.add.reduce(a[i:i + _U16_IMAGES], axis=0, dtype=np.uint16)
    return torch.from_numpy(out)


class Accumulator:
    """Base of an accumulator class (see the module docstring for the whole contract)."""

    kind: ClassVar[str]
    table: ClassVar[Table]

    @classmethod
    def build(cls, layer: LayerSpec, **options: Any) -> "Accumulator":
        raise NotImplementedError

    @classmethod
    def for_layers(cls, layers: Sequence[LayerSpec], **options: Any
                   ) -> list[tuple[LayerSpec, "Accumulator"]]:
        """The instances a collection runs: by default one per layer."""
        return [(layer, cls.build(layer, **options)) for layer in layers]

    @classmethod
    def add_all(cls, items: list[tuple["Accumulator", LayerSpec]], batch: Batch) -> None:
        """Update several instances of this class from one batch (override to batch them)."""
        for acc, layer in items:
            acc.add(batch, layer)

    def add(self, batch: Batch, layer: LayerSpec) -> None:
        raise NotImplementedError

    def flush(self) -> "Accumulator":
        """Add what waits for later batches into the state (state(), merge() and rows() do
        it themselves; timings call it to count the work)."""
        return self

    def merge(self, other: "Accumulator") -> "Accumulator":
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Accumulator":
        raise NotImplementedError

    def rows(self, model: str, layer: LayerSpec) -> "pa.Table":
        raise NotImplementedError


@dataclass(frozen=True)
class Use:
    """One accumulator class of a collection with its options (keyword arguments of `build`
    besides the layer; JSON scalars, so that they enter states and fingerprints as they are)."""

    cls: type
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, acc: type, **options: Any) -> "Use":
        return cls(acc, tuple(sorted(options.items())))

    @property
    def key(self) -> str:
        """Unique within a collection: `topk(k=16,neuron=any)`."""
        return f"{self.cls.kind}({','.join(f'{k}={v}' for k, v in self.options)})"

    def describe(self) -> dict[str, Any]:
        return {"kind": self.cls.kind, **dict(self.options)}


@dataclass(frozen=True)
class Collection:
    """The accumulators a job runs, in order (tables list their rows in this order, layer by
    layer). Picklable: Ray ships it to workers and merge tasks."""

    uses: tuple[Use, ...]

    def __post_init__(self) -> None:
        keys = [u.key for u in self.uses]
        if len(set(keys)) != len(keys):
            raise ValueError(f"an accumulator is listed twice in the collection: {keys}")

    def describe(self) -> list[dict[str, Any]]:
        """What decides the numbers: every accumulator's kind and options, in order."""
        return [u.describe() for u in self.uses]

    @property
    def tables(self) -> list[Table]:
        """The tables the collection writes, in first-use order."""
        return list(dict.fromkeys(u.cls.table for u in self.uses))
