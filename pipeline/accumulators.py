"""Mergeable per-channel accumulators: top-k stimuli, positive-mean stimuli, channel statistics.

Each accumulator follows one shape (see STYLE.md, item 4):

    acc = TopK(channels=64, k=16, neuron="any")
    acc.update(acts, indices)          # acts (N, C, H, W) of one layer, indices (N,) image_index
    acc.merge(other)                   # associative and commutative: any split merged == one pass
    acc.state(); TopK.from_state(s)    # plain numpy arrays: Ray ships it, pickle persists it
    acc.to_table(model=..., layer=...) # rows of DESIGN.md's tables

Speed: one read of the activations. `Scan(acts)` reduces a batch of one layer once to small
(N, C) per-image figures (maximum, sum, positive count, centre value); every
accumulator of that layer updates from the same `Scan` (pass it instead of `acts`; a plain
tensor is wrapped). The first-maximum position is computed only for the images that can enter
a top-k. Accumulator state lives on the activations' device (moved there on the first update)
and crosses to the host only in `state()` / `to_table()`: no per-batch device-to-host copy, and
top-k merges on the device. `Scan(acts, compiled=True)` (or `PREFERRED_STIMULI_COMPILE=1`,
see `use_compile`) fuses the max, sum and count into one torch.compile'd kernel.

Exactness (results are the same for any split of the data and any merge order):
- `TopK` keeps, per channel, the k best under (activation desc, image_index asc, y asc, x asc);
  one sort on an int64 key (order-preserving bits of the activation, then image_index), after a
  stable sort on (y, x). The order is total and each image offers one candidate per channel, so
  the result is the same bits for any split. Per image, `any` takes the first maximum in raster
  order (smallest y, then x), exactly as `torch.max` did.
- `PositiveMean` sums the RF patches in uint8 units (0..255): each batch's partial sum is a
  float32 matmul of a 0/1 mask with integers, at most 255 * N < 2**24 (batches are cut to keep
  it so), hence exact; the float64 state holds integers below 2**53: exact and order-independent.
- `ChannelStats` keeps max (exact), integer counts (exact) and a float64 sum of activations for
  the mean. Eager on CPU, each image's sum (at most H*W values) is a float32 sum whose bits do
  not depend on the batch (see `Scan`), and the per-image sums are added in float64; the
  compiled and accelerator paths sum in float64 directly. Any split and merge order agree to
  ~1e-15 relative (tests: rtol 1e-12), as before; against an exact float64 sum, and between the
  eager CPU and the compiled path, to ~1e-7 (tests: rtol 1e-6): the mean needs no more. So
  that the 1e-12 agreement holds, all workers of one run use the same path (the switch is per
  process: set PREFERRED_STIMULI_COMPILE for every worker, e.g. in the Ray runtime_env).
Activations must not be NaN (a NaN has no place in a top-k).
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["TopK", "PositiveMean", "ChannelStats", "Scan", "use_compile", "COMPILE_ENV",
           "TOPK_SCHEMA", "MEAN_SCHEMA", "CHANNELS_SCHEMA", "rf_box", "rf_padding"]

TOPK_NEURONS = ("any", "center")
MEAN_NEURONS = ("center", "all")
COMPILE_ENV = "PREFERRED_STIMULI_COMPILE"
MAX_IMAGE_INDEX = 2 ** 32          # image_index must lie in [0, 2**32): it fills the low key half
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


def use_compile() -> bool:
    """Whether `Scan` fuses its reductions with torch.compile when not told: environment variable
    PREFERRED_STIMULI_COMPILE = 1 (on) or 0 / unset (off), read at call time. Off by default:
    compiling costs 10-25 s per process (too much for tests and short runs), and on CPU it takes
    a full-size ResNet34 batch from ~2.7x to ~1.9x one `amax` read (see docs/analysis.md)."""
    v = os.environ.get(COMPILE_ENV, "0").strip().lower()
    if v in ("1", "true", "on", "yes"):
        return True
    if v in ("", "0", "false", "off", "no"):
        return False
    raise ValueError(f"{COMPILE_ENV}={v!r}; allowed: 0, 1")


def _fused(acts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per (image, channel): maximum, float64 sum, positive count; one read when compiled.
    (Accelerators and the compiled path add in float64 whatever order their kernels pick.)"""
    return (acts.amax((2, 3)), acts.sum((2, 3), dtype=torch.float64),
            (acts > 0).sum((2, 3), dtype=torch.int64))


def _fused_flat(acts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`_fused` over (N, C, H*W) rows: the form torch.compile vectorises into one loop."""
    f = acts.flatten(2)
    return f.amax(2), f.sum(2, dtype=torch.float64), (f > 0).sum(2, dtype=torch.int64)


_COMPILED: dict[str, Callable] = {}


def _compiled_fused(acts: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """`_fused` through torch.compile (built once per process, dynamic shapes: one kernel serves
    every layer and batch size); None, with one warning, when compiling fails (no compiler...)."""
    fn = _COMPILED.get("fused")
    if fn is None:
        fn = _COMPILED["fused"] = torch.compile(_fused_flat, dynamic=True)
    if fn is _fused_failed:
        return None
    try:
        return fn(acts)
    except Exception as e:  # noqa: BLE001 - any compiler failure means: use the eager path
        warnings.warn(f"torch.compile of the accumulator scan failed ({type(e).__name__}: {e}); "
                      "using the eager path", RuntimeWarning, stacklevel=3)
        _COMPILED["fused"] = _fused_failed
        return None


def _fused_failed(acts: Tensor) -> None:  # marker: compilation failed once in this process
    return None


# Eager CPU path: rows are reduced in blocks of about this size (measured best of 0.5-2 MiB).
_BLOCK_BYTES = 2 << 20


class Scan:
    """One layer's batch reduced once to small per-(image, channel) figures, shared by every
    accumulator of the layer. Figures are computed on first use and cached:

    image_max (N, C) float32, image_sum (N, C) float64, image_positive (N, C) int64,
    center (N, C) the centre neuron (H//2, W//2), and `first_max(n, c)` the raster position of
    an image's first maximum (computed only for the few images that can enter a top-k).

    `compiled`: fuse max, sum and count into one torch.compile'd kernel (None: `use_compile()`).
    Eager CPU: one pass over cache-sized blocks of (image, channel) rows, each block reduced
    three times while it sits in cache: max, float32 sum, and the count as the float32 sum of
    `a > 0` written as 0.0/1.0 into a reused buffer (exact: counts <= H*W < 2**24).
    Why a float32 sum per image is fine: it adds at most H*W values of one image in an order
    fixed by H*W alone (the CPU kernel parallelises over images, never inside one; a single
    (image, channel) row is doubled so that this holds for it too), so an image's sum is the same
    bits in any batch, shard or worker; the per-image sums are then added in float64. Relative
    to an exact sum it is off by ~log2(H*W) * 2**-24 (~1e-6), which the channel *mean* can
    afford; across splits and merge orders results agree to ~1e-15.
    """

    def __init__(self, acts: Tensor, compiled: bool | None = None):
        if acts.dim() != 4:
            raise ValueError(f"activations must be (N, C, H, W), got {tuple(acts.shape)}")
        self.acts = acts
        self.n, self.c, self.h, self.w = acts.shape
        self.device = acts.device
        self.compiled = use_compile() if compiled is None else bool(compiled)
        self._cache: dict[str, Tensor] = {}

    @property
    def shape(self) -> torch.Size:
        return self.acts.shape

    def _fill(self) -> None:
        if self.compiled and self.n:
            out = _compiled_fused(self.acts)
            if out is not None:
                self._cache.update(image_max=out[0], image_sum=out[1], image_positive=out[2])
                return
        if (self.device.type != "cpu" or not self.acts.is_contiguous()
                or self.acts.dtype != torch.float32):
            m, s, p = _fused(self.acts)
            self._cache.update(image_max=m, image_sum=s, image_positive=p)
            return
        f = self.acts.reshape(self.n * self.c, -1)                      # a view: contiguous
        rows, length = f.shape
        if rows == 1:
            f = f.repeat(2, 1)   # one output row would be split across threads: keep it whole
        if length >= 2 ** 24:
            m, s, p = f.amax(1), f.sum(1), (f > 0).sum(1)
        else:
            # Block by block, so that the second and third reads come from cache.
            total = f.shape[0]
            m = torch.empty(total, dtype=f.dtype)
            s = torch.empty(total, dtype=torch.float32)
            p = torch.empty(total, dtype=torch.float32)
            step = max(1, _BLOCK_BYTES // (4 * max(length, 1)))
            buf = torch.empty(min(step, total), length, dtype=torch.float32)
            for i in range(0, total, step):
                blk = f[i:i + step]
                b = buf[:blk.shape[0]]
                torch.amax(blk, 1, out=m[i:i + step])
                torch.sum(blk, 1, out=s[i:i + step])
                torch.gt(blk, 0, out=b)
                torch.sum(b, 1, out=p[i:i + step])
        m, s, p = m[:rows], s[:rows], p[:rows]
        self._cache.update(image_max=m.view(self.n, self.c), image_sum=s.to(torch.float64).view(self.n, self.c),
                           image_positive=p.to(torch.int64).view(self.n, self.c))

    @property
    def image_max(self) -> Tensor:
        if "image_max" not in self._cache:
            self._fill()    # max, sum and count come from the same pass (blocked or fused)
        return self._cache["image_max"]

    @property
    def image_sum(self) -> Tensor:
        if "image_sum" not in self._cache:
            self._fill()
        return self._cache["image_sum"]

    @property
    def image_positive(self) -> Tensor:
        if "image_positive" not in self._cache:
            self._fill()
        return self._cache["image_positive"]

    @property
    def center(self) -> Tensor:
        return self.acts[:, :, self.h // 2, self.w // 2]

    def first_max(self, n: Tensor, c: Tensor) -> Tensor:
        """Raster position (y*W + x) of the first maximum of images n, channels c (1-D each).
        `argmax` returns the first maximal index: the smallest y, then x."""
        flat = self.acts.reshape(self.n * self.c, -1)     # a view when contiguous
        return flat.index_select(0, n * self.c + c).argmax(1)

    def first_max_all(self) -> Tensor:
        """(N, C) positions of every image's first maximum (the device path: no host sync)."""
        return self.acts.reshape(self.n, self.c, -1).argmax(2)


def _scan(acts: "Tensor | Scan", channels: int) -> Scan:
    scan = acts if isinstance(acts, Scan) else Scan(acts)
    if scan.acts.dim() != 4 or scan.c != channels:
        raise ValueError(f"activations must be (N, {channels}, H, W), got {tuple(scan.shape)}")
    return scan


def _as_index(indices: Tensor | np.ndarray, n: int) -> Tensor:
    idx = torch.as_tensor(np.asarray(indices) if not isinstance(indices, Tensor) else indices)
    idx = idx.to(torch.int64).cpu().reshape(-1)
    if idx.numel() != n:
        raise ValueError(f"{idx.numel()} image indices for {n} images")
    if n and (int(idx.min()) < 0 or int(idx.max()) >= MAX_IMAGE_INDEX):
        raise ValueError(f"image_index must lie in [0, {MAX_IMAGE_INDEX}), got "
                         f"{int(idx.min())} .. {int(idx.max())}")
    return idx


def _order_key(val: Tensor, idx: Tensor) -> Tensor:
    """int64 key, ascending = (activation desc, image_index asc): the float32 bits made
    order-preserving as int32 (negatives: magnitude bits flipped), complemented for descending
    order, in the high half; image_index (< 2**32) in the low half. `+ 0.0` makes -0.0 tie
    with 0.0."""
    bits = (val.to(torch.float32) + 0.0).view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (~ordered).to(torch.int64) * MAX_IMAGE_INDEX + idx


class _OnDevice:
    """State tensors that follow the activations' device (moved once, on the first update)."""

    _tensors: tuple[str, ...] = ()

    def _to(self, device: torch.device) -> None:
        for name in self._tensors:
            t = getattr(self, name)
            if t.device != device:
                setattr(self, name, t.to(device))

    @property
    def device(self) -> torch.device:
        return getattr(self, self._tensors[0]).device

    def _host(self, name: str) -> np.ndarray:
        return getattr(self, name).detach().cpu().numpy().copy()


class TopK(_OnDevice):
    """The k strongest images per channel, for neuron `any` (each image's best position) or
    `center` (the centre neuron (H//2, W//2)). State: (C, m) tensors, m <= k, sorted best first,
    on the activations' device."""

    _tensors = ("activation", "image_index", "y", "x")

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

    def update(self, acts: "Tensor | Scan", indices: Tensor | np.ndarray) -> "TopK":
        scan = _scan(acts, self.channels)
        n, c, w = scan.n, self.channels, scan.w
        idx = _as_index(indices, n)
        if n == 0:
            return self
        self._to(scan.device)
        cpu = scan.device.type == "cpu"
        idx = idx.to(scan.device, non_blocking=True).expand(c, n)
        val = (scan.center if self.neuron == "center" else scan.image_max).T.float()
        need = None
        if cpu:
            # A candidate can enter only if its key is not worse than the k-th best key of state
            # and batch together (the state is sorted: when full, its last entry bounds that).
            # On CPU the test is free (no device sync), and in a long run it is false for almost
            # every candidate: no position, no merge.
            key = _order_key(val, idx)
            if self.activation.shape[1] == self.k:
                kth = _order_key(self.activation[:, -1:], self.image_index[:, -1:])
            else:
                both = torch.cat([_order_key(self.activation, self.image_index), key], 1)
                kth = both.sort(1).values[:, min(self.k, both.shape[1]) - 1:][:, :1]
            need = key <= kth
            if not bool(need.any()):
                return self
        if self.neuron == "center":
            y = torch.full((c, n), scan.h // 2, dtype=torch.int64, device=scan.device)
            self._keep(val, idx, y, torch.full_like(y, w // 2))
            return self
        # Positions only for the candidates that can enter; the others keep y = x = 0 and are
        # never selected (at least k candidates are strictly better).
        if cpu:
            cs, ns = need.nonzero(as_tuple=True)
            pos = torch.zeros(c, n, dtype=torch.int64)
            if cs.numel():
                pos[cs, ns] = scan.first_max(ns, cs)
        else:  # on an accelerator, one argmax pass beats a host sync
            pos = scan.first_max_all().T
        self._keep(val, idx, pos // w, pos % w)
        return self

    def _keep(self, val: Tensor, idx: Tensor, y: Tensor, x: Tensor) -> None:
        """Merge (C, n) candidates into the state: the k best of both, in the total order."""
        val = torch.cat([self.activation, val], 1)
        idx = torch.cat([self.image_index, idx], 1)
        y = torch.cat([self.y, y], 1)
        x = torch.cat([self.x, x], 1)
        # (activation desc, image_index asc) in one int64 key; (y asc, x asc) only breaks ties of
        # one image_index offered twice, by a stable sort before.
        order = (y * MAX_IMAGE_INDEX + x).argsort(dim=1, stable=True)
        key = torch.gather(_order_key(val, idx), 1, order)
        order = torch.gather(order, 1, key.argsort(dim=1, stable=True))[:, : self.k]
        self.activation = torch.gather(val, 1, order)
        self.image_index = torch.gather(idx, 1, order)
        self.y = torch.gather(y, 1, order)
        self.x = torch.gather(x, 1, order)

    def merge(self, other: "TopK") -> "TopK":
        if (other.channels, other.k, other.neuron) != (self.channels, self.k, self.neuron):
            raise ValueError("cannot merge TopK accumulators of different shape or neuron")
        dev = self.device
        self._keep(*(t.to(dev) for t in (other.activation, other.image_index, other.y, other.x)))
        return self

    def state(self) -> dict[str, Any]:
        return {"kind": "topk", "channels": self.channels, "k": self.k, "neuron": self.neuron,
                "activation": self._host("activation"), "image_index": self._host("image_index"),
                "y": self._host("y"), "x": self._host("x")}

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> "TopK":
        acc = cls(s["channels"], s["k"], s["neuron"])
        acc.activation = torch.from_numpy(np.array(s["activation"], dtype=np.float32))
        acc.image_index = torch.from_numpy(np.array(s["image_index"], dtype=np.int64))
        acc.y = torch.from_numpy(np.array(s["y"], dtype=np.int64))
        acc.x = torch.from_numpy(np.array(s["x"], dtype=np.int64))
        return acc

    def to_table(self, model: str, layer: str) -> pa.Table:
        act, idx, y, x = (self._host(n) for n in self._tensors)
        c, m = act.shape
        return pa.table({
            "model": pa.array([model] * (c * m), pa.string()),
            "layer": pa.array([layer] * (c * m), pa.string()),
            "channel": pa.array(np.repeat(np.arange(c, dtype=np.int32), m)),
            "neuron": pa.array([self.neuron] * (c * m), pa.string()),
            "rank": pa.array(np.tile(np.arange(m, dtype=np.int32), c)),
            "activation": pa.array(act.reshape(-1)),
            "image_index": pa.array(idx.reshape(-1)),
            "y": pa.array(y.reshape(-1).astype(np.int32)),
            "x": pa.array(x.reshape(-1).astype(np.int32)),
        }, schema=TOPK_SCHEMA)


class PositiveMean(_OnDevice):
    """Sum and per-pixel weight of the RF patches of positive activations, per channel.

    neuron `center`: the paper's mean preferred stimulus of the centre neuron, over the images
    whose centre activation is > 0 (a (C, N) @ (N, 3*s*s) float32 matmul per batch: integers
    below 255 * N < 2**24, exact).
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
    _tensors = ("count", "sum", "weight")

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

    def update(self, acts: "Tensor | Scan", images: Tensor) -> "PositiveMean":
        scan = _scan(acts, self.channels)
        n, c, h, w = scan.shape
        if images.shape[0] != n or images.shape[1] != 3:
            raise ValueError(f"images must be (N={n}, 3, H, W), got {tuple(images.shape)}")
        self.images += n
        if n == 0:
            return self
        self._to(scan.device)
        images = images.to(scan.device, non_blocking=True)
        s = self.size
        if self.neuron == "center":
            # The centre box is the same for every image: only its in-image part is cut (no
            # padded copy of the batch); pixels outside stay 0 in the sum and 0 in the weight.
            top, left = rf_box(h // 2, w // 2, self.jump, self.first)
            y0, y1 = max(top, 0), min(top + s, images.shape[2])
            x0, x1 = max(left, 0), min(left + s, images.shape[3])
            pos = scan.center > 0
            cnt = pos.sum(0)
            self.count += cnt
            if y1 <= y0 or x1 <= x0:
                return self
            crop = images[:, :, y0:y1, x0:x1].reshape(n, -1)
            # 0/1 times integers <= 255 summed over <= `rows` images: below 2**24, exact in
            # float32 (2-4x faster than float64), then added to the float64 state exactly.
            rows = self._EXACT_F32 // 256
            part = self.sum[:, :, y0 - top:y1 - top, x0 - left:x1 - left]
            for i in range(0, n, rows):
                mm = pos[i:i + rows].T.to(torch.float32) @ crop[i:i + rows].to(torch.float32)
                part += mm.view(c, 3, y1 - y0, x1 - x0)
            self.weight[:, y0 - top:y1 - top, x0 - left:x1 - left] += \
                cnt.to(torch.float64).view(c, 1, 1)
            return self
        pos = scan.acts > 0
        self.count += pos.sum((0, 2, 3))
        pad = self._padded(images, h, w)
        # Chunk the images so that each float32 partial sum (<= 255*chunk*H*W) stays exact.
        chunk = max(1, self._EXACT_F32 // (255 * h * w))
        dtype = torch.float32 if 255 * h * w < self._EXACT_F32 else torch.float64
        for i in range(0, n, chunk):
            g = torch.nn.grad.conv2d_weight(pad[i:i + chunk].to(dtype), (c, 3, s, s),
                                            pos[i:i + chunk].to(dtype), stride=self.jump)
            self.sum += g.to(torch.float64)
        ones = self._padded(torch.ones(1, 1, *images.shape[2:], device=scan.device), h, w)
        per_pos = pos.sum(0, keepdim=True).to(torch.float64)        # (1, C, H, W) counts
        wg = torch.nn.grad.conv2d_weight(ones.to(torch.float64), (c, 1, s, s), per_pos,
                                         stride=self.jump)
        self.weight += wg[:, 0]
        return self

    def merge(self, other: "PositiveMean") -> "PositiveMean":
        if (other.channels, other.size, other.neuron) != (self.channels, self.size, self.neuron):
            raise ValueError("cannot merge PositiveMean accumulators of different shape or neuron")
        dev = self.device
        self.images += other.images
        self.count += other.count.to(dev)
        self.sum += other.sum.to(dev)
        self.weight += other.weight.to(dev)
        return self

    def mean(self) -> Tensor:
        """(C, 3, s, s) float64 mean patch in [0, 1] (host); NaN where no image pixel was seen."""
        sm, wt = self.sum.cpu(), self.weight.cpu()
        w = wt.unsqueeze(1).expand_as(sm)
        return torch.where(w > 0, sm / 255.0 / w.clamp_min(1), torch.nan)

    def state(self) -> dict[str, Any]:
        return {"kind": "mean", "channels": self.channels, "size": self.size, "jump": self.jump,
                "first": self.first, "neuron": self.neuron, "images": self.images,
                "count": self._host("count"), "sum": self._host("sum"),
                "weight": self._host("weight")}

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
        weight3 = np.broadcast_to(self._host("weight")[:, None], (c, 3, s, s)).reshape(c, n)

        def lists(a: np.ndarray, t: pa.DataType) -> pa.Array:
            return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1), t), n).cast(pa.list_(t))

        return pa.table({
            "model": pa.array([model] * c, pa.string()),
            "layer": pa.array([layer] * c, pa.string()),
            "channel": pa.array(np.arange(c, dtype=np.int32)),
            "neuron": pa.array([self.neuron] * c, pa.string()),
            "count": pa.array(self._host("count")),
            "images": pa.array(np.full(c, self.images, dtype=np.int64)),
            "size": pa.array(np.full(c, s, dtype=np.int32)),
            "mean": lists(self.mean().numpy().astype(np.float32), pa.float32()),
            "sum": lists(self._host("sum") / 255.0, pa.float64()),
            "weight": lists(weight3, pa.float64()),
        }, schema=MEAN_SCHEMA)


class ChannelStats(_OnDevice):
    """Per channel over every position of every image: max, mean, positive fraction, inactive.

    `inactive` = the maximum over everything seen is 0 (post-ReLU activations are >= 0).
    Updates from a `Scan`: the per-image max, float64 sum and positive count of one pass.
    """

    _tensors = ("max", "sum", "positive")

    def __init__(self, channels: int):
        self.channels = int(channels)
        self.images = 0
        self.positions = 0                                  # images * H * W
        self.max = torch.full((channels,), -torch.inf, dtype=torch.float32)
        self.sum = torch.zeros(channels, dtype=torch.float64)
        self.positive = torch.zeros(channels, dtype=torch.int64)

    def update(self, acts: "Tensor | Scan") -> "ChannelStats":
        scan = _scan(acts, self.channels)
        n, _, h, w = scan.shape
        if n == 0:
            return self
        self._to(scan.device)
        self.images += n
        self.positions += n * h * w
        self.max = torch.maximum(self.max, scan.image_max.amax(0).float())
        self.sum += scan.image_sum.sum(0)
        self.positive += scan.image_positive.sum(0)
        return self

    def merge(self, other: "ChannelStats") -> "ChannelStats":
        if other.channels != self.channels:
            raise ValueError("cannot merge ChannelStats of different channel counts")
        dev = self.device
        self.images += other.images
        self.positions += other.positions
        self.max = torch.maximum(self.max, other.max.to(dev))
        self.sum += other.sum.to(dev)
        self.positive += other.positive.to(dev)
        return self

    def state(self) -> dict[str, Any]:
        return {"kind": "channels", "channels": self.channels, "images": self.images,
                "positions": self.positions, "max": self._host("max"),
                "sum": self._host("sum"), "positive": self._host("positive")}

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
        mx, sm, pos = self._host("max"), self._host("sum"), self._host("positive")
        return pa.table({
            "model": pa.array([model] * c, pa.string()),
            "layer": pa.array([layer] * c, pa.string()),
            "channel": pa.array(np.arange(c, dtype=np.int32)),
            "images": pa.array(np.full(c, self.images, dtype=np.int64)),
            "max": pa.array(mx),
            "mean": pa.array(sm / denom),
            "positive_fraction": pa.array(pos / denom),
            "inactive": pa.array(mx == 0),
            "positions": pa.array(np.full(c, self.positions, dtype=np.int64)),
            "positive": pa.array(pos),
            "sum": pa.array(sm),
        }, schema=CHANNELS_SCHEMA)
