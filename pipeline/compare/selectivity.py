"""Class selectivity of every channel on the user's labels (Morcos et al. 2018).

    acc = ClassMeans("conv3", channels=64, classes=1000)
    acc.update(acts, labels)           # (n, C, H, W), int64 labels (n,), -1 = unknown (skipped)
    acc.merge(other)                   # per-class float64 sums and image counts add
    acc.to_table("resnet34")           # selectivity.parquet rows, one per channel

As an accumulator of a `pipeline.stats.collection.Collection` (`Use.of(ClassMeans,
classes=K)`): one instance per `LayerSpec` (each network's layers, `pipeline.compare.scan.feature`
names), fed the Batch's labels (`Batch.labels`; -1: unknown, skipped).

Each image contributes its spatial mean of max(activation, 0) per channel to its class: a
float32 sum over the image's positions (~1e-7 relative, like ChannelStats' mean; the same image
always gives the same bits), added per class in float64. With μ_c the class-conditional mean over the classes that have at least one image
(`n_classes` of them), μ_max the largest (`top_class`: its label, the lowest on ties) and μ_rest
the mean of the other classes' μ_c, the class selectivity index (Morcos, Barrett, Rabinowitz &
Botvinick 2018, "On the importance of single directions for generalization", ICLR) is

    selectivity = (μ_max − μ_rest) / (μ_max + μ_rest)

in [0, 1]; NaN when every μ_c is 0 (a dead channel) or fewer than two classes have images.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from pipeline.compare.scan import LayerScan, activations, split
from pipeline.results import catalog
from pipeline.stats.collection import Accumulator, Batch, LayerSpec

__all__ = ["ClassMeans", "selectivity"]



def selectivity(sums: np.ndarray, counts: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """(selectivity, top_class, μ_max, μ_rest, n_classes) per channel from per-class sums
    (K, C) and image counts (K,); top_class -1 when no class has an image."""
    present = np.flatnonzero(counts > 0)
    c = sums.shape[1]
    if present.size == 0:
        nan = np.full(c, np.nan)
        return nan, np.full(c, -1, np.int64), nan.copy(), nan.copy(), 0
    means = sums[present] / counts[present, None]                 # (k, C)
    top = means.argmax(0)                                          # first maximum: lowest label
    mu_max = means[top, np.arange(c)]
    k = present.size
    with np.errstate(invalid="ignore", divide="ignore"):
        mu_rest = (means.sum(0) - mu_max) / (k - 1) if k > 1 else np.full(c, np.nan)
        si = (mu_max - mu_rest) / (mu_max + mu_rest)
    si[~(mu_max + mu_rest > 0)] = np.nan
    return si, present[top].astype(np.int64), mu_max, mu_rest, int(k)


class ClassMeans(Accumulator):
    """Per-class sums of each channel's per-image spatial mean of max(activation, 0)."""

    kind = "selectivity"
    table = catalog.SELECTIVITY

    def __init__(self, layer: str, channels: int, classes: int):
        if classes < 1:
            raise ValueError(f"class selectivity needs at least one class, got {classes}")
        self.layer, self.channels, self.classes = str(layer), int(channels), int(classes)
        self.sums = torch.zeros((self.classes, self.channels), dtype=torch.float64)
        self.counts = torch.zeros(self.classes, dtype=torch.int64)

    @classmethod
    def build(cls, layer: LayerSpec, *, classes: int) -> "ClassMeans":
        return cls(split(layer.name)[1], layer.channels, classes)

    def add(self, batch: Batch, layer: LayerSpec) -> None:
        if batch.labels is None:
            raise ValueError("class selectivity needs the batch's labels")
        self.update(activations(batch, layer.name), batch.labels,
                    LayerScan.shared(batch, layer.name))

    def rows(self, model: str, layer: LayerSpec) -> pa.Table:
        return self.to_table(split(layer.name)[0])

    def update(self, acts: Tensor, labels: "Tensor | np.ndarray",
               scan: LayerScan | None = None) -> "ClassMeans":
        """One batch: activations (n, C, H, W) or (n, C) on any device, labels (n,); `scan`:
        their `LayerScan` when the caller has one (its means serve when nothing is negative)."""
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)
        if labels.numel() != acts.shape[0]:
            raise ValueError(f"{labels.numel()} labels for {acts.shape[0]} images")
        if acts.shape[1] != self.channels:
            raise ValueError(f"layer {self.layer}: expected {self.channels} channels, got "
                             f"{acts.shape[1]}")
        if labels.numel() and int(labels.max()) >= self.classes:
            raise ValueError(f"label {int(labels.max())} outside the {self.classes} classes")
        keep = labels >= 0
        if not bool(keep.any()):
            return self
        if scan is not None and scan.nonnegative:       # post-ReLU: max(a, 0) is a
            means = scan.means
        else:
            a = acts if acts.dim() > 2 else acts[:, :, None, None]
            means = a.clamp_min(0).sum((2, 3)).to(torch.float64) / (a.shape[2] * a.shape[3])
        dev = means.device
        if self.sums.device != dev:
            self.sums, self.counts = self.sums.to(dev), self.counts.to(dev)
        lab = labels.to(dev)[keep.to(dev)]
        self.sums.index_add_(0, lab, means[keep.to(dev)])
        self.counts += torch.bincount(lab, minlength=self.classes)
        return self

    def merge(self, other: "ClassMeans") -> "ClassMeans":
        if (other.layer, other.channels, other.classes) != (self.layer, self.channels,
                                                            self.classes):
            raise ValueError("cannot merge class means of another layer, channels or classes")
        self.sums = self.sums + other.sums.to(self.sums.device)
        self.counts = self.counts + other.counts.to(self.counts.device)
        return self

    def state(self) -> dict[str, Any]:
        return {"layer": self.layer, "channels": self.channels, "classes": self.classes,
                "sums": self.sums.cpu().numpy(), "counts": self.counts.cpu().numpy()}

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> "ClassMeans":
        acc = cls(s["layer"], s["channels"], s["classes"])
        acc.sums = torch.from_numpy(np.array(s["sums"], dtype=np.float64))
        acc.counts = torch.from_numpy(np.array(s["counts"], dtype=np.int64))
        return acc

    def to_table(self, net: str) -> pa.Table:
        counts = self.counts.cpu().numpy()
        si, top, mu_max, mu_rest, k = selectivity(self.sums.cpu().numpy(), counts)
        c = self.channels
        return pa.table({
            "net": pa.array([net] * c, pa.string()),
            "layer": pa.array([self.layer] * c, pa.string()),
            "channel": pa.array(np.arange(c, dtype=np.int32)),
            "selectivity": pa.array(si),
            "top_class": pa.array(top, mask=top < 0),
            "n_classes": pa.array(np.full(c, k, np.int64)),
            "images": pa.array(np.full(c, int(counts.sum()), np.int64)),
            "mu_max": pa.array(mu_max), "mu_rest": pa.array(mu_rest),
        }, schema=self.table.schema)
