"""Decoding: image bytes -> model-ready uint8 batches, the one evaluation path of the project.

Training's validation (`pipeline.train.recipe.EvalResizeCrop`) and the analysis both go through
`decode_rgb` + `resize_crop`, so the same image gives the same pixels in both.

* `decode_rgb`: bytes -> uint8 (3, H, W) RGB, decoded by content. Complete baseline/progressive
  JPEGs with 1 or 3 components go through `torchvision.io.decode_jpeg` (libjpeg-turbo, the same
  library and settings as PIL: identical pixels) which, unlike PIL's Python-level work, runs
  without the GIL; everything else (PNG named .JPEG, CMYK, damaged files) through PIL as before.
* `resize_crop`: shorter side to `resize` (bilinear, antialiased tensor resize, on CPU or CUDA),
  centre crop. Equal to PIL's Resize+CenterCrop where no resize is needed (shorter side already
  `resize`); elsewhere within a small rounding difference (docs/analysis.md gives the measured
  maximum).
* `Decoder`: one batch of files at a time with `cpus` threads (the worker reserves those CPUs).
  The threads read the files too (`read_file`; on S3 every file of a batch is requested at once
  on fsspec's loop, so the thread that submits never waits for storage); per image they hold
  the GIL only for a little glue. With `nvjpeg=True` complete 3-component JPEGs are decoded as
  one batch on the GPU (`decode_jpeg(list, device="cuda")`) and resized there in one call per
  image size, every other file is decoded on the CPU into a pinned row. Batches for CUDA are
  pinned and copied without blocking.
* `Prefetcher`: one pipeline per worker fed a sequence of units (shards: `(start, stop)` ranges or
  index arrays) that keeps decoding across unit boundaries; each batch says which unit it belongs
  to and whether it is that unit's last.

    dec = Decoder(EvalTransform(), cpus=4)
    batch = dec.load(manifest, [0, 1, 2])                      # Batch (uint8, indices, skipped)
    for batch in Prefetcher(manifest, dec, 256).run([(0, 5000), (5000, 10000)]):
        ...; if batch.last: finish_shard(batch.unit)
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import os
import queue
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import fsspec
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem

from pipeline.data.listing import Manifest, SourceError

__all__ = ["EvalTransform", "Batch", "Decoder", "Prefetcher", "decode_rgb", "resize_crop",
           "decode_image", "jpeg_info", "read_file", "load_batch", "iter_batches",
           "default_cpus"]

_FETCH_CONCURRENCY = 64     # requests open at once on an async filesystem's loop (S3)
_SOF = {0xC0, 0xC1, 0xC2}   # baseline, extended, progressive Huffman: what both decoders take
_quiet = False


def _torchvision_decode_jpeg():
    """torchvision's decode_jpeg, without its per-call deprecation warning (torchvision 0.29
    points to TorchCodec; the op itself is unchanged). The filter is added on first use."""
    global _quiet
    if not _quiet:
        import warnings

        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities "
                                "of TorchVision", category=DeprecationWarning)
        _quiet = True
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg, ImageReadMode.RGB


@dataclass(frozen=True)
class EvalTransform:
    resize: int = 256   # shorter side resized to this (bilinear, antialiased)
    crop: int = 224     # then a centre crop of crop x crop

    def __post_init__(self) -> None:
        if not (isinstance(self.resize, int) and self.resize >= 1):
            raise SourceError(f"resize must be a positive integer, got {self.resize!r}")
        if not (isinstance(self.crop, int) and self.crop >= 1):
            raise SourceError(f"crop must be a positive integer, got {self.crop!r}")


@dataclass
class Batch:
    images: torch.Tensor        # uint8 (N, 3, crop, crop) RGB; as_float() gives [0, 1]
    indices: np.ndarray         # int64 image_index of each row
    labels: np.ndarray          # int64 labels (-1 where unknown)
    skipped: list[tuple[int, str, str]]   # (image_index, path, reason) of unreadable files
    unit: int = 0               # Prefetcher: position of this batch's unit (shard) in the feed
    last: bool = True           # Prefetcher: the last batch of its unit

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def as_float(self, device: str | torch.device = "cpu") -> torch.Tensor:
        # Move the uint8 tensor first: 4x fewer bytes over PCIe than float32.
        return self.images.to(device, non_blocking=True).to(torch.float32).div_(255.0)


def default_cpus() -> int:
    """CPUs this process may run on (its affinity, else the machine's). A Ray task or actor
    sees every CPU of its node, not the ones it reserved: jobs pass their reservation."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


# ----------------------------------------------------------------------------- one image

def jpeg_info(data: bytes | bytearray) -> tuple[int, int, int] | None:
    """(height, width, components) of a complete baseline/progressive JPEG, else None.

    Reads the markers up to the frame header. None for anything else (PNG, arithmetic or
    lossless JPEG, a file without its end-of-image marker, i.e. truncated): those take PIL's
    path, which decides whether the file is usable, exactly as before.
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    if data[-64:].rstrip(b"\0\r\n ")[-2:] != b"\xff\xd9":   # no end-of-image: truncated
        return None
    i = 2
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:          # fill byte
            i += 1
            continue
        if marker in (0x01,) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = (data[i + 2] << 8) | data[i + 3]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if marker not in _SOF or i + 10 > n:
                return None
            h = (data[i + 5] << 8) | data[i + 6]
            w = (data[i + 7] << 8) | data[i + 8]
            return (h, w, data[i + 9]) if h and w else None
        if marker == 0xDA:          # scan before frame header: malformed
            return None
        i += 2 + length
    return None


def decode_rgb(data: bytes | bytearray) -> torch.Tensor:
    """Bytes -> uint8 (3, H, W) RGB, decoded by content; raises on unusable data.

    1- and 3-component JPEGs: libjpeg-turbo through torchvision (GIL released, same pixels as
    PIL). CMYK/YCCK JPEGs, other formats and damaged files: PIL, converted to RGB (grayscale,
    CMYK, palette, RGBA). EXIF orientation is ignored, as torchvision's ImageFolder does.
    """
    info = jpeg_info(data)
    if info is not None and info[2] in (1, 3):
        decode_jpeg, rgb = _torchvision_decode_jpeg()
        return decode_jpeg(_as_uint8(data), mode=rgb)
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()              # truncated files fail here, not later
        rgb = img.convert("RGB")
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def resize_crop(image: torch.Tensor, transform: EvalTransform) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, crop, crop): shorter side to `resize`, centre crop.

    Antialiased bilinear on the tensor (CPU or CUDA, no GIL held). Output sizes as torchvision's
    Resize(int) + CenterCrop (a crop larger than the image is zero-padded, as there).
    """
    from torchvision.transforms.v2 import functional as TF

    if min(image.shape[-2:]) != transform.resize:
        image = TF.resize(image, [transform.resize], antialias=True)
    return TF.center_crop(image, [transform.crop, transform.crop])


def decode_image(data: bytes | bytearray, transform: EvalTransform) -> torch.Tensor:
    """Bytes -> uint8 (3, crop, crop) RGB: `decode_rgb` then `resize_crop`."""
    return resize_crop(decode_rgb(data), transform)


def _reason(e: BaseException) -> str:
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{e.__class__.__name__}: {msg}" if msg else e.__class__.__name__


# ----------------------------------------------------------------------------- bytes

def read_file(fs: fsspec.AbstractFileSystem, path: str) -> bytes | bytearray:
    """One file's bytes. Local files are read straight into a bytearray (open, fstat, readinto:
    a few system calls, the GIL released in each, and a buffer torch.frombuffer takes without
    a copy); other filesystems through fsspec's `cat_file`."""
    if isinstance(fs, LocalFileSystem):
        with open(path, "rb", buffering=0) as f:
            buf = bytearray(os.fstat(f.fileno()).st_size)
            view, got = memoryview(buf), 0
            while got < len(buf):
                n = f.readinto(view[got:])
                if not n:           # the file shrank while we read it
                    return buf[:got]
                got += n
            return buf
    return fs.cat_file(path)


_GATES: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore]" = \
    weakref.WeakKeyDictionary()


async def _cat_gated(fs: Any, path: str) -> bytes:
    # one semaphore per event loop, made in that loop: at most _FETCH_CONCURRENCY requests open
    loop = asyncio.get_running_loop()
    gate = _GATES.get(loop)
    if gate is None:
        gate = _GATES[loop] = asyncio.Semaphore(_FETCH_CONCURRENCY)
    async with gate:
        # fs.cat(list) would glob paths holding [ ] * ?; _cat_file reads them literally
        return await fs._cat_file(path)


class _Files:
    """The bytes of one batch's files, and their decoding; failures come back as a reason
    string, never raised. Files on async filesystems (S3) are requested at once on fsspec's
    event loop, concurrently and without blocking the caller (the producer thread only
    schedules them); the others are read by whichever decode thread asks for them."""

    def __init__(self, locations: list) -> None:
        self.data: list = []        # bytes, an exception, a Future, or (filesystem, path)
        for loc in locations:
            if isinstance(loc, BaseException):
                self.data.append(loc)
                continue
            fs, path = loc
            if getattr(fs, "async_impl", False):
                try:
                    loc = asyncio.run_coroutine_threadsafe(_cat_gated(fs, path), fs.loop)
                except Exception as e:  # noqa: BLE001 - no loop: this file fails alone
                    loc = e
            self.data.append(loc)

    def read(self, k: int) -> bytes | bytearray | str:
        d = self.data[k]
        try:
            if isinstance(d, tuple):
                d = read_file(*d)
            elif isinstance(d, Future):
                d = d.result()
        except Exception as e:  # noqa: BLE001
            d = e
        if isinstance(d, BaseException):
            return "read failed: " + _reason(d)
        return d if d else "empty file"

    def decoded(self, k: int, transform: EvalTransform) -> torch.Tensor | str:
        d = self.read(k)
        return d if isinstance(d, str) else _decode_or_reason(d, transform)


def _decode_or_reason(data: bytes | bytearray, transform: EvalTransform) -> torch.Tensor | str:
    try:
        return decode_image(data, transform)
    except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this file"
        return "decode failed: " + _reason(e)


# ----------------------------------------------------------------------------- batches

def _rows(manifest: Manifest, idx: np.ndarray, paths: Sequence[str],
          reasons: list[str | None], images: torch.Tensor) -> Batch:
    """The Batch of the rows whose reason is None (`images` holds just those); the others are
    `skipped` with their reason."""
    kept = idx[[k for k, r in enumerate(reasons) if r is None]].astype(np.int64)
    skipped = [(int(idx[k]), paths[idx[k]], r) for k, r in enumerate(reasons) if r is not None]
    return Batch(images=images, indices=kept, labels=manifest.labels[kept],
                 skipped=skipped)


class _Staging:
    """Pinned host rows for the images of an nvJPEG batch that take the CPU path (grayscale,
    CMYK, PNG, damaged JPEGs: a few in a hundred), allocated when the first one comes and
    filled in any order by the decode threads; `to(device)` moves the filled rows in one
    non-blocking copy."""

    def __init__(self, n: int, crop: int, pin: bool) -> None:
        self.shape, self.pin = (n, 3, crop, crop), pin
        self.rows: torch.Tensor | None = None
        self.used = 0
        self.lock = threading.Lock()

    def put(self, image: torch.Tensor) -> int:
        with self.lock:
            if self.rows is None:
                self.rows = torch.empty(self.shape, dtype=torch.uint8, pin_memory=self.pin)
            slot, self.used = self.used, self.used + 1
        self.rows[slot].copy_(image)
        return slot

    def to(self, device: torch.device) -> torch.Tensor | None:
        return None if not self.used else self.rows[:self.used].to(device, non_blocking=True)


class Decoder:
    """Files -> Batch with `cpus` threads; optionally nvJPEG for the JPEGs (`nvjpeg=True`).

    `device` is where batches land: "cpu", or "cuda" (CPU-decoded rows are written into a pinned
    buffer and copied without blocking; nvJPEG rows never leave the GPU). The thread pool lives
    as long as the decoder: one per worker, reused for every batch. `close()` ends it.

    Per image the threads hold the GIL only for a little glue (a file read by system calls, the
    JPEG header check, the calls into libjpeg-turbo and the resize kernel, which release it);
    with nvJPEG the threads read and check the files, and the calling thread decodes the whole
    batch in one call and resizes it in one call per distinct image size.
    """

    def __init__(self, transform: EvalTransform, cpus: int | None = None,
                 device: str | torch.device = "cpu", nvjpeg: bool = False):
        self.transform = transform
        self.cpus = int(cpus) if cpus is not None else default_cpus()
        if self.cpus < 1:
            raise ValueError(f"cpus must be >= 1, got {cpus}")
        self.device = torch.device(device)
        if nvjpeg and self.device.type != "cuda":
            raise ValueError("nvjpeg decode needs device='cuda'")
        self.nvjpeg = nvjpeg
        self._pool: ThreadPoolExecutor | None = None

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.cpus, thread_name_prefix="decode")
        return self._pool

    def _dispatch(self, fn: Callable[[int], Any], n: int) -> Callable[[], list]:
        """fn(0), ..., fn(n - 1) on the pool, a few per task (4 tasks per thread: fewer futures,
        still balanced); the returned call waits for the results, in order. With one thread (or
        one item) nothing runs before that call, so a caller that submits the next batch first
        (Prefetcher) does not decode it ahead of the one it hands over."""
        if n <= 1 or self.cpus == 1:
            return lambda: [fn(k) for k in range(n)]
        step = max(1, n // (4 * self.cpus))
        futures = [self._executor().submit(lambda a: [fn(k) for k in range(a, min(a + step, n))],
                                           a) for a in range(0, n, step)]
        return lambda: [r for f in futures for r in f.result()]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> "Decoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def load(self, manifest: Manifest, indices: Sequence[int] | np.ndarray) -> Batch:
        """Read and decode the given images. Unreadable ones go to `skipped`; never raises for them."""
        return self.submit(manifest, indices)()

    def submit(self, manifest: Manifest, indices: Sequence[int] | np.ndarray
               ) -> Callable[[], Batch]:
        """Start reading and decoding; the returned call waits for the Batch. Reads on S3 start
        here (without waiting for them); every image is queued on the pool at once and written
        into its row of the batch, so a caller that submits the next batch before collecting
        this one (Prefetcher) leaves no thread idle at batch boundaries, and no serial stacking
        copy follows. With nvJPEG the batch is decoded on the GPU when collected."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(manifest)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"image_index out of range 0..{n - 1}")
        paths = manifest._paths()
        files = _Files(manifest.locate(idx))
        if self.nvjpeg:
            return self._submit_nvjpeg(manifest, idx, paths, files)
        c = self.transform.crop
        out = torch.empty((len(idx), 3, c, c), dtype=torch.uint8,
                          pin_memory=self.device.type == "cuda")

        def into(k: int) -> str | None:
            r = files.decoded(k, self.transform)
            if isinstance(r, str):
                return r
            out[k].copy_(r)
            return None

        reasons = self._dispatch(into, len(idx))
        return lambda: self._batch(manifest, idx, paths, out, reasons())

    def _batch(self, manifest: Manifest, idx: np.ndarray, paths: Sequence[str],
               out: torch.Tensor, reasons: list[str | None]) -> Batch:
        """The Batch of the rows that decoded (`reasons[k]` None), on the decoder's device."""
        keep = [k for k, r in enumerate(reasons) if r is None]
        if len(keep) < len(reasons):
            out = out[torch.as_tensor(keep, dtype=torch.int64)]
            if self.device.type == "cuda" and len(keep):
                out = out.pin_memory()
        images = out.to(self.device, non_blocking=True) if self.device.type != "cpu" else out
        return _rows(manifest, idx, paths, reasons, images)

    def _submit_nvjpeg(self, manifest: Manifest, idx: np.ndarray, paths: Sequence[str],
                       files: _Files) -> Callable[[], Batch]:
        """The threads read each file and route it: a complete 3-component JPEG goes to the
        GPU as bytes (decoded with the whole batch when collected), anything else is decoded
        on the CPU at once into a pinned row (`_Staging`)."""
        staging = _Staging(len(idx), self.transform.crop, self.device.type == "cuda")

        def route(k: int) -> torch.Tensor | int | str:
            d = files.read(k)
            if isinstance(d, str):
                return d
            if (jpeg_info(d) or (0, 0, 0))[2] == 3:
                return _as_uint8(d)
            r = _decode_or_reason(d, self.transform)
            return r if isinstance(r, str) else staging.put(r)

        routed = self._dispatch(route, len(idx))
        return lambda: self._collect_nvjpeg(manifest, idx, paths, routed(), staging)

    def _collect_nvjpeg(self, manifest: Manifest, idx: np.ndarray, paths: Sequence[str],
                        routed: list, staging: _Staging) -> Batch:
        """One nvJPEG call for the batch's JPEGs, one resize per distinct size, the CPU rows
        copied over in one go, the rows stacked in order."""
        gpu_ks = [k for k, r in enumerate(routed) if isinstance(r, torch.Tensor)]
        decoded = dict(zip(gpu_ks, self._nvjpeg([routed[k] for k in gpu_ks])))
        for k, im in decoded.items():
            if im is None:      # nvJPEG refused it: the CPU path decides
                r = _decode_or_reason(routed[k].numpy().tobytes(), self.transform)
                routed[k] = r if isinstance(r, str) else staging.put(r)
        crops = _resize_crop_groups({k: im for k, im in decoded.items() if im is not None},
                                    self.transform)
        host = staging.to(self.device)
        rows = [crops[k] if k in crops else host[r] for k, r in enumerate(routed)
                if not isinstance(r, str)]
        c = self.transform.crop
        images = (torch.stack(rows) if rows else
                  torch.empty((0, 3, c, c), dtype=torch.uint8, device=self.device))
        reasons = [r if isinstance(r, str) else None for r in routed]
        return _rows(manifest, idx, paths, reasons, images)

    def _nvjpeg(self, bufs: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Decode on the GPU as one batch (full size); None where it failed (the CPU retries).
        torchvision waits for its own decode stream and makes the current stream wait for the
        result, so nothing else synchronises here."""
        if not bufs:
            return []
        decode_jpeg, rgb = _torchvision_decode_jpeg()
        try:
            return list(decode_jpeg(bufs, mode=rgb, device=self.device))
        except Exception:  # noqa: BLE001 - one bad file fails the batch: retry one by one
            out: list[torch.Tensor | None] = []
            for b in bufs:
                try:
                    out.append(decode_jpeg(b, mode=rgb, device=self.device))
                except Exception:  # noqa: BLE001
                    out.append(None)
            return out


def _as_uint8(data: bytes | bytearray) -> torch.Tensor:
    """The bytes as a uint8 tensor: a bytearray without a copy (bytes are read-only)."""
    return torch.frombuffer(data if isinstance(data, bytearray) else bytearray(data),
                            dtype=torch.uint8)


def _resize_crop_groups(images: dict[int, torch.Tensor], transform: EvalTransform
                        ) -> dict[int, torch.Tensor]:
    """`resize_crop` of many images, one call per distinct size (images stacked): each output
    pixel depends on its own image only, so a stacked call gives each image what a call of its
    own gives, and the Python work per batch is per size, not per image."""
    groups: dict[tuple, list[int]] = {}
    for k, im in images.items():
        groups.setdefault(tuple(im.shape), []).append(k)
    out: dict[int, torch.Tensor] = {}
    for ks in groups.values():
        stacked = images[ks[0]].unsqueeze(0) if len(ks) == 1 else \
            torch.stack([images[k] for k in ks])
        for k, crop in zip(ks, resize_crop(stacked, transform).unbind(0)):
            out[k] = crop
    return out


def load_batch(manifest: Manifest, indices: list[int] | np.ndarray, transform: EvalTransform,
               decoder: Decoder | None = None) -> Batch:
    """Read and decode the given images (a one-off `Decoder` on this process's CPUs unless one
    is given). Unreadable ones go to `skipped`; this never raises for them."""
    if decoder is not None:
        return decoder.load(manifest, indices)
    with Decoder(transform) as dec:
        return dec.load(manifest, indices)


class Prefetcher:
    """One decode pipeline per worker: units in, batches out, decoding `depth` batches ahead.

    A unit is a `(start, stop)` range of image_index or an explicit index array (a shard). The
    background thread runs straight across unit boundaries, so the first batch of the next shard
    is ready when the current shard ends. Each Batch carries `unit` (position in the feed) and
    `last` (its unit ends with it; a unit whose images are all unreadable still yields one empty
    last batch). On CUDA the copies run on a side stream and each batch waits for its own event.
    """

    def __init__(self, manifest: Manifest, decoder: Decoder, batch_size: int, depth: int = 2):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.manifest, self.decoder = manifest, decoder
        self.batch_size, self.depth = int(batch_size), int(depth)

    def _chunks(self, units: Iterable) -> Iterator[tuple[int, bool, np.ndarray]]:
        n = len(self.manifest)
        for u, unit in enumerate(units):
            if isinstance(unit, tuple) and len(unit) == 2 and np.isscalar(unit[0]):
                start, stop = int(unit[0]), int(unit[1])
                if not (0 <= start <= stop <= n):
                    raise ValueError(f"range [{start}, {stop}) is not inside 0..{n}")
                idx = np.arange(start, stop, dtype=np.int64)
            else:
                idx = np.asarray(unit, dtype=np.int64).reshape(-1)
            if idx.size == 0:
                continue
            for a in range(0, idx.size, self.batch_size):
                yield u, a + self.batch_size >= idx.size, idx[a:a + self.batch_size]

    def _produce(self, units: Iterable, q: queue.Queue, stop: threading.Event) -> None:
        """The background thread: submit, collect and queue batches; an error goes in the queue.
        The batch submitted before is collected once the next one is queued on the decoder (no
        idle thread between batches); a unit's last batch is collected at once, since the next
        unit may arrive only after this one is finished (an actor feeds shard by shard)."""
        cuda = self.decoder.device.type == "cuda"
        stream = torch.cuda.Stream(self.decoder.device) if cuda else None

        def side():   # decoding and copies on the side stream (CUDA)
            return torch.cuda.stream(stream) if cuda else contextlib.nullcontext()

        def emit(u: int, last: bool, collect: Callable[[], Batch]) -> None:
            with side():
                batch = collect()
                event = torch.cuda.Event() if cuda else None
                if event is not None:
                    event.record(stream)
            batch.unit, batch.last = u, last
            while not stop.is_set():
                try:
                    q.put((batch, event, None), timeout=0.1)
                    return
                except queue.Full:
                    continue

        try:
            ahead = None
            for u, last, idx in self._chunks(units):
                if stop.is_set():
                    return
                with side():
                    nxt = (u, last, self.decoder.submit(self.manifest, idx))
                if ahead is not None:
                    emit(*ahead)
                ahead = nxt
                if last:
                    emit(*ahead)
                    ahead = None
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            q.put((None, None, e))
            return
        q.put((None, None, None))

    def run(self, units: Iterable) -> Iterator[Batch]:
        """Batches of every unit in order (units are read lazily, so a queue may feed them)."""
        q: queue.Queue = queue.Queue(self.depth)
        stop = threading.Event()
        worker = threading.Thread(target=self._produce, args=(units, q, stop), name="prefetch",
                                  daemon=True)
        worker.start()
        try:
            while True:
                batch, event, error = q.get()
                if error is not None:
                    raise error
                if batch is None:
                    return
                if event is not None:
                    current = torch.cuda.current_stream(self.decoder.device)
                    current.wait_event(event)
                    batch.images.record_stream(current)
                yield batch
        finally:
            stop.set()
            while worker.is_alive():
                try:
                    q.get(timeout=0.05)
                except queue.Empty:
                    pass
            worker.join()


def iter_batches(manifest: Manifest, start: int, stop: int, batch_size: int,
                 transform: EvalTransform, prefetch: int = 1,
                 decoder: Decoder | None = None) -> Iterator[Batch]:
    """Batches over image_index [start, stop) in order; the next `prefetch` batches are read
    and decoded in a background thread while the caller computes on the current one."""
    n = len(manifest)
    if not (0 <= start <= stop <= n):
        raise ValueError(f"range [{start}, {stop}) is not inside 0..{n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if prefetch < 0:
        raise ValueError(f"prefetch must be >= 0, got {prefetch}")
    own = decoder is None
    dec = decoder or Decoder(transform)
    try:
        if prefetch == 0:
            for a in range(start, stop, batch_size):
                yield dec.load(manifest, np.arange(a, min(a + batch_size, stop), dtype=np.int64))
            return
        yield from Prefetcher(manifest, dec, batch_size, depth=prefetch).run([(start, stop)])
    finally:
        if own:
            dec.close()
