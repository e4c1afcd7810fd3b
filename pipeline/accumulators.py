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

__all__ = ["TopK", "PositiveMean", "ChannelStats", "Scan", "ImageIndex", "use_compile",
           "COMPILE_ENV", "TOPK_SCHEMA", "MEAN_SCHEMA", "CHANNELS_SCHEMA", "rf_box", "rf_padding"]

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


_RAMPS: dict[int, Tensor] = {}     # length -> float32 L, L-1, ..., 1 (`Scan.first_max`)
# Eager CPU path: the scan reduces rows in blocks of about _SCAN_BYTES (measured on a 32 MiB L3:
# 2-4 MiB best, 1 MiB +10 %, 0.5 MiB +25 %: per-call overhead); the first-maximum search and the
# centre-mean matmul work on blocks of _BLOCK_BYTES.
_SCAN_BYTES = 4 << 20
_BLOCK_BYTES = 2 << 20


class _Positives:
    """Exact positive counts of float32 rows, two cheap passes instead of a float 0/1 buffer:
    numpy's `greater` writes one bool byte per value (torch's bool comparison is ~4x slower on
    CPU, its float32 one writes 4 bytes), and the bytes, read as int64 words, are summed
    `per` <= 127 words at a time: each byte of such a sum is the count of its byte lane (at
    most 127 < 256: no carry into the next byte, and below 2**63: no overflow), so the bytes
    of the (rows, groups) sums, summed once more, are the counts. Rows are padded with False
    to groups * per * 8 bytes."""

    def __init__(self, rows: int, length: int):
        words = -(-length // 8)
        self.groups = -(-words // 127)
        self.per = -(-words // self.groups)
        width = self.groups * self.per * 8
        self.flags = (torch.zeros if width != length else torch.empty)(rows, width,
                                                                         dtype=torch.bool)
        self.view = self.flags.numpy()[:, :length]
        self.part = torch.empty(rows, self.groups, dtype=torch.int64)

    def __call__(self, block: np.ndarray, out: Tensor) -> None:
        k = len(block)
        np.greater(block, 0, out=self.view[:k])
        words = self.flags[:k].view(torch.int64).view(k, self.groups, self.per)
        torch.sum(words, 2, out=self.part[:k])
        torch.sum(self.part[:k].view(torch.uint8), 1, out=out)


def _blocked(f: Tensor, step: int, at: int) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Max, float32 sum, int64 positive count (`_Positives`) and element `at` of the rows of
    `f`, `step` rows at a time, so that every read of a block but the first comes from cache
    (element `at` too: read later from the whole tensor, one per row, it would cost a cache and
    TLB miss each). One block: no element copy (None), the fewest calls."""
    total, length = f.shape
    count = _Positives(min(step, total), length)
    src = f.detach().numpy()
    if total <= step:
        p = torch.empty(total, dtype=torch.int64)
        count(src, p)
        return f.amax(1), f.sum(1), p, None
    m = torch.empty(total, dtype=f.dtype)
    s = torch.empty(total, dtype=torch.float32)
    p = torch.empty(total, dtype=torch.int64)
    e = torch.empty(total, dtype=f.dtype)
    for i, (blk, mo, so, po, eo) in enumerate(zip(f.split(step), m.split(step), s.split(step),
                                                  p.split(step), e.split(step))):
        torch.amax(blk, 1, out=mo)
        torch.sum(blk, 1, out=so)
        eo.copy_(blk.select(1, at))
        count(src[i * step:i * step + len(blk)], po)
    return m, s, p, e

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
        """Per (image, channel): `max`, `sum` and `pos` (positive count), in whatever dtype the
        path yields (eager CPU: float32 sums and counts); the properties convert."""
        if self.compiled and self.n:
            out = _compiled_fused(self.acts)
            if out is not None:
                self._cache.update(max=out[0], sum=out[1], pos=out[2])
                return
        if (self.device.type != "cpu" or not self.acts.is_contiguous()
                or self.acts.dtype != torch.float32):
            m, s, p = _fused(self.acts)
            self._cache.update(max=m, sum=s, pos=p)
            return
        f = self.acts.reshape(self.n * self.c, -1)                      # a view: contiguous
        rows, length = f.shape
        if rows == 1:
            f = f.repeat(2, 1)   # one output row would be split across threads: keep it whole
        if length >= 2 ** 24 or not length:
            m, s, p = f.amax(1), f.sum(1), (f > 0).sum(1)
        else:
            step = max(1, _SCAN_BYTES // (4 * length))
            m, s, p, e = _blocked(f, step, (self.h // 2) * self.w + self.w // 2)
            if e is not None:
                self._cache["center"] = e[:rows].view(self.n, self.c)
        self._cache.update(max=m[:rows].view(self.n, self.c), sum=s[:rows].view(self.n, self.c),
                           pos=p[:rows].view(self.n, self.c))

    def _get(self, name: str) -> Tensor:
        if name not in self._cache:
            self._fill()    # max, sum and count come from the same pass (blocked or fused)
        return self._cache[name]

    @property
    def image_max(self) -> Tensor:
        return self._get("max")

    @property
    def image_sum(self) -> Tensor:
        """(N, C) float64 per-image sums."""
        return self._get("sum").to(torch.float64)

    @property
    def image_positive(self) -> Tensor:
        """(N, C) int64 per-image positive counts."""
        return self._get("pos").to(torch.int64)

    def totals(self) -> tuple[Tensor, Tensor, Tensor]:
        """Per channel over the batch: max, float64 sum of the per-image sums, int64 positive
        count (what `ChannelStats` adds; no (N, C) float64 or int64 copy on the way)."""
        return (self._get("max").amax(0), self._get("sum").sum(0, dtype=torch.float64),
                self._get("pos").sum(0, dtype=torch.int64))

    @property
    def center(self) -> Tensor:
        """(N, C) the centre neuron (H//2, W//2); the blocked scan copies it on its way."""
        if "max" not in self._cache:
            self._fill()
        got = self._cache.get("center")
        return self.acts[:, :, self.h // 2, self.w // 2] if got is None else got

    def first_max(self, n: Tensor, c: Tensor) -> Tensor:
        """Raster position (y*W + x) of the first maximum of images n, channels c (1-D each):
        the smallest y, then x. `argmax` returns that, but its CPU kernel is ~5x slower than
        `amax`; there the rows, copied a cache-sized block at a time, become `row == max` as
        0.0/1.0 times the descending ramp L, L-1, ..., 1, whose maximum L - p is at the first
        maximal position p (exact: L < 2**24; -0.0 equals 0.0 here as in argmax)."""
        flat = self.acts.reshape(self.n * self.c, -1)     # a view when contiguous
        rows = n * self.c + c
        total, length = rows.shape[0], flat.shape[1]
        if self.device.type != "cpu" or flat.dtype != torch.float32 or length >= 2 ** 24:
            return flat.index_select(0, rows).argmax(1)
        ramp = _RAMPS.get(length)
        if ramp is None:
            ramp = _RAMPS[length] = torch.arange(length, 0, -1, dtype=torch.float32)
        top = self.image_max.reshape(-1).index_select(0, rows).unsqueeze(1)
        step = max(1, _BLOCK_BYTES // (4 * length))
        buf = torch.empty(min(step, total), length)
        out = torch.empty(total)
        for i in range(0, total, step):
            b = buf[:min(step, total - i)]
            torch.index_select(flat, 0, rows[i:i + step], out=b)
            torch.eq(b, top[i:i + step], out=b).mul_(ramp)
            torch.amax(b, 1, out=out[i:i + step])
        return length - out.to(torch.int64)

    def first_max_all(self) -> Tensor:
        """(N, C) positions of every image's first maximum (the device path: no host sync)."""
        return self.acts.reshape(self.n, self.c, -1).argmax(2)


def _scan(acts: "Tensor | Scan", channels: int) -> Scan:
    scan = acts if isinstance(acts, Scan) else Scan(acts)
    if scan.acts.dim() != 4 or scan.c != channels:
        raise ValueError(f"activations must be (N, {channels}, H, W), got {tuple(scan.shape)}")
    return scan


class ImageIndex:
    """The image_index of one batch, checked once ((N,) int64 on the host, each in
    [0, 2**32)): pass it to every `TopK.update` of the batch instead of re-checking per call."""

    __slots__ = ("tensor",)

    def __init__(self, indices: "Tensor | np.ndarray | ImageIndex", n: int):
        self.tensor = _as_index(indices, n)


def _as_index(indices: "Tensor | np.ndarray | ImageIndex", n: int) -> Tensor:
    if isinstance(indices, ImageIndex):
        if indices.tensor.numel() != n:
            raise ValueError(f"{indices.tensor.numel()} image indices for {n} images")
        return indices.tensor
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
    order-preserving as int32 o (negatives: magnitude bits flipped), complemented for descending
    order, in the high half; image_index (< 2**32) in the low half: (~o) * 2**32 + idx, written
    as idx - 2**32 - o * 2**32 (the same integer; |o| < 2**31 - 1 for any non-NaN float, so
    nothing overflows). `+ 0.0` makes -0.0 tie with 0.0. `idx` broadcasts against `val`."""
    bits = (val.to(torch.float32) + 0.0).view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return torch.add(idx - MAX_IMAGE_INDEX, ordered.to(torch.int64), alpha=-MAX_IMAGE_INDEX)


class _OnDevice:
    """State tensors that follow the activations' device (moved once, on the first update)."""

    _tensors: tuple[str, ...] = ()           # the state's tensors (public names)
    _stored: tuple[str, ...] = ()            # the attributes holding them, if not the same

    def _to(self, device: torch.device) -> None:
        for name in self._stored or self._tensors:
            t = getattr(self, name)
            if t.device != device:
                setattr(self, name, t.to(device))

    @property
    def device(self) -> torch.device:
        return getattr(self, (self._stored or self._tensors)[0]).device

    def _host(self, name: str) -> np.ndarray:
        return getattr(self, name).detach().cpu().numpy().copy()


class TopK(_OnDevice):
    """The k strongest images per channel, for neuron `any` (each image's best position) or
    `center` (the centre neuron (H//2, W//2)). State: (C, m) tensors, m <= k, sorted best first,
    on the activations' device: activation, image_index, and y, x (kept as one int64
    y * 2**32 + x), plus each entry's order key (`_order_key`, derived: not in the state)."""

    _tensors = ("activation", "image_index", "y", "x")
    _stored = ("activation", "image_index", "_pos", "_key")

    def __init__(self, channels: int, k: int, neuron: str = "any"):
        if neuron not in TOPK_NEURONS:
            raise ValueError(f"unknown neuron {neuron!r}; allowed: {', '.join(TOPK_NEURONS)}")
        if k < 1:
            raise ValueError(f"k must be a positive integer, got {k}")
        self.channels, self.k, self.neuron = int(channels), int(k), neuron
        self.activation = torch.empty(channels, 0, dtype=torch.float32)
        self.image_index = torch.empty(channels, 0, dtype=torch.int64)
        self._pos = torch.empty(channels, 0, dtype=torch.int64)
        self._key = torch.empty(channels, 0, dtype=torch.int64)

    @property
    def y(self) -> Tensor:
        return self._pos // MAX_IMAGE_INDEX

    @property
    def x(self) -> Tensor:
        return self._pos % MAX_IMAGE_INDEX

    def update(self, acts: "Tensor | Scan", indices: "Tensor | np.ndarray | ImageIndex"
               ) -> "TopK":
        scan = _scan(acts, self.channels)
        n, c, w = scan.n, self.channels, scan.w
        idx = _as_index(indices, n)
        if n == 0:
            return self
        if self.activation.device != scan.device:
            self._to(scan.device)
        cpu = scan.device.type == "cpu"
        val = (scan.center if self.neuron == "center" else scan.image_max).T
        if val.dtype != torch.float32:
            val = val.float()
        full = self.activation.shape[1] == self.k
        # A candidate can enter only if its key is not worse than the k-th best key of state
        # and batch together (the state is sorted: when full, its last entry bounds that). On
        # CPU the test is free (no device sync), and in a long run it is false for almost every
        # candidate: no position, no merge. First the cheap necessary condition (activation >=
        # the k-th's; -0.0 >= 0.0 holds, as their keys tie), then the keys.
        if cpu and full and not bool((val >= self.activation[:, -1:]).any()):
            return self
        idx = idx.to(scan.device, non_blocking=True)
        key = _order_key(val, idx)                                       # (C, n)
        need = None
        if cpu:
            if full:
                kth = self._key[:, -1:]
            else:
                both = torch.cat([self._key, key], 1)
                kth = both.kthvalue(min(self.k, both.shape[1]), 1, keepdim=True).values
            need = key <= kth
            if full and not bool(need.any()):
                return self
        self._keep(val, key, self._positions(scan, need))
        return self

    def _positions(self, scan: Scan, need: Tensor | None) -> Tensor:
        """(C, n) y * 2**32 + x of the candidates: the centre, or each image's first maximum,
        computed on CPU only where `need` (the others keep 0 and are never selected: at least k
        candidates are strictly better); on an accelerator for all (no host sync)."""
        c, n, h, w = self.channels, scan.n, scan.h, scan.w
        if self.neuron == "center":
            return torch.full((c, n), (h // 2) * MAX_IMAGE_INDEX + w // 2, dtype=torch.int64,
                              device=scan.device)
        if need is None:
            pos = scan.first_max_all().T
        else:
            cs, ns = need.nonzero(as_tuple=True)
            pos = torch.zeros(c, n, dtype=torch.int64)
            if cs.numel():
                pos[cs, ns] = scan.first_max(ns, cs)
        return pos + (pos // w) * (MAX_IMAGE_INDEX - w)          # y*w + x -> y*2**32 + x

    def _keep(self, val: Tensor, key: Tensor, pos: Tensor) -> None:
        """Merge (C, n) candidates (activation, order key, y * 2**32 + x) into the state: the k
        best of both in the total order. Sorting the keys decides, unless two of the first k+1
        are equal (one image_index offered twice with the same activation): then (y, x) breaks
        the tie, by a stable sort on it before the one on the keys."""
        allkey = torch.cat([self._key, key], 1)
        allpos = torch.cat([self._pos, pos], 1)
        m = min(self.k, allkey.shape[1])
        sk, order = allkey.sort(dim=1, stable=True)
        head = sk[:, :m + 1]
        if bool((head[:, 1:] == head[:, :-1]).any()):
            first = allpos.argsort(dim=1, stable=True)
            order = torch.gather(first, 1, torch.gather(allkey, 1, first).argsort(dim=1, stable=True))
            sk = torch.gather(allkey, 1, order)
        order = order[:, :m]
        self._key = sk[:, :m]
        self.image_index = self._key & (MAX_IMAGE_INDEX - 1)        # the key's low half
        self.activation = torch.gather(torch.cat([self.activation, val], 1), 1, order)
        self._pos = torch.gather(allpos, 1, order)

    def merge(self, other: "TopK") -> "TopK":
        if (other.channels, other.k, other.neuron) != (self.channels, self.k, self.neuron):
            raise ValueError("cannot merge TopK accumulators of different shape or neuron")
        dev = self.device
        self._keep(*(t.to(dev) for t in (other.activation, other._key, other._pos)))
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
        acc._pos = torch.from_numpy(np.array(s["y"], dtype=np.int64) * MAX_IMAGE_INDEX
                                    + np.array(s["x"], dtype=np.int64))
        acc._key = _order_key(acc.activation, acc.image_index)
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
    whose centre activation is > 0: per batch one float32 `addmm_` of the (C, N) 0/1 mask with
    the (N, 3*s*s) in-image part of the centre box into a float32 running sum (see below).
    neuron `all`: every positive position of the channel contributes its RF patch; computed as
    the correlation of the positive mask with the zero-padded input (the weight gradient of a
    stride-`jump` convolution with a `size` kernel), not as a loop over positions. Cost per
    image: 2*C*3*size^2*H*W flops (conv7 of ResNet34: ~4 GFLOP, more than the forward pass).

    Pixels outside the image are excluded through per-pixel weights (how many patches covered
    that pixel with a real image pixel); `mean = sum / weight`, NaN where the weight is 0.
    Images arrive as uint8 (N, 3, H, W) RGB: the analysed crop, not the model input.

    Exactness of the centre sums: the float32 running sum and count hold, per entry, a sum of
    products 0/1 * (integer 0..255) over the images since the last flush; the flush comes before
    more than `_FLUSH_IMAGES` = 65,793 images (255 * 65,793 = 2**24 - 1), so every value the
    matmul forms, in any order and with or without FMA, is an integer in [0, 2**24): exact in
    float32. The flush (also on `count` / `sum` / `weight`, `state()`, `merge()`, `mean()`,
    `to_table()` and a change of box or device) adds those integers into the float64 state,
    where integers below 2**53 add exactly in any order: the same bits for any split.
    """

    # float32 partial sums stay exact while they stay below 2**24 (integers in uint8 units).
    _EXACT_F32 = 2 ** 24
    _FLUSH_IMAGES = (_EXACT_F32 - 1) // 255
    _DEFER_BYTES = 4 << 20       # centre crops waiting for the matmul, per accumulator
    _tensors = ("count", "sum", "weight")
    _stored = ("_count", "_sum", "_weight")

    def __init__(self, channels: int, size: int, jump: int, first: int, neuron: str = "center"):
        if neuron not in MEAN_NEURONS:
            raise ValueError(f"unknown neuron {neuron!r}; allowed: {', '.join(MEAN_NEURONS)}")
        self.channels, self.size, self.jump, self.first = int(channels), int(size), int(jump), int(first)
        self.neuron = neuron
        self.images = 0
        self._count = torch.zeros(channels, dtype=torch.int64)
        self._sum = torch.zeros(channels, 3, size, size, dtype=torch.float64)      # uint8 units
        self._weight = torch.zeros(channels, size, size, dtype=torch.float64)
        # centre: the in-image part of the centre box (rows a:b, columns l:r of the RF square)
        # of the last `_pn` images, copied as they came, and their (C, n) 0/1 masks: the matmul
        # waits for `_crops` to fill (see `flush`)
        self._box: tuple[int, int, int, int] | None = None
        self._crops: Tensor | None = None
        self._masks: Tensor | None = None
        self._pn = 0

    @property
    def count(self) -> Tensor:
        self.flush()
        return self._count

    @property
    def sum(self) -> Tensor:
        self.flush()
        return self._sum

    @property
    def weight(self) -> Tensor:
        self.flush()
        return self._weight

    def flush(self) -> "PositiveMean":
        """Add the waiting centre crops into the float64 state: one float32 matmul of the 0/1
        masks with the crops, a cache-sized block of images at a time (exact: see the class
        docstring), then one float64 addition. Called by everything that reads the state."""
        if not self._pn:
            return self
        n, c = self._pn, self.channels
        a, b, l, r = self._box
        masks = self._masks[:, :n]
        step = max(1, _BLOCK_BYTES // (4 * self._crops.shape[1]))
        out = None
        for i in range(0, n, step):
            crops = self._crops[i:min(i + step, n)].to(torch.float32)
            out = (torch.mm(masks[:, i:i + step], crops) if out is None
                   else out.addmm_(masks[:, i:i + step], crops))
        cnt = masks.sum(1)
        self._count += cnt.to(torch.int64)
        self._sum[:, :, a:b, l:r] += out.view(c, 3, b - a, r - l)
        self._weight[:, a:b, l:r] += cnt.to(torch.float64).view(c, 1, 1)
        self._pn = 0
        return self

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
        if self._count.device != scan.device:
            self.flush()
            self._to(scan.device)
        images = images.to(scan.device, non_blocking=True)
        if self.neuron == "center":
            self._update_center(scan, images)
        else:
            self._update_all(scan, images)
        return self

    def _update_center(self, scan: Scan, images: Tensor) -> None:
        """The centre box is the same for every image: only its in-image part is cut (no padded
        copy of the batch); pixels outside stay 0 in the sum and 0 in the weight. The crops and
        masks wait in `_crops` / `_masks` (`_DEFER_BYTES` of crops) for one matmul in `flush`:
        a running (C, 3*s*s) sum updated per batch would be read and written from memory each
        time, as the other layers' activations push it out of cache in between."""
        n, c, h, w = scan.shape
        s = self.size
        top, left = rf_box(h // 2, w // 2, self.jump, self.first)
        y0, y1 = max(top, 0), min(top + s, images.shape[2])
        x0, x1 = max(left, 0), min(left + s, images.shape[3])
        mask = torch.gt(scan.center.T, 0)                                  # (C, N)
        if y1 <= y0 or x1 <= x0:
            self._count += mask.sum(1)
            return
        box, size = (y0 - top, y1 - top, x0 - left, x1 - left), 3 * (y1 - y0) * (x1 - x0)
        cap = max(1, min(self._DEFER_BYTES // size, self._FLUSH_IMAGES))
        for i in range(0, n, cap):
            m = min(cap, n - i)
            if not self._fits(box, m, images):
                self.flush()
                if not self._fits(box, m, images):      # another box, dtype or device
                    self._box = box
                    self._crops = images.new_empty(cap, size)
                    self._masks = torch.empty(c, cap, device=images.device)
            p = self._pn
            self._crops[p:p + m].view(m, 3, y1 - y0, x1 - x0).copy_(images[i:i + m, :, y0:y1, x0:x1])
            self._masks[:, p:p + m] = mask[:, i:i + m]
            self._pn += m

    def _fits(self, box: tuple[int, int, int, int], m: int, images: Tensor) -> bool:
        """Whether m more crops of `box` from `images` fit into the waiting ones."""
        return (self._crops is not None and box == self._box and self._pn + m <= len(self._crops)
                and self._crops.dtype == images.dtype and self._crops.device == images.device)

    def _update_all(self, scan: Scan, images: Tensor) -> None:
        n, c, h, w = scan.shape
        s = self.size
        pos = scan.acts > 0
        self._count += pos.sum((0, 2, 3))
        pad = self._padded(images, h, w)
        # Chunk the images so that each float32 partial sum (<= 255*chunk*H*W) stays exact.
        chunk = max(1, self._EXACT_F32 // (255 * h * w))
        dtype = torch.float32 if 255 * h * w < self._EXACT_F32 else torch.float64
        for i in range(0, n, chunk):
            g = torch.nn.grad.conv2d_weight(pad[i:i + chunk].to(dtype), (c, 3, s, s),
                                            pos[i:i + chunk].to(dtype), stride=self.jump)
            self._sum += g.to(torch.float64)
        ones = self._padded(torch.ones(1, 1, *images.shape[2:], device=scan.device), h, w)
        per_pos = pos.sum(0, keepdim=True).to(torch.float64)        # (1, C, H, W) counts
        wg = torch.nn.grad.conv2d_weight(ones.to(torch.float64), (c, 1, s, s), per_pos,
                                         stride=self.jump)
        self._weight += wg[:, 0]

    def merge(self, other: "PositiveMean") -> "PositiveMean":
        if (other.channels, other.size, other.neuron) != (self.channels, self.size, self.neuron):
            raise ValueError("cannot merge PositiveMean accumulators of different shape or neuron")
        self.flush()
        dev = self.device
        self.images += other.images
        self._count += other.count.to(dev)
        self._sum += other.sum.to(dev)
        self._weight += other.weight.to(dev)
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
        acc._count = torch.from_numpy(np.array(s["count"], dtype=np.int64))
        acc._sum = torch.from_numpy(np.array(s["sum"], dtype=np.float64))
        acc._weight = torch.from_numpy(np.array(s["weight"], dtype=np.float64))
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
        if self.max.device != scan.device:
            self._to(scan.device)
        self.images += n
        self.positions += n * h * w
        mx, sm, pos = scan.totals()
        self.max = torch.maximum(self.max, mx.float())
        self.sum += sm
        self.positive += pos
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
