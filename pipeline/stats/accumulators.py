"""Mergeable per-channel accumulators: top-k stimuli, positive-mean stimuli, channel statistics.

Each accumulator follows one shape:

    acc = TopK(channels=64, k=16, neuron="any")
    acc.update(acts, indices)          # acts (N, C, H, W) of one layer, indices (N,) image_index
    acc.merge(other)                   # associative and commutative: any split merged == one pass
    acc.state(); TopK.from_state(s)    # plain arrays and JSON scalars (pipeline.results.state)
    acc.to_table(model=..., layer=...) # rows of its table (pipeline.results.catalog)

and the collection's surface (`pipeline.stats.collection.Accumulator`: `kind`, `table`, `build`,
`add`, `rows`), through which `pipeline.stats.analysis` runs them with any other accumulator.

Speed: one read of the activations. `Scan(acts)` reduces a batch of one layer once to small
(N, C) per-image figures (maximum, sum, positive count, centre value); every accumulator of
that layer updates from the same `Scan` (pass it instead of `acts`; a plain tensor is wrapped).
On CPU the scan runs over cache-sized blocks of rows: the first pass (amax) reads memory, the
float32 sum, the centre copy and the positive count (`_Positives`: one bool byte per value and
integer sums of those bytes) read the block from cache. The first-maximum position is computed
only for the images that can enter a top-k (numpy's argmax: ~10x torch's on CPU); the CPU
top-k merge itself runs in numpy (a handful of small arrays per batch, where a torch call's
dispatch costs more than its work). The centre mean's crops wait, `_DEFER_BYTES` of them, for
one matmul (`PositiveMean.flush`, called by everything that reads the state). Accumulator
state lives on the activations' device (moved there on the first update) and crosses to the
host only in `state()` / `to_table()`: no per-batch device-to-host copy, and top-k merges on
the device. `Scan(acts, compiled=True)` (or `PREFERRED_STIMULI_COMPILE=1`, see `use_compile`)
fuses the max, sum and count into one torch.compile'd kernel; `compile_by_default` is the
job's rule (a CPU worker past its break-even). Timings: docs/analysis.md.

Exactness (results are the same for any split of the data and any merge order):
- `TopK` keeps, per channel, the k best under (activation desc, image_index asc, y asc, x asc):
  an int64 key (order-preserving bits of the activation, then image_index), ties of the key
  (one image_index offered twice with the same activation) broken by (y, x) (a lexsort on CPU;
  stable sorts on (y, x), then the key, elsewhere). The order is total and each image offers
  one candidate per channel, so the result is the same bits for any split. Of a batch larger
  than k only each channel's k best keys go on to the merge (the others have k better ones in
  the batch alone); that preselection runs only when the batch's image indices are distinct,
  so that those keys are distinct and the k best unique. Per image, `any` takes the first
  maximum in raster order (smallest y, then x), exactly as `torch.max` did.
- `PositiveMean` sums the RF patches in uint8 units (0..255). Centre: a float32 matmul of the
  0/1 masks with the waiting crops, over at most `_FLUSH_IMAGES` = 65,793 images (255 * 65,793
  = 2**24 - 1), so every partial sum, in any order, with or without FMA, is an integer below
  2**24: exact; `all`: float32 correlations of chunks small enough for the same bound. The
  float64 state holds integers below 2**53: exact and order-independent. When the matmul runs
  (which batches it groups) changes nothing.
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
import threading
import warnings
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.models.geometry import RF
from pipeline.results import catalog
from pipeline.stats.collection import Accumulator, Batch, LayerSpec

__all__ = ["TopK", "update_topk", "PositiveMean", "ChannelStats", "Scan", "ImageIndex", "use_compile",
           "compile_by_default", "COMPILE_BREAK_EVEN_PIXELS",
           "COMPILE_ENV", "TOPK_SCHEMA", "MEAN_SCHEMA", "CHANNELS_SCHEMA"]

TOPK_NEURONS = ("any", "center")
MEAN_NEURONS = ("center", "all")
COMPILE_ENV = "PREFERRED_STIMULI_COMPILE"
MAX_IMAGE_INDEX = 2 ** 32          # image_index must lie in [0, 2**32): it fills the low key half
# topk.parquet without the geometry and patch columns, which come later (`TopK.rows`, the job).
TOPK_SCHEMA = catalog.TOPK.without("top", "left", "size", "patch")
MEAN_SCHEMA = catalog.MEAN.schema
CHANNELS_SCHEMA = catalog.CHANNELS.schema


def use_compile() -> bool:
    """Whether `Scan` fuses its reductions with torch.compile when not told: environment variable
    PREFERRED_STIMULI_COMPILE = 1 (on) or 0 / unset (off), read at call time. Off by default:
    compiling costs 10-25 s per process (too much for tests and short runs), and on CPU it takes
    a full-size ResNet34 batch from ~1.85x to ~1.4x one `amax` read (see docs/analysis.md)."""
    v = os.environ.get(COMPILE_ENV, "0").strip().lower()
    if v in ("1", "true", "on", "yes"):
        return True
    if v in ("", "0", "false", "off", "no"):
        return False
    raise ValueError(f"{COMPILE_ENV}={v!r}; allowed: 0, 1")


# A CPU worker's break-even for torch.compile'd scans, in image pixels: compiling costs 4 s (warm
# cache) to 13 s (cold) per process and saves ~65 us per 224-px image at one thread (the saving
# grows with the activations, i.e. with the crop's pixels), so the cold case pays off after
# ~200,000 images of 224 px (docs/analysis.md, "the accumulators").
COMPILE_BREAK_EVEN_PIXELS = 200_000 * 224 * 224


def compile_by_default(images_per_worker: int, crop: int, device: str) -> bool:
    """Whether a worker's scans are compiled: PREFERRED_STIMULI_COMPILE when it is set (0 or
    1), else on for a CPU worker that analyses at least its break-even of image pixels
    (COMPILE_BREAK_EVEN_PIXELS: 200,000 images at 224 px), never elsewhere (no GPU figure of
    compile time and saving exists yet)."""
    if os.environ.get(COMPILE_ENV, "").strip():
        return use_compile()
    return device == "cpu" and images_per_worker * crop * crop >= COMPILE_BREAK_EVEN_PIXELS


def _fused(acts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per (image, channel): maximum, float64 sum, positive count; one read when compiled.
    (Accelerators and the compiled path add in float64 whatever order their kernels pick.)"""
    return (acts.amax((2, 3)), acts.sum((2, 3), dtype=torch.float64),
            (acts > 0).sum((2, 3), dtype=torch.int64))


def _fused_flat(acts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Max, float32 sum and int32 positive count of each (N, C, H*W) row: the form
    torch.compile vectorises into one loop. Each row in float32, as the eager CPU scan (the
    reasons: `Scan`; in its own order, so the bits differ); a float64 accumulation made the
    compiled kernel ~2x slower (a conversion per element)."""
    f = acts.flatten(2)
    return f.amax(2), f.sum(2), (f > 0).sum(2, dtype=torch.int32)


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


_SCRATCH = threading.local()


def _take(nbytes: int, device: torch.device) -> Tensor:
    """A byte buffer; on CPU from this thread's free list when one of that size was given back
    (`_give`): its pages are already mapped, a new buffer faults on each 4 KiB written."""
    free = _SCRATCH.__dict__.setdefault("free", {}).get(nbytes) if device.type == "cpu" else None
    return free.pop() if free else torch.empty(nbytes, dtype=torch.uint8, device=device)


def _give(buf: Tensor) -> None:
    """Return a `_take` buffer for reuse (CPU; at most 8 of a size are kept per thread)."""
    if buf.device.type == "cpu":
        free = _SCRATCH.__dict__.setdefault("free", {}).setdefault(buf.numel(), [])
        if len(free) < 8:
            free.append(buf)


def _scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A CPU work buffer of `shape`, reused per thread and name (a fresh large buffer costs a
    page fault per 4 KiB written, as much as the work in it); contents are left over, zeros at
    first (never stray bits: a matmul may load past its operand's end, and a denormal there
    is slow)."""
    numel = int(np.prod(shape))
    t = getattr(_SCRATCH, name, None)
    if t is None or t.numel() < numel or t.dtype != dtype:
        t = torch.zeros(numel, dtype=dtype)
        setattr(_SCRATCH, name, t)
    return t[:numel].view(shape)


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
    to groups * per * 8 bytes. One per thread and block shape, reused (`_blocked`).

    The sums run on the calling thread, in slices below torch's parallel grain (`_SERIAL`
    elements): the flags sit in this core's cache, and a second thread reading half of them from
    another core's cache made the count ~2.5x slower (102 vs 43 us for 1024 rows of 256 at 2
    threads; the intra-op threads win nothing on so little work)."""

    _SERIAL = 16384          # elements per torch.sum: below at::internal::GRAIN_SIZE (32768)

    def __init__(self, rows: int, length: int):
        words = -(-length // 8)
        self.groups = -(-words // 127)
        self.per = -(-words // self.groups)
        self.flags = torch.zeros(rows, self.groups * self.per * 8, dtype=torch.bool)
        self.view = self.flags.numpy()[:, :length]
        self.part = torch.empty(rows, self.groups, dtype=torch.int64)

    def __call__(self, block: np.ndarray, out: Tensor) -> None:
        k = len(block)
        np.greater(block, 0, out=self.view[:k])
        words = self.flags[:k].view(torch.int64).view(k, self.groups, self.per)
        part = self.part[:k]
        lanes = part.view(torch.uint8).view(k, self.groups * 8)
        if torch.get_num_threads() == 1:    # nothing to keep on this core: one call each
            torch.sum(words, 2, out=part)
            torch.sum(lanes, 1, out=out[:k])
            return
        step = max(1, self._SERIAL // (self.groups * self.per))
        for i in range(0, k, step):
            torch.sum(words[i:i + step], 2, out=part[i:i + step])
        step = max(1, self._SERIAL // (self.groups * 8))
        for i in range(0, k, step):
            torch.sum(lanes[i:i + step], 1, out=out[i:i + step])


def _blocked(f: Tensor, step: int, at: int, positions: bool = False
             ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, np.ndarray | None]:
    """Max, float32 sum, int64 positive count (`_Positives`), element `at` and (`positions`)
    numpy's first-maximum index of the rows of `f`, `step` rows at a time, so that every read
    of a block but the first comes from cache (element `at` too: read later from the whole
    tensor, one per row, it would cost a cache and TLB miss each). One block: no element copy
    (None), the fewest calls."""
    total, length = f.shape
    rows = min(step, total)
    cache = _SCRATCH.__dict__.setdefault("positives", {})
    count = cache.get((rows, length))
    if count is None:
        if len(cache) >= 16:       # a few layer shapes per run; at most ~1 MiB each
            cache.clear()
        count = cache[rows, length] = _Positives(rows, length)
    src = f.detach().numpy()
    arg = np.empty(total, np.int64) if positions else None
    if total <= step:
        m, s, p = f.amax(1), f.sum(1), torch.empty(total, dtype=torch.int64)
        count(src, p)
        if arg is not None:
            np.argmax(src, 1, out=arg)
        return m, s, p, None, arg
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
        if arg is not None:
            np.argmax(src[i * step:i * step + len(blk)], 1, out=arg[i * step:i * step + len(blk)])
    return m, s, p, e, arg


class Scan:
    """One layer's batch reduced once to small per-(image, channel) figures, shared by every
    accumulator of the layer. Figures are computed on first use and cached:

    image_max (N, C) float32, image_sum (N, C) float64, image_positive (N, C) int64,
    center (N, C) the centre neuron (H//2, W//2), `totals()` their per-channel sums, and
    `first_max(rows)` the raster position of an image's first maximum (computed only for the
    few images that can enter a top-k).

    `compiled`: fuse max, sum and count into one torch.compile'd kernel (None: `use_compile()`).
    `positions`: also every row's first maximum, in the same pass (eager CPU).
    Eager CPU (`_blocked`): one pass over cache-sized blocks of (image, channel) rows, each block
    read from memory once (amax) and then, while it sits in cache, summed in float32, its
    centre column copied, and its positive values counted (`_Positives`, exact integers).
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
        # Set before the scan runs (`update_topk` does, while a top-k is not yet full): the
        # eager CPU pass then also finds every row's first maximum from cache, cheaper than
        # gathering the rows of many entering candidates from memory afterwards.
        self.positions = False
        self._argmax: np.ndarray | None = None

    @property
    def shape(self) -> torch.Size:
        return self.acts.shape

    def _fill(self) -> None:
        """Per (image, channel): `max`, `sum` and `pos` (positive count), in whatever dtype the
        path yields (eager CPU: float32 sums, int64 counts); the properties convert."""
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
            m, s, p, e, arg = _blocked(f, step, (self.h // 2) * self.w + self.w // 2,
                                       self.positions)
            if e is not None:
                self._cache["center"] = e[:rows].view(self.n, self.c)
            if arg is not None:
                self._argmax = arg[:rows]
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
        """(N, C) the centre neuron (H//2, W//2); the blocked scan copies it on its way, else
        it is gathered once here (the centre top-k and the centre mean both read it)."""
        if "max" not in self._cache:
            self._fill()
        got = self._cache.get("center")
        if got is None:
            got = self._cache["center"] = self.acts[:, :, self.h // 2, self.w // 2].contiguous()
        return got

    def first_max(self, rows: np.ndarray) -> np.ndarray:
        """Raster positions (y*W + x) of the first maximum of rows `rows` (image * C + channel)
        of the activations on the host: the smallest y, then x (numpy's `argmax` returns the
        first maximal index, -0.0 equal to 0.0, like torch's, and is ~10x faster on CPU).
        Rows are gathered a cache-sized block at a time."""
        if self._argmax is not None:          # computed by the scan (`positions`)
            return self._argmax[rows]
        flat = self.acts.detach().reshape(self.n * self.c, -1)
        if flat.dtype not in (torch.float32, torch.float64, torch.float16):
            return flat[torch.from_numpy(rows)].argmax(1).numpy()
        src = flat.numpy()
        total, length = len(rows), src.shape[1]
        step = max(1, _BLOCK_BYTES // (src.itemsize * max(length, 1)))
        if total <= step:
            return src[rows].argmax(1)
        buf = _scratch("rows", (step, length), flat.dtype).numpy()
        out = np.empty(total, np.int64)
        for i in range(0, total, step):
            part = rows[i:i + step]
            # mode="clip" (the rows are valid): with "raise" numpy buffers `out`, ~3x slower
            out[i:i + len(part)] = np.take(src, part, axis=0, out=buf[:len(part)],
                                           mode="clip").argmax(1)
        return out

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
    [0, 2**32)): pass it to every `TopK.update` of the batch instead of re-checking per call.
    `distinct`: no index twice (computed on first use)."""

    __slots__ = ("tensor", "_distinct", "_low", "_dev")

    def __init__(self, indices: "Tensor | np.ndarray | ImageIndex", n: int):
        self.tensor = _as_index(indices, n)
        self._distinct: bool | None = None
        self._low: np.ndarray | None = None
        self._dev: Tensor | None = None

    def on(self, device: torch.device) -> Tensor:
        """The indices on `device`, copied there once per batch (not once per accumulator),
        from pinned memory: a copy from pageable memory would wait for the device."""
        if device.type == "cpu":
            return self.tensor
        if self._dev is None or self._dev.device != device:
            self._dev = self.tensor.pin_memory().to(device, non_blocking=True)
        return self._dev

    @property
    def low(self) -> np.ndarray:
        """image_index - 2**32 (numpy): the low half of `_order_key`, and its offset."""
        if self._low is None:
            self._low = self.tensor.numpy() - MAX_IMAGE_INDEX
        return self._low

    @property
    def distinct(self) -> bool:
        if self._distinct is None:        # numpy: torch's sort and diff took ~100 us here
            t = np.sort(self.tensor.numpy())
            self._distinct = bool((t[1:] != t[:-1]).all())
        return self._distinct


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


def _order_key_np(val: np.ndarray, low: np.ndarray) -> np.ndarray:
    """`_order_key` in numpy (the CPU path), `low` = image_index - 2**32."""
    bits = (val + np.float32(0.0)).view(np.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return low - ordered.astype(np.int64) * MAX_IMAGE_INDEX


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


class TopK(_OnDevice, Accumulator):
    """The k strongest images per channel, for neuron `any` (each image's best position) or
    `center` (the centre neuron (H//2, W//2)). State: (C, m) tensors, m <= k, sorted best first,
    on the activations' device: activation, image_index, and y, x (kept as one int64
    y * 2**32 + x), plus each entry's order key (`_order_key`, derived: not in the state)."""

    kind = "topk"
    table = catalog.TOPK
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
        update_topk([(self, _scan(acts, self.channels))], indices)
        return self

    def _values(self, scan: Scan) -> Tensor:
        """(C, N) float32 candidates of the batch: the centre value or each image's maximum."""
        val = (scan.center if self.neuron == "center" else scan.image_max).detach().T
        return val if val.dtype == torch.float32 else val.float()

    def _set(self, act: np.ndarray, key: np.ndarray, pos: np.ndarray) -> None:
        self._key = torch.from_numpy(key)
        self.image_index = torch.from_numpy(key & (MAX_IMAGE_INDEX - 1))   # the low half
        self.activation = torch.from_numpy(act)
        self._pos = torch.from_numpy(pos)

    def _update_device(self, scan: Scan, ix: ImageIndex, val: Tensor) -> None:
        """An accelerator: the same in torch, without the host-synchronising early exits; the
        first maxima of every image in one argmax pass."""
        key = _order_key(val, ix.on(scan.device))                               # (C, N)
        pos = None
        if self.neuron == "any":
            pos = scan.first_max_all().T
            pos = pos + (pos // scan.w) * (MAX_IMAGE_INDEX - scan.w)
        if scan.n > self.k and ix.distinct:
            key, cols = key.topk(self.k, dim=1, largest=False, sorted=False)
            val = torch.gather(val, 1, cols)
            pos = None if pos is None else torch.gather(pos, 1, cols)
        if pos is None:
            pos = torch.full(val.shape, (scan.h // 2) * MAX_IMAGE_INDEX + scan.w // 2,
                             dtype=torch.int64, device=scan.device)
        self._keep_device(val, key, pos)

    def _keep_device(self, val: Tensor, key: Tensor, pos: Tensor) -> None:
        """`_keep` in torch: a stable sort on (y, x), then a stable one on the keys."""
        allkey = torch.cat([self._key, key], 1)
        allpos = torch.cat([self._pos, pos], 1)
        first = allpos.argsort(dim=1, stable=True)
        then = torch.gather(allkey, 1, first).argsort(dim=1, stable=True)
        order = torch.gather(first, 1, then)[:, :self.k]
        self._key = torch.gather(allkey, 1, order)
        self.image_index = self._key & (MAX_IMAGE_INDEX - 1)
        self.activation = torch.gather(torch.cat([self.activation, val], 1), 1, order)
        self._pos = torch.gather(allpos, 1, order)

    def merge(self, other: "TopK") -> "TopK":
        if (other.channels, other.k, other.neuron) != (self.channels, self.k, self.neuron):
            raise ValueError("cannot merge TopK accumulators of different shape or neuron")
        dev = self.device
        if dev.type == "cpu":
            self._set(*_keep(*(t.numpy() for t in (self.activation, self._key, self._pos)),
                             *(t.cpu().numpy() for t in (other.activation, other._key, other._pos)),
                             self.k))
        else:
            self._keep_device(*(t.to(dev) for t in (other.activation, other._key, other._pos)))
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

    # --- the collection's surface (pipeline.stats.collection.Accumulator)
    @classmethod
    def build(cls, layer: LayerSpec, k: int = 16, neuron: str = "any") -> "TopK":
        return cls(layer.channels, k, neuron)

    def add(self, batch: Batch, layer: LayerSpec) -> None:
        update_topk([(self, batch.scans[layer.name])], batch.index)

    @classmethod
    def add_all(cls, items: "list[tuple[TopK, LayerSpec]]", batch: Batch) -> None:
        """Every TopK of the batch (all layers and neurons) in one stacked update."""
        update_topk([(acc, batch.scans[layer.name]) for acc, layer in items], batch.index)

    def rows(self, model: str, layer: LayerSpec) -> pa.Table:
        """`to_table` plus each row's RF box (top, left, size): topk.parquet without `patch`."""
        t = self.to_table(model, layer.name)
        top, left = layer.rf.boxes(torch.tensor(t["y"].to_numpy()),     # Arrow's buffers
                                   torch.tensor(t["x"].to_numpy()))     # are read-only
        t = t.append_column("top", pa.array(top.numpy().astype(np.int32)))
        t = t.append_column("left", pa.array(left.numpy().astype(np.int32)))
        return t.append_column("size", pa.array(np.full(t.num_rows, layer.size, np.int32)))


def update_topk(pairs: "list[tuple[TopK, Scan]]",
                indices: "Tensor | np.ndarray | ImageIndex") -> None:
    """Update several `TopK` from one batch, each from its layer's `Scan` (a layer's `any` and
    `center`, every analysed layer's). On CPU the accumulators of the same k and fill are
    updated together: their (C, N) candidates stacked into one array, so that the ~25 numpy
    calls a batch needs (each ~1-5 us, as much as its work at batch 64) run once, not once per
    accumulator. Rows never mix (every step works per row), so each accumulator gets exactly
    what its own update would give. Elsewhere each updates on its device."""
    if not pairs:
        return
    n = pairs[0][1].n
    ix = indices if isinstance(indices, ImageIndex) else ImageIndex(indices, n)
    groups: dict[tuple[int, int], list[tuple[TopK, Scan]]] = {}
    for acc, scan in pairs:
        _as_index(ix, _scan(scan, acc.channels).n)
        if scan.n == 0:
            continue
        if acc.activation.device != scan.device:
            acc._to(scan.device)
        if scan.device.type == "cpu":
            if acc.neuron == "any" and acc.activation.shape[1] < acc.k and not scan._cache:
                scan.positions = True    # a fresh top-k: most of the batch may enter
            groups.setdefault((acc.k, acc.activation.shape[1]), []).append((acc, scan))
        else:
            acc._update_device(scan, ix, acc._values(scan))
    for group in groups.values():
        _update_host(group, ix)


def _stacked(arrays: list[np.ndarray]) -> np.ndarray:
    return np.ascontiguousarray(arrays[0]) if len(arrays) == 1 else np.concatenate(arrays)


def _update_host(group: "list[tuple[TopK, Scan]]", ix: ImageIndex) -> None:
    """CPU update of TopKs of one k and fill, rows stacked (`update_topk`), in numpy (a torch
    call costs ~3 us of dispatch, a numpy one ~1 us). A candidate can enter only if its key is
    not worse than the k-th best key of its row's state (sorted: its last entry, when full); in
    a long run that is false for almost every candidate: no position, no merge. First the cheap
    necessary condition (activation >= the k-th's; -0.0 >= 0.0 holds, as their keys tie), then
    the keys."""
    k = group[0][0].k
    val = _stacked([acc._values(scan).numpy() for acc, scan in group])          # (R, N)
    act = _stacked([acc.activation.numpy() for acc, _ in group])
    full = act.shape[1] == k
    if full and not (val >= act[:, -1:]).any():
        return
    key = _order_key_np(val, ix.low)
    state_key = _stacked([acc._key.numpy() for acc, _ in group])
    if full and not (key <= state_key[:, -1:]).any():
        return
    rows, n = key.shape
    if n > k and ix.distinct:
        # Only a row's k best candidates of the batch can enter (any other has k better ones in
        # the batch alone); distinct image indices make their keys distinct.
        cols = np.argpartition(key, k - 1, axis=1)[:, :k]
        flat = cols + (np.arange(rows) * n)[:, None]
        key, val = key.reshape(-1)[flat], val.reshape(-1)[flat]
    else:
        cols = np.broadcast_to(np.arange(n), key.shape)
    # A candidate worse than its row's k-th key is beaten by k entries and never kept: its
    # position (a tie-break among equal keys only) is never read, so it is not searched for.
    enter = key <= state_key[:, -1:] if full else np.ones(key.shape, bool)
    pos, r = np.zeros(key.shape, np.int64), 0
    for acc, scan in group:
        c, e = acc.channels, enter[r:r + acc.channels]
        if acc.neuron == "center":
            pos[r:r + c] = (scan.h // 2) * MAX_IMAGE_INDEX + scan.w // 2
        elif e.any():
            p = scan.first_max((cols[r:r + c] * c + np.arange(c)[:, None])[e])
            pos[r:r + c][e] = p + (p // scan.w) * (MAX_IMAGE_INDEX - scan.w)
        r += c                                                      # y*w + x -> y*2**32 + x
    act, key, pos = _keep(act, state_key, _stacked([acc._pos.numpy() for acc, _ in group]),
                          val, key, pos, k)
    r = 0
    for acc, _ in group:
        acc._set(act[r:r + acc.channels], key[r:r + acc.channels], pos[r:r + acc.channels])
        r += acc.channels


def _keep(act: np.ndarray, key: np.ndarray, pos: np.ndarray, new_act: np.ndarray,
          new_key: np.ndarray, new_pos: np.ndarray, k: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge (R, m) candidates (activation, order key, y * 2**32 + x) into (R, m') state rows:
    the k best of both in the total order, (key, then y, x) by one `lexsort` per row; (y, x)
    only matters for one image_index offered twice with the same activation."""
    allkey = np.concatenate([key, new_key], 1)
    allpos = np.concatenate([pos, new_pos], 1)
    order = np.lexsort((allpos, allkey), axis=-1)[:, :k]
    flat = order + (np.arange(len(allkey)) * allkey.shape[1])[:, None]
    return (np.concatenate([act, new_act], 1).reshape(-1)[flat], allkey.reshape(-1)[flat],
            allpos.reshape(-1)[flat])


_INT_MM: list[bool] = []          # whether torch's int8 matrix product runs on this CPU


def _int8_sums_apply(images: Tensor) -> bool:
    """Whether the centre mean's crops of `images` are summed by `_int8_sums`: uint8 images on
    the CPU, where torch's int8 matrix product runs (probed once per process: a private API
    that an older or differently built torch may lack; the float32 path serves then)."""
    if images.device.type != "cpu" or images.dtype != torch.uint8:
        return False
    if not _INT_MM:
        try:
            one = torch.ones(1, 1, dtype=torch.int8)
            _INT_MM.append(int(torch._int_mm(one, one)[0, 0]) == 1)
        except Exception:  # noqa: BLE001 - missing or not built for this CPU: float32 path
            _INT_MM.append(False)
    return _INT_MM[0]


def _int8_sums(masks: Tensor, crops: Tensor, counts: Tensor) -> Tensor:
    """(C, size) float64 sums of uint8 `crops` (n, size) under int8 0/1 `masks` (C, n),
    exactly, by int8 products with int32 sums (`torch._int_mm`, oneDNN). Each crop value
    x = 16 h + l is split into nibbles (0..15), one product each: whatever kernel oneDNN picks,
    even one that adds pairs of products in saturating 16 bits (CPUs without VNNI, after
    shifting an operand by 128), a pair stays below 2 * 143 * 15 < 2**15, so every sum is exact
    (one product of x - 128 would be ~3x faster still, but a pair could reach 2 * 129 * 128 and
    saturate there); |int32 sum| <= n * 255. 1.7-2.7x faster than the float32 matmul with its
    conversion of the crops, on this project's build machine. The crops are spent (shifted in
    place). `counts` is unused (the float path's signature)."""
    low = _scratch("low", crops.shape, torch.uint8)
    torch.bitwise_and(crops, 15, out=low)
    high = crops.bitwise_right_shift_(4)
    sums = torch._int_mm(masks, high.view(torch.int8)).mul_(16)
    sums.add_(torch._int_mm(masks, low.view(torch.int8)))
    return _scratch("sums", sums.shape, torch.float64).copy_(sums)


class PositiveMean(_OnDevice, Accumulator):
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
    _DEFER_BYTES = 4 << 20       # centre crops waiting for the matmul, per accumulator,
    _DEFER_IMAGES = 1024         # and at most this many images (and _FLUSH_IMAGES)
    kind = "mean"
    table = catalog.MEAN
    _tensors = ("count", "sum", "weight")
    _stored = ("_count", "_sum", "_weight")

    def __init__(self, channels: int, size: int, jump: int, first: int, neuron: str = "center"):
        if neuron not in MEAN_NEURONS:
            raise ValueError(f"unknown neuron {neuron!r}; allowed: {', '.join(MEAN_NEURONS)}")
        self.channels, self.size, self.jump, self.first = int(channels), int(size), int(jump), int(first)
        self.rf = RF.square_grid(self.size, self.jump, self.first)   # its boxes: geometry's
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
        self._bufs: tuple[Tensor, Tensor] = ()          # their `_take` buffers
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
        """Add the waiting centre crops into the float64 state: one matrix product of the 0/1
        masks with the crops (on the CPU in int8 with int32 sums, `_int8_sums`; elsewhere in
        float32, `_float_sums`: exact either way, see the class docstring), then one float64
        addition. Called by everything that reads the state."""
        if not self._pn:
            return self
        n, c = self._pn, self.channels
        a, b, l, r = self._box
        masks = self._masks[:, :n]
        cnt = masks.sum(1, dtype=torch.int64)
        if masks.dtype == torch.int8:
            out = _int8_sums(masks, self._crops[:n], cnt)
        else:
            out = self._float_sums(masks)
        self._count += cnt
        self._sum[:, :, a:b, l:r] += out.view(c, 3, b - a, r - l)
        self._weight[:, a:b, l:r] += cnt.to(torch.float64).view(c, 1, 1)
        self._pn = 0
        for buf in self._bufs:
            _give(buf)
        self._crops = self._masks = None
        self._bufs = ()
        return self

    def _float_sums(self, masks: Tensor) -> Tensor:
        """(C, size) sums of the waiting crops under the 0/1 masks: float32 matmuls a
        cache-sized block of images at a time (exact: see the class docstring), in float64."""
        c, n = masks.shape
        size = self._crops.shape[1]
        step = max(1, _BLOCK_BYTES // (4 * size))
        cpu = self._crops.device.type == "cpu"
        buf = _scratch("crops", (min(step, n), size), torch.float32) if cpu else None
        out = _scratch("out", (c, size), torch.float32) if cpu else masks.new_empty(c, size)
        for i in range(0, n, step):
            part = self._crops[i:min(i + step, n)]
            crops = buf[:len(part)].copy_(part) if cpu else part.to(torch.float32)
            out.addmm_(masks[:, i:i + step], crops, beta=1 if i else 0)
        # the float64 copy in a reused buffer on the CPU (a new one faults on every page)
        return _scratch("sums", out.shape, torch.float64).copy_(out) if cpu else out.double()

    def _padded(self, images: Tensor, h: int, w: int) -> Tensor:
        """Images padded (zeros) or cropped so that neuron (y, x)'s RF starts at (j*y, j*x)."""
        top, bottom = self.rf.padding(images.shape[2], h)
        left, right = self.rf.padding(images.shape[3], w)
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
        top, left, _ = self.rf.box(h // 2, w // 2)
        y0, y1 = max(top, 0), min(top + s, images.shape[2])
        x0, x1 = max(left, 0), min(left + s, images.shape[3])
        mask = torch.gt(scan.center.T, 0)                                  # (C, N)
        if y1 <= y0 or x1 <= x0:
            self._count += mask.sum(1)
            return
        box, size = (y0 - top, y1 - top, x0 - left, x1 - left), 3 * (y1 - y0) * (x1 - x0)
        cap = max(1, min(self._DEFER_BYTES // size, self._DEFER_IMAGES, self._FLUSH_IMAGES))
        for i in range(0, n, cap):
            m = min(cap, n - i)
            if not self._fits(box, m, images):
                self.flush()
                self._box = box
                self._bufs = (_take(cap * size * images.element_size(), images.device),
                              _take(c * cap * 4, images.device))
                self._crops = self._bufs[0].view(images.dtype).view(cap, size)
                # zeroed: the matmul may load (and mask off) floats past a block's last column,
                # and a leftover denormal or NaN there made it ~3x slower (microcode assists)
                kind = torch.int8 if _int8_sums_apply(images) else torch.float32
                self._masks = self._bufs[1].view(kind)[:c * cap].view(c, cap).zero_()
            p = self._pn
            self._crops[p:p + m].view(m, 3, y1 - y0, x1 - x0).copy_(
                images[i:i + m, :, y0:y1, x0:x1])
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
        self._count += scan.image_positive.sum(0)       # the scan's exact counts, no second pass
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
        sm = self.sum.detach().cpu().numpy().reshape(c, n)
        wt = self.weight.detach().cpu().numpy().reshape(c, 1, s * s)
        # the columns in numpy, a channel at a time: the same float64 operations as `mean()`
        # (sum / 255, then / weight, then to float32), without (C, 3, s, s) temporaries of
        # each step (an RF of 255 px over 256 channels is 400 MB per float64 array)
        scaled = np.empty((c, n), np.float64)
        weight3 = np.empty((c, n), np.float64)
        mean = np.empty((c, n), np.float32)
        for k in range(c):
            np.divide(sm[k], 255.0, out=scaled[k])
            w = weight3[k].reshape(3, s * s)
            w[:] = wt[k]
            m = scaled[k] / np.maximum(weight3[k], 1.0)
            m[weight3[k] <= 0] = np.nan
            mean[k] = m

        def lists(a: np.ndarray) -> pa.Array:     # zero-copy: the arrays are Arrow's values
            values = pa.Array.from_buffers(pa.from_numpy_dtype(a.dtype), a.size,
                                           [None, pa.py_buffer(a)])
            return pa.ListArray.from_arrays(pa.array(np.arange(0, c * n + 1, n, dtype=np.int32)),
                                            values)

        return pa.table({
            "model": pa.array([model] * c, pa.string()),
            "layer": pa.array([layer] * c, pa.string()),
            "channel": pa.array(np.arange(c, dtype=np.int32)),
            "neuron": pa.array([self.neuron] * c, pa.string()),
            "count": pa.array(self._host("count")),
            "images": pa.array(np.full(c, self.images, dtype=np.int64)),
            "size": pa.array(np.full(c, s, dtype=np.int32)),
            "mean": lists(mean),
            "sum": lists(scaled),
            "weight": lists(weight3),
        }, schema=MEAN_SCHEMA)

    # --- the collection's surface (pipeline.stats.collection.Accumulator)
    @classmethod
    def build(cls, layer: LayerSpec, neuron: str = "center") -> "PositiveMean":
        return cls(layer.channels, layer.size, layer.jump, layer.first, neuron)

    def add(self, batch: Batch, layer: LayerSpec) -> None:
        self.update(batch.scans[layer.name], batch.images)

    def rows(self, model: str, layer: LayerSpec) -> pa.Table:
        return self.to_table(model, layer.name)


class ChannelStats(_OnDevice, Accumulator):
    """Per channel over every position of every image: max, mean, positive fraction, inactive.

    `inactive` = the maximum over everything seen is 0 (post-ReLU activations are >= 0).
    Updates from a `Scan`: the per-image max, float64 sum and positive count of one pass.
    """

    kind = "channels"
    table = catalog.CHANNELS
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

    # --- the collection's surface (pipeline.stats.collection.Accumulator)
    @classmethod
    def build(cls, layer: LayerSpec) -> "ChannelStats":
        return cls(layer.channels)

    def add(self, batch: Batch, layer: LayerSpec) -> None:
        self.update(batch.scans[layer.name])

    def rows(self, model: str, layer: LayerSpec) -> pa.Table:
        return self.to_table(model, layer.name)
