"""The body of one analysis worker: the model from its blob, ONE decode pipeline, shards in, states out.

The part of the analysis that reads images (through pipeline.data.decode, the source); the
computation is pipeline.stats.analysis. No Ray here: `jobs.analyze` wraps `ShardFeed` in its
actors (`ShardWorker`) and sends each the model blob once.

    blob = model_blob(model, "resnet34", preprocess)          # plain tensors, picklable
    feed = ShardFeed(blob, FeedSpec(specs, collection, manifest, transform, None, "cpu", 64, 4, 2))
    feed.feed(0, 2000); feed.feed(2000, 4000)                 # decoding runs ahead into the next
    state, info = feed.run(0, 2000)                           # AnalysisResult.state(), marker info
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from pipeline.data.preprocess import Preprocess
from pipeline.stats.analysis import AnalysisOptions, AnalysisResult, LayerSpec, ShardRunner
from pipeline.stats.collection import Collection

__all__ = ["model_blob", "runner_from_blob", "run_unit", "FeedSpec", "DecodeFeed", "ShardFeed"]


def model_blob(model: nn.Module, name: str, preprocess: Preprocess) -> dict[str, Any]:
    """What a worker rebuilds the model from (`runner_from_blob`): plain tensors, picklable."""
    from pipeline.models.zoo import n_classes

    return {"model": name, "width": getattr(model, "width", 64), "num_classes": n_classes(model),
            "preprocess": preprocess.state(),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


def runner_from_blob(blob: dict[str, Any], specs: list[LayerSpec],
                     collection: "Collection | AnalysisOptions", device: str = "cpu",
                     batch_size: int = 64, compile: bool | None = None) -> "ShardRunner":
    """The model of `model_blob` on `device`, wrapped in a ShardRunner for `specs` (`compile`:
    the scans, None = PREFERRED_STIMULI_COMPILE)."""
    from pipeline.models.checkpoint import model_from_state_dict
    from pipeline.data.preprocess import preprocess_from_state

    model = model_from_state_dict(blob["state_dict"], blob["model"])
    return ShardRunner(model, preprocess_from_state(blob["preprocess"]), specs, collection,
                       device=device, batch_size=batch_size, compile=compile)


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


@dataclass(frozen=True)
class FeedSpec:
    """What a shard worker needs besides the model blob (picklable, sent once per worker)."""

    specs: list                  # LayerSpec
    collection: Any              # pipeline.stats.collection.Collection (or AnalysisOptions)
    manifest: Any                # pipeline.data.listing.Manifest
    transform: Any               # pipeline.data.decode.EvalTransform
    demo_root: str | None        # the demo data's root: each node makes its own copy
    device: str                  # cpu | cuda (nvJPEG decode on cuda)
    batch_size: int
    threads: int                 # torch threads (CPU)
    decode_cpus: int             # decode threads (reserved by the worker besides `threads`)
    prefetch: int = 2            # decoded batches queued ahead of the computation
    compile: bool | None = None  # torch.compile'd scans (None: PREFERRED_STIMULI_COMPILE)


class DecodeFeed:
    """A worker's ONE Decoder and ONE Prefetcher for all its shards (files read through
    pipeline.data.decode, the source; no Ray here). `feed(start, stop)` queues a shard for the
    decode thread as soon as the worker hears of it, so decoding runs on into the next shard
    while the current one computes; `take(start, stop)` is the shard's turn: shards are computed
    in the order they were fed (a shard never fed is fed then). Subclasses: `ShardFeed` (one
    model), `pipeline.compare.runner.PairFeed` (two)."""

    def start_feed(self, manifest: Any, transform: Any, batch_size: int, *, device: str,
                   threads: int, decode_cpus: int, demo_root: str | None,
                   prefetch: int = 2) -> None:
        """Strict fp32 (measured numbers are the reference: no TF32 in a worker), the CPU's
        torch threads, this node's copy of the demo data, then the decode pipeline."""
        import queue
        from collections import deque

        from pipeline.data.decode import Decoder, Prefetcher
        from pipeline.models.precision import set_strict_fp32

        set_strict_fp32()
        if device == "cpu":
            torch.set_num_threads(threads)
        if demo_root is not None:
            from pipeline.data.demo import ensure_demo_data

            ensure_demo_data(demo_root)
        self.decoder = Decoder(transform, cpus=decode_cpus, device=device,
                               nvjpeg=device == "cuda")
        self.units: queue.Queue = queue.Queue()
        self.fed: deque = deque()
        self.batches = Prefetcher(manifest, self.decoder, batch_size,
                                  prefetch).run(iter(self.units.get, None))

    def feed(self, start: int, stop: int) -> None:
        self.fed.append((start, stop))
        self.units.put((start, stop))

    def take(self, start: int, stop: int) -> None:
        """Shard [start, stop)'s turn: the decode thread's batches are now its own."""
        if not self.fed:
            self.feed(start, stop)
        if self.fed[0] != (start, stop):   # the decode thread is on another shard: never mix
            raise RuntimeError(f"shard {start}-{stop} asked for while {self.fed[0]} was fed "
                               "first; shards must run in the order they are fed")
        self.fed.popleft()

    def close(self) -> None:
        """End the decode thread (it waits for the next shard) and the decoder's threads."""
        self.units.put(None)
        self.batches.close()
        self.decoder.close()

    def __del__(self) -> None:
        if hasattr(self, "batches"):
            self.close()


class ShardFeed(DecodeFeed):
    """The body of one analysis worker: the model once, one decode pipeline for all its shards
    (`DecodeFeed`)."""

    def __init__(self, blob: dict[str, Any], spec: FeedSpec) -> None:
        self.start_feed(spec.manifest, spec.transform, spec.batch_size, device=spec.device,
                        threads=spec.threads, decode_cpus=spec.decode_cpus,
                        demo_root=spec.demo_root, prefetch=spec.prefetch)
        self.runner = runner_from_blob(blob, spec.specs, spec.collection, spec.device,
                                       spec.batch_size, spec.compile)

    def run(self, start: int, stop: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """(state, marker info) of shard [start, stop)."""
        from pipeline.models.precision import current

        self.take(start, stop)
        result, info = run_unit(self.runner, self.batches)
        return result.state(), {"start": start, "stop": stop, **info, "precision": current()}
