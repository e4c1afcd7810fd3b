"""Two networks on the same images: one decode, one truncated forward per network, one update.

    runner = PairRunner((model_a, model_b), (prep_a, prep_b), (layers_a, layers_b), "cpu")
    result = AnalysisResult(plan.specs, plan.collection())    # plan: collection.ComparePlan
    for batch in batches:                       # pipeline.data.decode.Batch, one minibatch each
        runner.step(plan, result, batch.images, batch.indices, batch.labels)

Each network runs through `pipeline.models.hooks.Trace`, stopped after its deepest compared layer,
on the uint8 batch preprocessed its own way (each checkpoint carries its preprocessing). When
both networks are the same weights and preprocessing (a self-comparison of one checkpoint), B's
forward is A's: computed once. `PairFeed` is a `jobs.compare` worker's body: both models once,
ONE decoder and ONE prefetcher across its shards (files are read through pipeline.data.decode;
no Ray here), batches of exactly the minibatch size from each shard's start.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.compare.collection import ComparePlan
from pipeline.stats.analysis import AnalysisResult
from pipeline.stats.worker import DecodeFeed

__all__ = ["PairRunner", "PairFeedSpec", "PairFeed", "runner_from_blobs", "same_network"]


def same_network(blob_a: dict[str, Any], blob_b: dict[str, Any]) -> bool:
    """Whether two model blobs (`pipeline.stats.worker.model_blob`) are one network: same
    architecture, preprocessing and weights, bit for bit."""
    if (blob_a["model"], blob_a["preprocess"].keys()) != (blob_b["model"],
                                                           blob_b["preprocess"].keys()):
        return False
    pa_, pb = blob_a["preprocess"], blob_b["preprocess"]
    if any(not np.array_equal(np.asarray(pa_[k]), np.asarray(pb[k])) for k in pa_):
        return False
    sa, sb = blob_a["state_dict"], blob_b["state_dict"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class PairRunner:
    """Both networks on one device; `activations` gives each one's compared layers."""

    def __init__(self, models: tuple[nn.Module, nn.Module], preprocess: tuple[Any, Any],
                 layers: tuple[list, list], device: str = "cpu", same: bool = False):
        from pipeline.models.hooks import Trace  # noqa: F401  (fail here, not mid-run)

        self.device = torch.device(device)
        if self.device.type == "cpu":
            from pipeline.data.hostmem import keep_freed_memory

            keep_freed_memory()     # no page faults through fresh activations every batch
        self.models = tuple(m.eval().to(self.device) for m in models)
        if self.device.type == "cuda":
            self.models = tuple(m.to(memory_format=torch.channels_last) for m in self.models)
        self.preprocess = preprocess
        self.layers = layers
        self.same = same

    def _forward(self, i: int, x: Tensor) -> dict[str, Tensor]:
        from pipeline.models.hooks import Trace

        x = self.preprocess[i](x)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), Trace(self.models[i], self.layers[i]) as tr:
            tr.run(x)
        return tr.outputs

    def activations(self, images: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Each network's layer outputs for a uint8 (N, 3, H, W) batch, on the device."""
        x = images.to(self.device, non_blocking=True).float().div_(255.0)
        a = self._forward(0, x)
        return a, (a if self.same else self._forward(1, x))

    def step(self, plan: ComparePlan, result: AnalysisResult, images: Tensor,
             indices: np.ndarray, labels: np.ndarray) -> None:
        """One minibatch into `result` (an empty batch changes nothing). The activations are
        ours and done with after the update: a plan with `in_place` lets the CKA centre them."""
        if images.shape[0] == 0:
            return
        acts_a, acts_b = self.activations(images)
        # no_grad, not inference_mode: the state must stay updatable outside it (merge)
        with torch.no_grad():
            result.update(plan.acts(acts_a, acts_b), images, np.asarray(indices),
                          torch.as_tensor(np.asarray(labels), dtype=torch.int64))


def runner_from_blobs(blobs: tuple[dict, dict], layers: tuple[tuple[str, ...], tuple[str, ...]],
                      device: str = "cpu") -> PairRunner:
    """Both models of `pipeline.stats.worker.model_blob` form, rebuilt on `device`."""
    from pipeline.data.preprocess import preprocess_from_state
    from pipeline.models.checkpoint import model_from_state_dict
    from pipeline.models.layers import resolve_layers

    same = same_network(*blobs)
    models = [model_from_state_dict(b["state_dict"], b["model"]) for b in blobs]
    if same:
        models[1] = models[0]
    preps = tuple(preprocess_from_state(b["preprocess"]) for b in blobs)
    return PairRunner(tuple(models), preps,
                      tuple(resolve_layers(m, list(ls)) for m, ls in zip(models, layers)),
                      device, same)


@dataclass(frozen=True)
class PairFeedSpec:
    """What a compare worker needs besides the two model blobs (picklable, sent once)."""

    plan: ComparePlan
    manifest: Any                # pipeline.data.listing.Manifest
    transform: Any               # pipeline.data.decode.EvalTransform
    demo_root: str | None        # the demo data's root: each node makes its own copy
    device: str                  # cpu | cuda
    threads: int                 # torch threads (CPU)
    decode_cpus: int             # decode threads
    prefetch: int = 2            # decoded minibatches queued ahead of the computation


class PairFeed(DecodeFeed):
    """The body of one compare worker: both models once, one decode pipeline for its shards
    (`pipeline.stats.worker.DecodeFeed`: shards fed ahead, computed in the order fed)."""

    def __init__(self, blobs: tuple[dict, dict], spec: PairFeedSpec) -> None:
        self.spec = spec
        self.start_feed(spec.manifest, spec.transform, spec.plan.batch_size, device=spec.device,
                        threads=spec.threads, decode_cpus=spec.decode_cpus,
                        demo_root=spec.demo_root, prefetch=spec.prefetch)
        self.runner = runner_from_blobs(blobs, (spec.plan.layers,) * 2, spec.device)

    def run(self, start: int, stop: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """(state, marker info) of shard [start, stop), which must start a minibatch."""
        import time

        from pipeline.models.precision import current

        plan = self.spec.plan
        if start % plan.batch_size:
            raise ValueError(f"shard {start}-{stop} does not start a minibatch of "
                             f"{plan.batch_size}")
        self.take(start, stop)
        result, skipped, wait = AnalysisResult(plan.specs, plan.collection()), [], 0.0
        while True:
            t = time.perf_counter()
            batch = next(self.batches)
            wait += time.perf_counter() - t
            skipped += [list(s) for s in batch.skipped]
            self.runner.step(plan, result, batch.images, batch.indices, batch.labels)
            if batch.last:
                break
        return result.state(), {"start": start, "stop": stop, "images": result.images,
                                "skipped": skipped, "decode_wait_seconds": round(wait, 3),
                                "precision": current()}
