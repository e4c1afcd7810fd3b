"""One read of a layer's batch for the accumulators that need per-image figures, and how the
comparison names each network's layers in one `pipeline.stats.collection.Batch`.

    scan = LayerScan.of(acts)          # acts (n, C, H, W) or (n, C)
    scan = LayerScan.shared(batch, "resnet34/conv3")   # once per batch and tensor
    scan.sums, scan.lo, scan.hi        # (n, C): spatial sums (float32, kept as float64), min, max
    scan.nonnegative                   # every value >= 0 (a post-ReLU layer)

`CrossSums` (each channel's extremes, exact) and `ClassMeans` (the per-image spatial means of
max(activation, 0), which are the plain means when nothing is negative) both read it instead of
passing over the activations again: on CPU every pass over a 224-px layer costs as much as a
small matrix product. Each image's sum is a float32 sum of its H·W values (~1e-7 relative, as
`pipeline.stats.accumulators.ChannelStats` keeps them; summing with dtype=float64 would first
copy the whole layer to float64); the same image always gives the same bits, since minibatches
never depend on shards.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from pipeline.stats.collection import Batch

__all__ = ["LayerScan", "SEP", "feature", "split", "activations"]

SEP = "/"          # network and layer in one Batch: "resnet34/conv3" (names hold no "/")


def feature(net: str, layer: str) -> str:
    """The name of network `net`'s layer `layer` in a comparison's Batch and LayerSpecs."""
    if SEP in net:
        raise ValueError(f"network name {net!r} contains {SEP!r}; give names without it")
    return f"{net}{SEP}{layer}"


def split(name: str) -> tuple[str, str]:
    """(network, layer) of a `feature` name."""
    net, _, layer = name.partition(SEP)
    return net, layer


def activations(batch: "Batch", name: str) -> Tensor:
    """The batch's (n, C, H, W) activations of one `feature`."""
    return batch.scans[name].acts


@dataclass
class LayerScan:
    sums: Tensor        # (n, C) float64: each image's float32 sum over positions
    lo: Tensor          # (n, C): each image's smallest value (the activations' dtype)
    hi: Tensor          # (n, C): largest
    area: int           # positions per image (H * W)

    @classmethod
    def of(cls, acts: Tensor) -> "LayerScan":
        a = acts if acts.dim() > 2 else acts[:, :, None, None]
        f = a.flatten(2)
        return cls(f.sum(2).to(torch.float64), f.amin(2), f.amax(2), f.shape[2])

    @classmethod
    def shared(cls, batch: "Batch", name: str) -> "LayerScan":
        """The scan of a `feature`'s activations, computed once per batch for every accumulator
        (and once for one tensor under two names: a self-comparison's A and B)."""
        acts = activations(batch, name)
        return batch.shared(f"compare.scan:{id(acts)}", lambda: cls.of(acts))

    @property
    def nonnegative(self) -> bool:
        return self.lo.numel() == 0 or bool(self.lo.min() >= 0)

    @property
    def means(self) -> Tensor:
        """(n, C) float64 spatial means."""
        return self.sums / self.area
