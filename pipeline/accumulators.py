"""Mergeable per-channel accumulators: top-k stimuli, positive-mean stimuli, channel statistics.

Each accumulator follows one shape (see STYLE.md, item 4):

    acc = TopK(channels=64, k=16, neuron="any")
    acc.update(acts, indices)          # acts (N, C, H, W) of one layer, indices (N,) image_index
    acc.merge(other)                   # associative and commutative: any split merged == one pass
    acc.state(); TopK.from_state(s)    # plain numpy arrays: Ray ships it, pickle persists it
    acc.to_table(model=..., layer=...) # rows of DESIGN.md's tables

All work is vectorised over images and channels (no Python loop over either). Exactness:
- `TopK` keeps, per channel, the k best (activation desc, image_index asc, y asc, x asc); since
  the order is total and each image contributes at most one candidate per channel, the result
  is the same bits for any split of the data and any merge order.
- `PositiveMean` sums the RF patches in uint8 units (0..255) in float64. Every partial sum is
  an integer below 2**53, so the sums are exact and order-independent too; the tables report
  them divided by 255 (RGB in [0, 1]).
- `ChannelStats` keeps max (exact), integer counts (exact) and a float64 sum of activations for
  the mean (order-dependent only in the last bits: compare with rtol 1e-12).

Accumulators hold CPU state between batches; per-batch reductions run on the activations'
device and only small (C, ...) results cross to the host.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["TopK", "PositiveMean", "ChannelStats", "TOPK_SCHEMA", "MEAN_SCHEMA",
           "CHANNELS_SCHEMA", "rf_box", "rf_padding"]

TOPK_NEURONS = ("any", "center")
MEAN_NEURONS = ("center", "all")

# topk.parquet without the geometry and patch columns, which the job adds after the merge.
TOPK_SCHEMA = pa.schema([
    ("model", pa.string()), ("layer", pa.string()), ("channel", pa.int32()),
    ("neuron", pa.string()), ("rank", pa.int32()), ("activation", pa.float32()),
    ("image_index", pa.int64()), ("y", pa.int32()), ("x", pa.int32()),
])
MEAN_SCHEMA = pa.schema([
    ("model", pa.string()), ("layer", pa.string()), ("channel", pa.int32()),
    ("neuron", pa.string()), ("count", pa.int64()), ("images", pa.int64()),
    ("size", pa.int32()), ("mean", pa.list_(pa.float32())),
    ("sum", pa.list_(pa.float64())), ("weight", pa.list_(pa.float64())),
])
CHANNELS_SCHEMA = pa.schema([
    ("model", pa.string()), ("layer", pa.string()), ("channel", pa.int32()),
    ("images", pa.int64()), ("max", pa.float32()), ("mean", pa.float64()),
    ("positive_fraction", pa.float64()), ("inactive", pa.bool_()),
    ("positions", pa.int64()), ("positive", pa.int64()), ("sum", pa.float64()),
])


def rf_box(y: int, x: int, jump: int, first: int) -> tuple[int, int]:
    """(top, left) of the RF of neuron (y, x), `first` being the top (= left) of neuron 0's RF.

    With DESIGN.md's geometry, first = offset - (size-1)/2 (`pipeline.geometry.RF.boxes`).
    """
    return first + jump * y, first + jump * x


def rf_padding(in_size: int, feature_size: int, size: int, jump: int, first: int) -> tuple[int, int]:
    """(before, after) padding of an input side so that neuron y's RF starts at row j*y.

    Negative values crop. The padded side is exactly size + jump*(feature_size-1) long, the
    shape a stride-`jump` correlation with a `size` kernel needs to yield `feature_size` outputs.
    """
    before = -first
    total = size + jump * (feature_size - 1)
    return before, total - in_size - before


def _check_acts(acts: Tensor, channels: int) -> None:
    if acts.dim() != 4 or acts.shape[1] != channels:
        raise ValueError(f"activations must be (N, {channels}, H, W), got {tuple(acts.shape)}")


def _as_index(indices: Tensor | np.ndarray, n: int) -> Tensor:
    idx = torch.as_tensor(np.asarray(indices) if not isinstance(indices, Tensor) else indices)
    idx = idx.to(torch.int64).cpu().reshape(-1)
    if idx.numel() != n:
        raise ValueError(f"{idx.numel()} image indices for {n} images")
    return idx


class TopK:
    """The k strongest images per channel, for neuron `any` (each image's best position) or
    `center` (the centre neuron (H//2, W//2)). State: (C, m) arrays, m <= k, sorted best first."""

    def __init__(self, channels: int, k: int, neuron: str = "any"):
        if neuron not in TOPK_NEURONS:
            raise ValueError(f"unknown neuron {neuron!r}; allowed: {', '.join(TOPK_NEURONS)}")
        if k < 1:
            raise ValueError(f"k must be a positive integer, got {k}")
        self.channels, self.k, self.neuron = int(channels), int(k), neuron
        self.activation = torch.empty(channels, 0, dtype=torch.float32)
        self.image_index = torch.empty(channels, 0, dtype=torch.int64)
        self.y = torch.empty(channels, 0, dtype=torch.int64)
        self.x = torch.empty(channels, 0, dtype=torch.int64)

    def candidates(self, acts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per image and channel: the value and (y, x) of the neuron that competes, each (N, C)."""
        n, c, h, w = acts.shape
        if self.neuron == "center":
            val = acts[:, :, h // 2, w // 2]
            y = torch.full((n, c), h // 2, dtype=torch.int64, device=acts.device)
            return val, y, torch.full_like(y, w // 2)
        # torch.max returns the first maximal index: in raster order, smallest y then x.
        val, pos = acts.reshape(n, c, h * w).max(dim=2)
        return val, pos // w, pos % w

    def update(self, acts: Tensor, indices: Tensor | np.ndarray) -> "TopK":
        _check_acts(acts, self.channels)
        n = acts.shape[0]
        idx = _as_index(indices, n)
        if n == 0:
            return self
        val, y, x = self.candidates(acts)
        # Only the batch's own k best per channel can survive: cut before the host copy.
        val, y, x = (t.T.float().cpu() if t.is_floating_point() else t.T.cpu() for t in (val, y, x))
        self._merge_arrays(val, idx.expand(self.channels, n), y, x)
        return self

    def _merge_arrays(self, val: Tensor, idx: Tensor, y: Tensor, x: Tensor) -> None:
        val = torch.cat([self.activation, val], 1)
        idx = torch.cat([self.image_index, idx], 1)
        y = torch.cat([self.y, y], 1)
        x = torch.cat([self.x, x], 1)
        # Lexicographic (activation desc, image_index asc, y asc, x asc) by stable sorts from the
        # last key to the first. `+ 0.0` turns -0.0 into 0.0 so that zeros tie exactly.
        order = torch.arange(val.shape[1]).expand_as(val)
        for key, desc in ((x, False), (y, False), (idx, False), (val, True)):
            k = torch.gather(key, 1, order)
            if desc:
                k = -k + 0.0
            perm = torch.sort(k, dim=1, stable=True).indices
            order = torch.gather(order, 1, perm)
        order = order[:, : self.k]
        self.activation = torch.gather(val, 1, order)
        self.image_index = torch.gather(idx, 1, order)
        self.y = torch.gather(y, 1, order)
        self.x = torch.gather(x, 1, order)

    def merge(self, other: "TopK") -> "TopK":
        if (other.channels, other.k, other.neuron) != (self.channels, self.k, self.neuron):
            raise ValueError("cannot merge TopK accumulators of different shape or neuron")
        self._merge_arrays(other.activation, other.image_index, other.y, other.x)
        return self

    def state(self) -> dict[str, Any]:
        return {"kind": "topk", "channels": self.channels, "k": self.k, "neuron": self.neuron,
                "activation": self.activation.numpy().copy(),
                "image_index": self.image_index.numpy().copy(),
                "y": self.y.numpy().copy(), "x": self.x.numpy().copy()}

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> "TopK":
        acc = cls(s["channels"], s["k"], s["neuron"])
        acc.activation = torch.from_numpy(np.array(s["activation"], dtype=np.float32))
        acc.image_index = torch.from_numpy(np.array(s["image_index"], dtype=np.int64))
        acc.y = torch.from_numpy(np.array(s["y"], dtype=np.int64))
        acc.x = torch.from_numpy(np.array(s["x"], dtype=np.int64))
        return acc

    def to_table(self, model: str, layer: str) -> pa.Table:
        c, m = self.activation.shape
        return pa.table({
            "model": pa.array([model] * (c * m), pa.string()),
            "layer": pa.array([layer] * (c * m), pa.string()),
            "channel": pa.array(np.repeat(np.arange(c, dtype=np.int32), m)),
            "neuron": pa.array([self.neuron] * (c * m), pa.string()),
            "rank": pa.array(np.tile(np.arange(m, dtype=np.int32), c)),
            "activation": pa.array(self.activation.numpy().reshape(-1)),
            "image_index": pa.array(self.image_index.numpy().reshape(-1)),
            "y": pa.array(self.y.numpy().reshape(-1).astype(np.int32)),
            "x": pa.array(self.x.numpy().reshape(-1).astype(np.int32)),
        }, schema=TOPK_SCHEMA)


class PositiveMean:
    """Sum and per-pixel weight of the RF patches of positive activations, per channel.

    neuron `center`: the paper's mean preferred stimulus of the centre neuron, over the images
    whose centre activation is > 0 (a (C, N) @ (N, 3*s*s) matmul per batch).
    neuron `all`: every positive position of the channel contributes its RF patch; computed as
    the correlation of the positive mask with the zero-padded input (the weight gradient of a
    stride-`jump` convolution with a `size` kernel), not as a loop over positions. Cost per
    image: 2*C*3*size^2*H*W flops (conv7 of ResNet34: ~4 GFLOP, more than the forward pass).

    Pixels outside the image are excluded through per-pixel weights (how many patches covered
    that pixel with a real image pixel); `mean = sum / weight`, NaN where the weight is 0.
    Images arrive as uint8 (N, 3, H, W) RGB: the analysed crop, not the model input.
    """

    # float32 partial sums stay exact while they stay below 2**24 (integers in uint8 units).
    _EXACT_F32 = 2 ** 24

    def __init__(self, channels: int, size: int, jump: int, first: int, neuron: str = "center"):
        if neuron not in MEAN_NEURONS:
            raise ValueError(f"unknown neuron {neuron!r}; allowed: {', '.join(MEAN_NEURONS)}")
        self.channels, self.size, self.jump, self.first = int(channels), int(size), int(jump), int(first)
        self.neuron = neuron
        self.images = 0
        self.count = torch.zeros(channels, dtype=torch.int64)
        self.sum = torch.zeros(channels, 3, size, size, dtype=torch.float64)      # uint8 units
        self.weight = torch.zeros(channels, size, size, dtype=torch.float64)

    def _padded(self, images: Tensor, h: int, w: int) -> Tensor:
        """Images padded (zeros) or cropped so that neuron (y, x)'s RF starts at (j*y, j*x)."""
        top, bottom = rf_padding(images.shape[2], h, self.size, self.jump, self.first)
        left, right = rf_padding(images.shape[3], w, self.size, self.jump, self.first)
        return F.pad(images, (left, right, top, bottom))

    def update(self, acts: Tensor, images: Tensor) -> "PositiveMean":
        _check_acts(acts, self.channels)
        n, c, h, w = acts.shape
        if images.shape[0] != n or images.shape[1] != 3:
            raise ValueError(f"images must be (N={n}, 3, H, W), got {tuple(images.shape)}")
        self.images += n
        if n == 0:
            return self
        s = self.size
        if self.neuron == "center":
            # The centre box is the same for every image: only its in-image part is cut (no
            # padded copy of the batch); pixels outside stay 0 in the sum and 0 in the weight.
            top, left = rf_box(h // 2, w // 2, self.jump, self.first)
            y0, y1 = max(top, 0), min(top + s, images.shape[2])
            x0, x1 = max(left, 0), min(left + s, images.shape[3])
            pos = (acts[:, :, h // 2, w // 2] > 0)
            cnt = pos.sum(0).cpu()
            self.count += cnt
            if y1 <= y0 or x1 <= x0:
                return self
            crop = images[:, :, y0:y1, x0:x1].reshape(n, -1)
            # Integers times 0/1 summed in float64: exact, hence independent of the order.
            part = (pos.T.to(torch.float64) @ crop.to(torch.float64)).view(c, 3, y1 - y0, x1 - x0)
            self.sum[:, :, y0 - top:y1 - top, x0 - left:x1 - left] += part.cpu()
            self.weight[:, y0 - top:y1 - top, x0 - left:x1 - left] += \
                cnt.to(torch.float64).view(c, 1, 1)
            return self
        pos = (acts > 0)
        self.count += pos.sum((0, 2, 3)).cpu()
        pad = self._padded(images, h, w)
        # Chunk the images so that each float32 partial sum (<= 255*chunk*H*W) stays exact.
        chunk = max(1, self._EXACT_F32 // (255 * h * w))
        dtype = torch.float32 if 255 * h * w < self._EXACT_F32 else torch.float64
        for i in range(0, n, chunk):
            g = torch.nn.grad.conv2d_weight(pad[i:i + chunk].to(dtype), (c, 3, s, s),
                                            pos[i:i + chunk].to(dtype), stride=self.jump)
            self.sum += g.to(torch.float64).cpu()
        ones = self._padded(torch.ones(1, 1, *images.shape[2:], device=acts.device), h, w)
        per_pos = pos.sum(0, keepdim=True).to(torch.float64)        # (1, C, H, W) counts
        wg = torch.nn.grad.conv2d_weight(ones.to(torch.float64), (c, 1, s, s), per_pos,
                                         stride=self.jump)
        self.weight += wg[:, 0].cpu()
        return self

    def merge(self, other: "PositiveMean") -> "PositiveMean":
        if (other.channels, other.size, other.neuron) != (self.channels, self.size, self.neuron):
            raise ValueError("cannot merge PositiveMean accumulators of different shape or neuron")
        self.images += other.images
        self.count += other.count
        self.sum += other.sum
        self.weight += other.weight
        return self

    def mean(self) -> Tensor:
        """(C, 3, s, s) float64 mean patch in [0, 1]; NaN where no image pixel was seen."""
        w = self.weight.unsqueeze(1).expand_as(self.sum)
        return torch.where(w > 0, self.sum / 255.0 / w.clamp_min(1), torch.nan)

    def state(self) -> dict[str, Any]:
        return {"kind": "mean", "channels": self.channels, "size": self.size, "jump": self.jump,
                "first": self.first, "neuron": self.neuron, "images": self.images,
                "count": self.count.numpy().copy(), "sum": self.sum.numpy().copy(),
                "weight": self.weight.numpy().copy()}

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> "PositiveMean":
        acc = cls(s["channels"], s["size"], s["jump"], s["first"], s["neuron"])
        acc.images = int(s["images"])
        acc.count = torch.from_numpy(np.array(s["count"], dtype=np.int64))
        acc.sum = torch.from_numpy(np.array(s["sum"], dtype=np.float64))
        acc.weight = torch.from_numpy(np.array(s["weight"], dtype=np.float64))
        return acc

    def to_table(self, model: str, layer: str) -> pa.Table:
        c, s = self.channels, self.size
        n = 3 * s * s
        weight3 = self.weight.unsqueeze(1).expand(c, 3, s, s).reshape(c, n).numpy()

        def lists(a: np.ndarray, t: pa.DataType) -> pa.Array:
            return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1), t), n).cast(pa.list_(t))

        return pa.table({
            "model": pa.array([model] * c, pa.string()),
            "layer": pa.array([layer] * c, pa.string()),
            "channel": pa.array(np.arange(c, dtype=np.int32)),
            "neuron": pa.array([self.neuron] * c, pa.string()),
            "count": pa.array(self.count.numpy()),
            "images": pa.array(np.full(c, self.images, dtype=np.int64)),
            "size": pa.array(np.full(c, s, dtype=np.int32)),
            "mean": lists(self.mean().numpy().astype(np.float32), pa.float32()),
            "sum": lists((self.sum / 255.0).numpy(), pa.float64()),
            "weight": lists(weight3, pa.float64()),
        }, schema=MEAN_SCHEMA)


class ChannelStats:
    """Per channel over every position of every image: max, mean, positive fraction, inactive.

    `inactive` = the maximum over everything seen is 0 (post-ReLU activations are >= 0).
    """

    def __init__(self, channels: int):
        self.channels = int(channels)
        self.images = 0
        self.positions = 0                                  # images * H * W
        self.max = torch.full((channels,), -torch.inf, dtype=torch.float32)
        self.sum = torch.zeros(channels, dtype=torch.float64)
        self.positive = torch.zeros(channels, dtype=torch.int64)

    def update(self, acts: Tensor) -> "ChannelStats":
        _check_acts(acts, self.channels)
        n, _, h, w = acts.shape
        if n == 0:
            return self
        self.images += n
        self.positions += n * h * w
        self.max = torch.maximum(self.max, acts.amax((0, 2, 3)).float().cpu())
        self.sum += acts.sum((0, 2, 3), dtype=torch.float64).cpu()
        self.positive += (acts > 0).sum((0, 2, 3)).cpu()
        return self

    def merge(self, other: "ChannelStats") -> "ChannelStats":
        if other.channels != self.channels:
            raise ValueError("cannot merge ChannelStats of different channel counts")
        self.images += other.images
        self.positions += other.positions
        self.max = torch.maximum(self.max, other.max)
        self.sum += other.sum
        self.positive += other.positive
        return self

    def state(self) -> dict[str, Any]:
        return {"kind": "channels", "channels": self.channels, "images": self.images,
                "positions": self.positions, "max": self.max.numpy().copy(),
                "sum": self.sum.numpy().copy(), "positive": self.positive.numpy().copy()}

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> "ChannelStats":
        acc = cls(s["channels"])
        acc.images, acc.positions = int(s["images"]), int(s["positions"])
        acc.max = torch.from_numpy(np.array(s["max"], dtype=np.float32))
        acc.sum = torch.from_numpy(np.array(s["sum"], dtype=np.float64))
        acc.positive = torch.from_numpy(np.array(s["positive"], dtype=np.int64))
        return acc

    def to_table(self, model: str, layer: str) -> pa.Table:
        c = self.channels
        denom = max(self.positions, 1)
        return pa.table({
            "model": pa.array([model] * c, pa.string()),
            "layer": pa.array([layer] * c, pa.string()),
            "channel": pa.array(np.arange(c, dtype=np.int32)),
            "images": pa.array(np.full(c, self.images, dtype=np.int64)),
            "max": pa.array(self.max.numpy()),
            "mean": pa.array((self.sum / denom).numpy()),
            "positive_fraction": pa.array(self.positive.numpy() / denom),
            "inactive": pa.array((self.max == 0).numpy()),
            "positions": pa.array(np.full(c, self.positions, dtype=np.int64)),
            "positive": pa.array(self.positive.numpy()),
            "sum": pa.array(self.sum.numpy()),
        }, schema=CHANNELS_SCHEMA)
