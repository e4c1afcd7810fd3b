"""Per-shard stimulus analysis: a model, its layers and image batches -> a collection of
mergeable accumulators (pipeline.stats.collection).

Pure compute, no Ray and no file I/O: `pipeline.stats.worker` (a worker's body, which reads
images through pipeline.data.decode) and `jobs.bench` feed it batches; `jobs.analyze` ships its
state around.

    specs = layer_specs(model, resolve_layers(model, "pool1,conv3,conv7"), input_size=224)
    coll = AnalysisOptions(top_k=16).collection()   # or any pipeline.stats.collection.Collection
    runner = ShardRunner(model, preprocess, specs, coll, device="cpu", batch_size=64)
    result = runner.new_result()
    for batch in batches:                      # uint8 (N, 3, 224, 224) RGB, image_index (N,)
        runner.step(result, batch.images, batch.indices)
    result.merge(other_result)                 # results of other shards, any order
    tables = result.tables("resnet34")         # {"stimuli/topk": ..., "stimuli/mean": ...}

`AnalysisResult` runs whatever collection it is given: one instance of each accumulator per
layer, all updated from one `Batch` (each layer's activations scanned once). The job's default
collection (`AnalysisOptions.collection`): TopK (neuron `any` and `center`), PositiveMean
(`center`, and `all` when asked for), ChannelStats and BaselineMean (the same neurons as the
means). Every forward pass runs with the same batch shape (a short last batch is padded with
black images whose outputs are dropped): CPU kernels may round differently for other batch
sizes, and the tables must be bit-identical for any sharding.
"""
from __future__ import annotations

from dataclasses import dataclass
import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor, nn

from pipeline.stats.accumulators import (MEAN_NEURONS, TOPK_NEURONS, ChannelStats, ImageIndex,
                                         PositiveMean, Scan, TopK)
from pipeline.stats.baseline import BaselineMean
from pipeline.stats.collection import Accumulator, Batch, Collection, LayerSpec, Use
from pipeline.models.geometry import module_fields
from pipeline.models.hooks import Trace
from pipeline.data.hostmem import keep_freed_memory
from pipeline.models.layers import Layer
from pipeline.data.preprocess import Preprocess

__all__ = ["LayerSpec", "AnalysisOptions", "AnalysisResult", "ShardRunner", "layer_specs",
           "default_batch_size", "state_nbytes", "accumulator_timing", "merge_states",
           "as_collection"]


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

    def collection(self) -> Collection:
        """The job's accumulators: top-k per neuron, mean stimuli and their unconditional
        baseline per neuron, channel statistics (tables in this order, layer by layer)."""
        return Collection((
            *(Use.of(TopK, k=self.top_k, neuron=n) for n in self.topk_neurons),
            *(Use.of(PositiveMean, neuron=n) for n in self.mean_neurons),
            Use.of(ChannelStats),
            *(Use.of(BaselineMean, neuron=n) for n in self.mean_neurons)))


def as_collection(given: "Collection | Any") -> Collection:
    """A Collection, or options that build one (`pipeline.stats.analysis.AnalysisOptions`)."""
    return given if isinstance(given, Collection) else given.collection()


class AnalysisResult:
    """One instance of every accumulator of a collection for each layer (or whatever the class's
    `for_layers` makes): update / merge / state / from_state / tables.

    `compile`: fuse each layer's scan with torch.compile (None: the PREFERRED_STIMULI_COMPILE
    variable, see `pipeline.stats.accumulators.use_compile`). Not part of the state: it changes
    nothing but the channel sums, by ~1e-7 relative (the eager CPU path sums each image in
    float32)."""

    def __init__(self, specs: Sequence[LayerSpec], collection: "Collection | Any",
                 compile: bool | None = None):
        self.specs = list(specs)
        self.collection = as_collection(collection)
        self.compile = compile
        self.images = 0
        # key -> (use, layer, accumulator), in collection order, layer by layer within a use
        self.entries: dict[str, tuple[Use, Any, Accumulator]] = {}
        for use in self.collection.uses:
            for layer, acc in use.cls.for_layers(self.specs, **dict(use.options)):
                self.entries[f"{layer.name}/{use.key}"] = (use, layer, acc)

    def batch(self, acts: dict[str, Tensor], images: Tensor, indices: "Tensor | Any",
              labels: Tensor | None = None) -> Batch:
        """The `Batch` every accumulator sees: each layer's activations scanned once."""
        return Batch(images, ImageIndex(indices, images.shape[0]),
                     {s.name: Scan(acts[s.name], compiled=self.compile) for s in self.specs},
                     labels)

    def update(self, acts: dict[str, Tensor], images: Tensor, indices: "Tensor | Any",
               labels: Tensor | None = None) -> "AnalysisResult":
        """One batch: `acts` per layer name (N, C, H, W) on any device, uint8 `images`
        (N, 3, H, W), `indices` (N,) image_index. State stays on the activations' device."""
        batch = self.batch(acts, images, indices, labels)
        groups: dict[type, list] = {}
        for use, layer, acc in self.entries.values():
            groups.setdefault(use.cls, []).append((acc, layer))
        for cls, items in groups.items():
            cls.add_all(items, batch)
        self.images += batch.n
        return self

    def flush(self) -> "AnalysisResult":
        for _, _, acc in self.entries.values():
            acc.flush()
        return self

    def merge(self, other: "AnalysisResult") -> "AnalysisResult":
        if other.collection != self.collection or other.specs != self.specs:
            raise ValueError("cannot merge results of different layers or collections")
        for key, (_, _, acc) in self.entries.items():
            acc.merge(other.entries[key][2])
        self.images += other.images
        return self

    def state(self) -> dict[str, Any]:
        """Plain arrays and JSON scalars only (`pipeline.results.state.check_state` holds)."""
        return {"images": self.images, "layers": {s.name: vars(s).copy() for s in self.specs},
                "collection": _described(self.collection),
                "accumulators": {k: acc.state() for k, (_, _, acc) in self.entries.items()}}

    @classmethod
    def from_state(cls, state: dict[str, Any], collection: "Collection | Any"
                   ) -> "AnalysisResult":
        """The result `state()` came from; `collection` names the classes (a state never
        names code to import) and must be the one the state was made with."""
        coll = as_collection(collection)
        if list(state["collection"].items()) != list(_described(coll).items()):
            raise ValueError("the state was made by another collection of accumulators")
        r = cls([LayerSpec(**s) for s in state["layers"].values()], coll)
        r.images = int(state["images"])
        accs = state["accumulators"]
        if accs.keys() != r.entries.keys():
            raise ValueError("the state's accumulators do not match its collection")
        r.entries = {k: (use, layer, use.cls.from_state(accs[k]))
                     for k, (use, layer, _) in r.entries.items()}
        return r

    def by_layer(self) -> dict[str, dict[str, Accumulator]]:
        """layer name -> {use key -> accumulator}: one layer's accumulators (its state size)."""
        out: dict[str, dict[str, Accumulator]] = {}
        for use, layer, acc in self.entries.values():
            out.setdefault(layer.name, {})[use.key] = acc
        return out

    def tables(self, model: str) -> dict[str, pa.Table]:
        """Rows of every table of the collection, keyed by table name (`catalog.Table.name`),
        layer by layer in the order of the layers, accumulators in collection order; columns
        typed as the catalog declares them (topk: without its `patch`, added later)."""
        parts: dict[Any, list] = {t: [] for t in self.collection.tables}   # catalog.Table
        rank: dict[str, int] = {}            # layers in the order the entries first name them
        entries = sorted(self.entries.values(),
                         key=lambda e: rank.setdefault(e[1].name, len(rank)))
        for use, layer, acc in entries:
            parts[use.cls.table].append(acc.rows(model, layer))
        out = {}
        for table, rows in parts.items():
            if not rows:
                continue
            t = pa.concat_tables(rows)
            out[table.name] = t.cast(pa.schema([table.schema.field(n) for n in t.column_names]))
        return out


def _described(coll: Collection) -> dict[str, dict[str, Any]]:
    """The collection in a state: use key -> its kind and options, in order."""
    return {u.key: u.describe() for u in coll.uses}


def merge_states(a: dict[str, Any], b: dict[str, Any], collection: "Collection | Any"
                 ) -> dict[str, Any]:
    """Merge two `AnalysisResult.state()`s (host arrays) of `collection`: what the job's merge
    tree folds (`functools.partial(merge_states, collection=...)`)."""
    return AnalysisResult.from_state(a, collection).merge(
        AnalysisResult.from_state(b, collection)).state()


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


def accumulator_timing(specs: list[LayerSpec], options: "Collection | AnalysisOptions",
                       acts: dict[str, Tensor],
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
                 options: "Collection | AnalysisOptions", device: str = "cpu", batch_size: int = 64,
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
        self.options = options                  # as given (jobs.bench describes it)
        self.collection = as_collection(options)
        self.batch_size = int(batch_size)
        self.compile = compile           # accumulator scan: None = PREFERRED_STIMULI_COMPILE
        self.layers = layers or resolve_layers(model, [s.name for s in specs])

    def new_result(self) -> AnalysisResult:
        return AnalysisResult(self.specs, self.collection, self.compile)

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
