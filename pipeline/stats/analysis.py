"""Per-shard stimulus analysis: a model, its layers and image batches -> mergeable accumulators.

Pure compute, no Ray and no file I/O (but `ShardFeed`, a worker's body, which reads through
pipeline.data.decode): `jobs.analyze` (and `jobs.bench`) feed it batches and ship its state around.

    specs = layer_specs(model, resolve_layers(model, "pool1,conv3,conv7"), input_size=224)
    runner = ShardRunner(model, preprocess, specs, AnalysisOptions(top_k=16), device="cpu",
                         batch_size=64)
    result = runner.new_result()
    for batch in batches:                      # uint8 (N, 3, 224, 224) RGB, image_index (N,)
        runner.step(result, batch.images, batch.indices)
    result.merge(other_result)                 # results of other shards, any order
    tables = result.tables("resnet34")         # {"topk", "mean", "channels"}: pyarrow Tables

Per layer a `LayerResult` holds TopK (neuron `any` and `center`), PositiveMean (`center`, and
`all` when asked for) and ChannelStats. Every forward pass runs with the same batch shape (a
short last batch is padded with black images whose outputs are dropped): CPU kernels may round
differently for other batch sizes, and the tables must be bit-identical for any sharding.
"""
from __future__ import annotations

from dataclasses import dataclass
import time
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor, nn

from pipeline.stats.accumulators import (CHANNELS_SCHEMA, MEAN_NEURONS, MEAN_SCHEMA, TOPK_NEURONS, TOPK_SCHEMA,
                           ChannelStats, ImageIndex, PositiveMean, Scan, TopK, update_topk)
from pipeline.models.geometry import RF, module_fields
from pipeline.models.hooks import Trace
from pipeline.data.hostmem import keep_freed_memory
from pipeline.models.layers import Layer
from pipeline.data.preprocess import Preprocess

__all__ = ["LayerSpec", "AnalysisOptions", "LayerResult", "AnalysisResult", "ShardRunner",
           "layer_specs", "TOPK_GEOMETRY_SCHEMA", "state_nbytes", "accumulator_timing",
           "model_blob", "runner_from_blob", "merge_states", "run_unit", "FeedSpec", "ShardFeed"]

# topk.parquet before the PNG patches are added: accumulator columns plus the RF box.
TOPK_GEOMETRY_SCHEMA = pa.schema(list(TOPK_SCHEMA) + [
    ("top", pa.int32()), ("left", pa.int32()), ("size", pa.int32())])


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


def layer_specs(model: nn.Module, layers: list[Layer], input_size: int) -> list[LayerSpec]:
    """Geometry of `layers` for a square `input_size` crop (via pipeline.models.geometry), read at each
    layer's measurement point, so paper names and module paths of any supported CNN work."""
    fields = module_fields(model, input_size)
    specs = []
    for layer in layers:
        if layer.name == "fc":
            raise ValueError("layer fc has no spatial map to analyse; allowed: conv1, pool1, "
                             "conv2 ... or a module path")
        rf = fields[layer.point]
        top, left, _ = rf.box(0, 0)
        if not rf.square or top != left:   # the tables' boxes are squares on a square grid
            raise ValueError(f"layer {layer.name} has a non-square receptive field or feature "
                             f"map; the analysis needs square ones")
        specs.append(LayerSpec(layer.name, layer.channels, rf.size, rf.jump, top, rf.feature_size))
    return specs


def model_blob(model: nn.Module, name: str, preprocess: Preprocess) -> dict[str, Any]:
    """What a worker rebuilds the model from (`runner_from_blob`): plain tensors, picklable."""
    from pipeline.models.zoo import n_classes

    return {"model": name, "width": getattr(model, "width", 64), "num_classes": n_classes(model),
            "preprocess": preprocess.state(),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


def default_batch_size(crop: int, device: str = "cpu", images: int | None = None) -> int:
    """Images per forward pass when none is given, a power of two within [64, 256] (never
    more than `images` rounded up to a power of two: every forward runs the same batch shape,
    so a 64-image run at batch 256 would pad each batch with 192 black images). CPU: as
    many pixels as 64 images of 224 px (3.2 M): 64 at 224 px and above, 128 at 128 px, 256 at
    the demo's 64 px. Below ~160 px a batch of 64 is so little work that per-batch costs (each
    layer's dispatch, the accumulators' ~100 small calls) weigh: at 64 px (resnet34 width 16,
    2 CPU threads) 256 analyses ~14 % more images per second than 64. CUDA: as many pixels as
    256 images of 224 px (12.8 M): 256 up to 224 px (a GPU needs the work per launch; resnet34
    to conv7 at 224 px and batch 256 holds ~2 GiB of activations), 64 at 448 px."""
    pixels = (256 if device == "cuda" else 64) * 224 * 224
    n = pixels // max(1, crop * crop)
    size = max(64, min(256, 1 << (max(n, 1).bit_length() - 1)))
    return size if images is None else min(size, 1 << max(0, images - 1).bit_length())


def runner_from_blob(blob: dict[str, Any], specs: list[LayerSpec], options: "AnalysisOptions",
                     device: str = "cpu", batch_size: int = 64) -> "ShardRunner":
    """The model of `model_blob` on `device`, wrapped in a ShardRunner for `specs`."""
    from pipeline.models.checkpoint import model_from_state_dict
    from pipeline.data.preprocess import preprocess_from_state

    model = model_from_state_dict(blob["state_dict"], blob["model"])
    return ShardRunner(model, preprocess_from_state(blob["preprocess"]), specs, options,
                       device=device, batch_size=batch_size)


@dataclass(frozen=True)
class AnalysisOptions:
    top_k: int = 16                                   # stimuli kept per (layer, channel, neuron)
    topk_neurons: tuple[str, ...] = ("any", "center")
    mean_neurons: tuple[str, ...] = ("center",)       # add "all" for the channel-wide mean

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top-k must be a positive integer, got {self.top_k}")
        for n in self.topk_neurons:
            if n not in TOPK_NEURONS:
                raise ValueError(f"unknown top-k neuron {n!r}; allowed: {', '.join(TOPK_NEURONS)}")
        for n in self.mean_neurons:
            if n not in MEAN_NEURONS:
                raise ValueError(f"unknown mean neuron {n!r}; allowed: {', '.join(MEAN_NEURONS)}")


class LayerResult:
    """All accumulators of one layer, updated from one `Scan` (one read of the activations).

    `compile`: fuse the scan with torch.compile (None: the PREFERRED_STIMULI_COMPILE variable,
    see `pipeline.stats.accumulators.use_compile`). Not part of the state: it changes nothing but the
    channel sums, by ~1e-7 relative (the eager CPU path sums each image in float32)."""

    def __init__(self, spec: LayerSpec, options: AnalysisOptions, compile: bool | None = None):
        self.spec = spec
        self.compile = compile
        c = spec.channels
        self.topk = {n: TopK(c, options.top_k, n) for n in options.topk_neurons}
        self.mean = {n: PositiveMean(c, spec.size, spec.jump, spec.first, n)
                     for n in options.mean_neurons}
        self.channels = ChannelStats(c)

    def scan(self, acts: Tensor) -> Scan:
        return Scan(acts, compiled=self.compile)

    def update_rest(self, scan: Scan, images: Tensor) -> None:
        """Every accumulator but the top-k (`AnalysisResult.update` does those of all layers
        at once)."""
        for acc in self.mean.values():
            acc.update(scan, images)
        self.channels.update(scan)

    def flush(self) -> None:
        """Add what waits (the centre means' crops, `PositiveMean.flush`) into the state."""
        for acc in self.mean.values():
            acc.flush()

    def merge(self, other: "LayerResult") -> None:
        if other.spec != self.spec or other.topk.keys() != self.topk.keys() \
                or other.mean.keys() != self.mean.keys():
            raise ValueError(f"cannot merge results of different configurations ({self.spec.name})")
        for n, acc in self.topk.items():
            acc.merge(other.topk[n])
        for n, acc in self.mean.items():
            acc.merge(other.mean[n])
        self.channels.merge(other.channels)

    def state(self) -> dict[str, Any]:
        return {"spec": self.spec.__dict__.copy(),
                "topk": {n: a.state() for n, a in self.topk.items()},
                "mean": {n: a.state() for n, a in self.mean.items()},
                "channels": self.channels.state()}

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> "LayerResult":
        r = cls.__new__(cls)
        r.spec, r.compile = LayerSpec(**s["spec"]), None
        r.topk = {n: TopK.from_state(v) for n, v in s["topk"].items()}
        r.mean = {n: PositiveMean.from_state(v) for n, v in s["mean"].items()}
        r.channels = ChannelStats.from_state(s["channels"])
        return r


class AnalysisResult:
    """Accumulators of every analysed layer; merge / state / from_state / tables."""

    def __init__(self, specs: list[LayerSpec], options: AnalysisOptions,
                 compile: bool | None = None):
        self.layers = {s.name: LayerResult(s, options, compile) for s in specs}

    @property
    def images(self) -> int:
        return next(iter(self.layers.values())).channels.images if self.layers else 0

    def update(self, acts: dict[str, Tensor], images: Tensor, indices: "Tensor | np.ndarray"
               ) -> "AnalysisResult":
        """One batch: `acts` per layer (N, C, H, W) on any device, uint8 `images` (N, 3, H, W),
        `indices` (N,) image_index. State stays on the activations' device (no host copy)."""
        indices = ImageIndex(indices, images.shape[0])      # checked once for every layer
        scans = {name: layer.scan(acts[name]) for name, layer in self.layers.items()}
        update_topk([(acc, scans[name]) for name, layer in self.layers.items()
                     for acc in layer.topk.values()], indices)     # one stacked update on CPU
        for name, layer in self.layers.items():
            layer.update_rest(scans[name], images)
        return self

    def flush(self) -> "AnalysisResult":
        """Add what waits for later batches into the state (`state()`, `merge()` and `tables()`
        do it themselves; timings call it to count the work)."""
        for layer in self.layers.values():
            layer.flush()
        return self

    def merge(self, other: "AnalysisResult") -> "AnalysisResult":
        if other.layers.keys() != self.layers.keys():
            raise ValueError("cannot merge results over different layers")
        for name, layer in self.layers.items():
            layer.merge(other.layers[name])
        return self

    def state(self) -> dict[str, Any]:
        return {"layers": {n: r.state() for n, r in self.layers.items()}}

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> "AnalysisResult":
        r = cls.__new__(cls)
        r.layers = {n: LayerResult.from_state(v) for n, v in s["layers"].items()}
        return r

    def tables(self, model: str) -> dict[str, pa.Table]:
        """`topk` (without patches, with top/left/size), `mean` and `channels` tables."""
        topk, mean, chans = [], [], []
        for name, layer in self.layers.items():
            for acc in layer.topk.values():
                t = acc.to_table(model, name)
                sp = layer.spec
                top, left = sp.rf.boxes(torch.tensor(t["y"].to_numpy()),     # Arrow's buffers
                                        torch.tensor(t["x"].to_numpy()))     # are read-only
                t = t.append_column("top", pa.array(top.numpy().astype(np.int32)))
                t = t.append_column("left", pa.array(left.numpy().astype(np.int32)))
                t = t.append_column("size", pa.array(np.full(t.num_rows, sp.size, np.int32)))
                topk.append(t)
            mean += [acc.to_table(model, name) for acc in layer.mean.values()]
            chans.append(layer.channels.to_table(model, name))

        def cat(parts: list[pa.Table], schema: pa.Schema) -> pa.Table:
            return pa.concat_tables(parts).cast(schema) if parts else schema.empty_table()

        return {"topk": cat(topk, TOPK_GEOMETRY_SCHEMA), "mean": cat(mean, MEAN_SCHEMA),
                "channels": cat(chans, CHANNELS_SCHEMA)}


def merge_states(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Merge two `AnalysisResult.state()`s (host arrays): what the job's merge tree folds."""
    return AnalysisResult.from_state(a).merge(AnalysisResult.from_state(b)).state()


def run_unit(runner: "ShardRunner", batches: Iterator[Any]) -> tuple[AnalysisResult, dict]:
    """Consume one unit's batches (`pipeline.data.decode.Batch`, up to the one marked `last`) from a
    longer feed; returns the result and its marker info (images, skipped files, decode wait)."""
    result, skipped, wait = runner.new_result(), [], 0.0
    while True:
        t = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t
        skipped += [list(s) for s in batch.skipped]
        runner.step(result, batch.images, batch.indices)
        if batch.last:
            return result, {"images": result.images, "skipped": skipped,
                            "decode_wait_seconds": round(wait, 3)}


def state_nbytes(state: Any) -> int:
    """Bytes held by the numpy arrays of a state (the worker-memory figure)."""
    if isinstance(state, np.ndarray):
        return state.nbytes
    if isinstance(state, dict):
        return sum(state_nbytes(v) for v in state.values())
    return 0


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Fastest seconds of each function over `repeats` rounds that call them in turn, after one
    untimed round: a noisy neighbour (or the allocator's page faults) hurts each alike."""
    best = {k: float("inf") for k in fns}
    for r in range(repeats + 1):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r:
                best[k] = min(best[k], time.perf_counter() - t0)
    return best


def accumulator_timing(specs: list[LayerSpec], options: AnalysisOptions, acts: dict[str, Tensor],
                       images: Tensor, indices: Tensor, repeats: int = 5,
                       compile: bool | None = None, updates: int = 8) -> dict[str, float]:
    """Milliseconds per batch of `AnalysisResult.update` on captured activations, against the
    memory floor: one `amax` read of the same activations (each (image, channel) row's).

    `accumulator_ms_per_batch`: the steady state of a long run, where a batch's images rarely
    enter a top-k: the result first holds k images stronger than any here (every activation
    max + 1), then takes `updates` updates and a `flush` (the centre-mean matmul waits for
    several batches: timing one update alone would leave it out), per batch.
    `accumulator_cold_ms_per_batch`: a fresh result, one update and its flush, where every image
    may enter (the first batch of a shard: first-maximum positions are computed for them).
    The timings are interleaved, best of `repeats` each, after one untimed round, so that a
    noisy neighbour hurts them alike; CUDA is synchronised around each timing.
    """

    indices = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
    dev = next(iter(acts.values())).device
    updates = max(1, updates)

    def synced(fn):
        def run() -> None:
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        return run

    def steady() -> None:
        for _ in range(updates):
            warm.update(acts, images, indices)
        warm.flush()

    with torch.no_grad():
        warm = AnalysisResult(specs, options, compile)
        warm.update({k: torch.full_like(v, float(v.max()) + 1) for k, v in acts.items()},
                    images, indices)
        runs = {
            "hot": steady,
            "cold": lambda: AnalysisResult(specs, options, compile).update(
                acts, images, indices).flush(),
            # one read: each (image, channel)'s amax, over contiguous rows on the CPU (the
            # scan's own first pass; the per-channel amax((0, 2, 3)) reads strided memory and
            # took ~3x as long: the floor it gave was too easy)
            "floor": lambda: [a.amax((2, 3)) for a in acts.values()],
        }
        secs = interleaved({k: synced(fn) for k, fn in runs.items()}, max(1, repeats))
        best = {k: v * 1e3 / (updates if k == "hot" else 1) for k, v in secs.items()}
    return {"accumulator_ms_per_batch": round(best["hot"], 3),
            "accumulator_cold_ms_per_batch": round(best["cold"], 3),
            "amax_floor_ms_per_batch": round(best["floor"], 3),
            "accumulator_floor_ratio": round(best["hot"] / max(best["floor"], 1e-9), 2)}


class ShardRunner:
    """Holds a model on its device and turns uint8 batches into accumulator updates.

    One forward per batch through `pipeline.models.hooks.Trace`, stopped after the deepest requested
    layer. On CUDA: inference mode, channels_last, one non-blocking host-to-device copy of the
    uint8 batch (4x smaller than float), statistics reduced on the device in float32/float64.
    On CPU the process keeps freed memory for the next batch (`pipeline.data.hostmem`).
    """

    def __init__(self, model: nn.Module, preprocess: Preprocess, specs: list[LayerSpec],
                 options: AnalysisOptions, device: str = "cpu", batch_size: int = 64,
                 layers: list[Layer] | None = None, compile: bool | None = None):
        from pipeline.models.layers import resolve_layers

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.device.type == "cpu":
            keep_freed_memory()     # no page faults through fresh activations every batch
        self.model = model.eval().to(self.device)
        if self.cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.preprocess = preprocess
        self.specs = specs
        self.options = options
        self.batch_size = int(batch_size)
        self.compile = compile           # accumulator scan: None = PREFERRED_STIMULI_COMPILE
        self.layers = layers or resolve_layers(model, [s.name for s in specs])

    def new_result(self) -> AnalysisResult:
        return AnalysisResult(self.specs, self.options, self.compile)

    def inputs(self, images: Tensor) -> Tensor:
        """The model input of a uint8 (N, 3, H, W) batch on the device: [0, 1], preprocessed."""
        x = images.to(self.device, non_blocking=True).float().div_(255.0)
        x = self.preprocess(x)
        return x.contiguous(memory_format=torch.channels_last) if self.cuda else x

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Post-ReLU activations of the layers for model inputs `x` (the forward stops after
        the deepest)."""
        with torch.inference_mode(), Trace(self.model, self.layers) as tr:
            tr.run(x)
        return tr.outputs

    def activations(self, images: Tensor) -> dict[str, Tensor]:
        """Post-ReLU activations of the layers for a uint8 (N, 3, H, W) batch, on the device."""
        return self.forward(self.inputs(images))

    def step(self, result: AnalysisResult, images: Tensor, indices: np.ndarray | Tensor) -> None:
        n = images.shape[0]
        if n == 0:
            return
        images = images.to(self.device, non_blocking=True)   # the one host-to-device copy
        if n < self.batch_size:  # same batch shape for every forward: bitwise-stable kernels
            pad = images.new_zeros((self.batch_size - n, *images.shape[1:]))
            acts = self.activations(torch.cat([images, pad]))
        else:
            acts = self.activations(images)
        acts = {k: v[:n] for k, v in acts.items()}
        # no_grad, not inference_mode: accumulator state must stay updatable outside it (merge).
        with torch.no_grad():
            result.update(acts, images, indices)          # checked once there (ImageIndex)

    def run(self, batches: Iterable[tuple[Tensor, np.ndarray]]) -> AnalysisResult:
        result = self.new_result()
        for images, indices in batches:
            self.step(result, images, indices)
        return result


@dataclass(frozen=True)
class FeedSpec:
    """What a shard worker needs besides the model blob (picklable, sent once per worker)."""

    specs: list                  # LayerSpec
    options: AnalysisOptions
    manifest: Any                # pipeline.data.listing.Manifest
    transform: Any               # pipeline.data.decode.EvalTransform
    demo_root: str | None        # the demo data's root: each node makes its own copy
    device: str                  # cpu | cuda (nvJPEG decode on cuda)
    batch_size: int
    threads: int                 # torch threads (CPU)
    decode_cpus: int             # decode threads (reserved by the worker besides `threads`)
    prefetch: int = 2            # decoded batches queued ahead of the computation


class ShardFeed:
    """The body of one analysis worker: the model once, ONE Decoder and ONE Prefetcher for all
    its shards. Files are read through pipeline.data.decode (the source); no Ray here.

    `feed(start, stop)` queues a shard for the decode thread as soon as the worker hears of it,
    so decoding runs on into the next shard while `run` computes the current one; `run` takes
    the shards in the order they were fed (a shard never fed is fed by `run` itself)."""

    def __init__(self, blob: dict[str, Any], spec: FeedSpec) -> None:
        import queue
        from collections import deque

        from pipeline.data.decode import Decoder, Prefetcher
        from pipeline.models.precision import set_strict_fp32

        set_strict_fp32()              # the census's max == 0 is exact: no TF32 in this worker
        if spec.device == "cpu":
            torch.set_num_threads(spec.threads)
        if spec.demo_root is not None:
            from pipeline.data.demo import ensure_demo_data

            ensure_demo_data(spec.demo_root)
        self.runner = runner_from_blob(blob, spec.specs, spec.options, spec.device,
                                       spec.batch_size)
        self.decoder = Decoder(spec.transform, cpus=spec.decode_cpus, device=spec.device,
                               nvjpeg=spec.device == "cuda")
        self.units: queue.Queue = queue.Queue()
        self.fed: deque = deque()
        self.batches = Prefetcher(spec.manifest, self.decoder, spec.batch_size,
                                  spec.prefetch).run(iter(self.units.get, None))

    def feed(self, start: int, stop: int) -> None:
        self.fed.append((start, stop))
        self.units.put((start, stop))

    def close(self) -> None:
        """End the decode thread (it waits for the next shard) and the decoder's threads."""
        self.units.put(None)
        self.batches.close()
        self.decoder.close()

    def __del__(self) -> None:
        if hasattr(self, "batches"):
            self.close()

    def run(self, start: int, stop: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """(state, marker info) of shard [start, stop)."""
        from pipeline.models.precision import current

        if not self.fed:
            self.feed(start, stop)
        if self.fed[0] != (start, stop):   # the decode thread is on another shard: never mix
            raise RuntimeError(f"shard {start}-{stop} asked for while {self.fed[0]} was fed "
                               "first; shards must run in the order they are fed")
        self.fed.popleft()
        result, info = run_unit(self.runner, self.batches)
        return result.state(), {"start": start, "stop": stop, **info, "precision": current()}
