"""The unconditional mean RF patch of a layer: the null a mean preferred stimulus is compared with.

A channel that ignored its input would average, over the images where it is positive, to the
mean patch of *all* images at the same place. `BaselineMean` keeps that mean per layer (one row
of `stimuli/baseline.parquet` per layer and neuron; catalog.BASELINE):

- neuron `center`: the centre neuron's RF box (H//2, W//2) over every image;
- neuron `all`: every position's RF box over every image (each image contributes h*w patches).

Pixels outside the image are excluded through per-pixel weights, as in `PositiveMean`:
`mean = sum / weight`, NaN where no image pixel ever lay.

Cost: the images of a batch are summed once (`Batch.image_sum`, int64, shared by every layer's
`BaselineMean`); `center` adds a crop of that sum, `all` two small 0/1 matrix products (which
rows, which columns each RF offset covers). Measured (1 CPU thread, resnet34's pool1, conv3 and
conv7, 64 images of 224 px): ~1.5 ms per batch for `center` (against ~20 ms for the other
accumulators and ~6 ms for one read of the activations), ~3.6 ms with `all`.

Exact: every value is an integer in uint8 units (sum of at most 255 * images * h * w, far
below 2**53) held in float64, so any split of the images and any merge order give the same
bits.

    acc = BaselineMean.build(layer_spec, neuron="all")
    acc.add(batch, layer_spec)                  # pipeline.stats.collection.Batch
    acc.merge(other); acc.rows("resnet34", layer_spec)
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from pipeline.models.geometry import RF
from pipeline.results import catalog
from pipeline.stats.collection import Accumulator, Batch, LayerSpec

__all__ = ["BaselineMean", "NEURONS"]

NEURONS = ("center", "all")


class BaselineMean(Accumulator):
    """Sum and per-pixel weight of one layer's RF patches over every image (uint8 units)."""

    kind = "baseline"
    table = catalog.BASELINE

    def __init__(self, size: int, jump: int, first: int, neuron: str = "center"):
        if neuron not in NEURONS:
            raise ValueError(f"unknown neuron {neuron!r}; allowed: {', '.join(NEURONS)}")
        self.size, self.jump, self.first, self.neuron = int(size), int(jump), int(first), neuron
        self.rf = RF.square_grid(self.size, self.jump, self.first)
        self.images = 0
        self.sum = torch.zeros(3, self.size, self.size, dtype=torch.float64)
        self.weight = torch.zeros(self.size, self.size, dtype=torch.float64)

    @classmethod
    def build(cls, layer: LayerSpec, neuron: str = "center") -> "BaselineMean":
        return cls(layer.size, layer.jump, layer.first, neuron)

    def add(self, batch: Batch, layer: LayerSpec) -> None:
        scan = batch.scans[layer.name]
        self.update(batch.image_sum(), batch.n, scan.h, scan.w)

    def update(self, image_sum: Tensor, n: int, h: int, w: int) -> "BaselineMean":
        """Add `n` images given as their (3, H, W) int64 sum, for an h x w feature map."""
        self.images += int(n)
        if n == 0:
            return self
        if self.sum.device != image_sum.device:
            self.sum, self.weight = self.sum.to(image_sum.device), self.weight.to(image_sum.device)
        if self.neuron == "center":
            self._add_center(image_sum, n, h, w)
        else:
            total = image_sum.to(torch.float64)      # exact: integers below 2**53
            rows = self._cover(total.shape[1], h, total.device)      # (s, H) 0/1
            cols = self._cover(total.shape[2], w, total.device)      # (s, W) 0/1
            self.sum += rows @ total @ cols.T                        # (3, s, s)
            self.weight += n * torch.outer(rows.sum(1), cols.sum(1))
        return self

    def _add_center(self, image_sum: Tensor, n: int, h: int, w: int) -> None:
        """The centre neuron's box is the same for every image: its in-image part of the sum."""
        s = self.size
        top, left, _ = self.rf.box(h // 2, w // 2)
        y0, y1 = max(top, 0), min(top + s, image_sum.shape[1])
        x0, x1 = max(left, 0), min(left + s, image_sum.shape[2])
        if y1 > y0 and x1 > x0:
            self.sum[:, y0 - top:y1 - top, x0 - left:x1 - left] += \
                image_sum[:, y0:y1, x0:x1].to(torch.float64)
            self.weight[y0 - top:y1 - top, x0 - left:x1 - left] += n

    def _cover(self, length: int, positions: int, device: torch.device) -> Tensor:
        """(size, length) float64: entry [d, r] = 1 when offset d of some neuron's box (one of
        `positions` along the axis) is image row r (boxes from pipeline.models.geometry)."""
        tops, _ = self.rf.boxes(torch.arange(positions), torch.zeros(positions))
        rows = tops[None, :] + torch.arange(self.size)[:, None]        # (s, positions)
        out = torch.zeros(self.size, length, dtype=torch.float64)
        inside = (rows >= 0) & (rows < length)
        d = torch.arange(self.size)[:, None].expand_as(rows)
        out[d[inside], rows[inside]] = 1.0        # a row once per offset: jump >= 1
        return out.to(device)

    def merge(self, other: "BaselineMean") -> "BaselineMean":
        if (other.size, other.jump, other.first, other.neuron) != \
                (self.size, self.jump, self.first, self.neuron):
            raise ValueError("cannot merge BaselineMean accumulators of other geometry or neuron")
        self.images += other.images
        self.sum += other.sum.to(self.sum.device)
        self.weight += other.weight.to(self.weight.device)
        return self

    def mean(self) -> Tensor:
        """(3, s, s) float64 mean patch in [0, 1] (host); NaN where no image pixel lay."""
        sm, wt = self.sum.cpu(), self.weight.cpu().expand(3, -1, -1)
        return torch.where(wt > 0, sm / 255.0 / wt.clamp_min(1), torch.nan)

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "size": self.size, "jump": self.jump, "first": self.first,
                "neuron": self.neuron, "images": self.images,
                "sum": self.sum.cpu().numpy().copy(), "weight": self.weight.cpu().numpy().copy()}

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> "BaselineMean":
        acc = cls(s["size"], s["jump"], s["first"], s["neuron"])
        acc.images = int(s["images"])
        acc.sum = torch.from_numpy(np.array(s["sum"], dtype=np.float64))
        acc.weight = torch.from_numpy(np.array(s["weight"], dtype=np.float64))
        return acc

    def rows(self, model: str, layer: LayerSpec) -> pa.Table:
        """One row of catalog.BASELINE (`sum` in [0, 1] units and `weight` per value of the
        (3, s, s) patch, as in stimuli/mean.parquet)."""
        s = self.size
        weight = self.weight.cpu().expand(3, -1, -1).reshape(-1).numpy()

        def cell(a: np.ndarray, t: pa.DataType) -> pa.Array:
            return pa.array([a.reshape(-1)], pa.list_(t))

        return pa.table({
            "model": pa.array([model], pa.string()),
            "layer": pa.array([layer.name], pa.string()),
            "neuron": pa.array([self.neuron], pa.string()),
            "images": pa.array([self.images], pa.int64()),
            "size": pa.array([s], pa.int32()),
            "mean": cell(self.mean().numpy().astype(np.float32), pa.float32()),
            "sum": cell(self.sum.cpu().numpy() / 255.0, pa.float64()),
            "weight": cell(weight, pa.float64()),
        }, schema=catalog.BASELINE.schema)
