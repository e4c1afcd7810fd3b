"""Which channel of network B is channel i of network A: Pearson correlations from merged sums.

    acc = CrossSums("conv3", channels_a=64, channels_b=64, per="position")
    acc.update(acts_a, acts_b)         # (n, C_A, H, W) and (n, C_B, H, W) of the same images
    acc.merge(other)                   # float64 sums add; min/max exact
    acc.to_table("resnet34", "plainnet34")   # matches.parquet rows, one per channel of A

As an accumulator of a `pipeline.stats.collection.Collection` (`Use.of(CrossSums, net_a=...,
net_b=...)`): `for_layers` makes one instance per layer name that both networks have (a `Pair`
of their `LayerSpec`s; `per="image"` where their maps differ in size), and `add` reads both
networks' activations of that layer from the Batch and their shared `LayerScan`s.

A sample is one (image, spatial position) when both maps have the same size (`per="position"`),
else one image, each channel's value its spatial mean (`per="image"`). The state is the float64
sums n, Σx, Σy, Σx², Σy², Σxy (C_A × C_B), and each channel's minimum and maximum, from which

    r_ij = (Σxy/n − x̄ᵢȳⱼ) / sqrt((Σx²/n − x̄ᵢ²)(Σy²/n − ȳⱼ²))

(Li et al. 2016, "Convergent learning: do different neural networks learn the same
representations?", ICLR, match units by this correlation). A channel whose minimum equals its
maximum is constant: its r is NaN (the sums alone cannot tell a constant from rounding).
`best_b = argmax_j r` (the first on ties); `matched_b` is the one-to-one assignment maximising
Σr (`scipy.optimize.linear_sum_assignment`), where a NaN r counts as −1, so a constant channel of
B is matched only when nothing else is left; a constant channel of A takes no part and gets
nulls, as do A's channels left over when B has fewer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from pipeline.compare.scan import LayerScan, activations, feature, split
from pipeline.results import catalog
from pipeline.stats.collection import Accumulator, Batch, LayerSpec

__all__ = ["CrossSums", "Pair", "PER", "correlation", "match"]

PER = ("position", "image")
_CHUNK_ELEMENTS = 1 << 24        # float64 samples copied at a time per network (128 MiB)



def _samples(acts: Tensor, per: str, start: int, stop: int) -> Tensor:
    """Images [start, stop) as float64 (C, samples): channel-major, one copy."""
    a = acts[start:stop]
    if a.dim() == 2:                              # (n, C): one value per image
        a = a[:, :, None, None]
    if per == "image":
        return (a.sum((2, 3), dtype=torch.float64) / (a.shape[2] * a.shape[3])).T
    m, c = a.shape[:2]
    out = torch.empty((c, m, a.shape[2] * a.shape[3]), dtype=torch.float64, device=a.device)
    out.copy_(a.flatten(2).transpose(0, 1))
    return out.view(c, -1)


def _extremes(scan: LayerScan, per: str) -> tuple[Tensor, Tensor]:
    """Each channel's minimum and maximum sample (float64): over every image and position
    (exact), or over the images' spatial means (a constant channel: all means equal)."""
    if per == "image":
        return scan.means.amin(0), scan.means.amax(0)
    return scan.lo.amin(0).to(torch.float64), scan.hi.amax(0).to(torch.float64)


def correlation(n: float, sx: np.ndarray, sy: np.ndarray, sxx: np.ndarray, syy: np.ndarray,
                sxy: np.ndarray, constant_x: np.ndarray, constant_y: np.ndarray) -> np.ndarray:
    """Pearson r (C_A, C_B) from the sums; NaN in the rows / columns of constant channels."""
    with np.errstate(invalid="ignore", divide="ignore"):
        mx, my = sx / n, sy / n
        cov = sxy / n - np.outer(mx, my)
        vx = np.maximum(sxx / n - mx * mx, 0.0)
        vy = np.maximum(syy / n - my * my, 0.0)
        r = np.clip(cov / np.sqrt(np.outer(vx, vy)), -1.0, 1.0)
    r[constant_x, :] = np.nan
    r[:, constant_y] = np.nan
    return r


def match(r: np.ndarray, constant_a: np.ndarray | None = None
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(best_b, best_r, matched_b, matched_r) per row of r; -1 / NaN where there is none.
    `constant_a`: A's constant channels (default: the rows that are all NaN); they take no part
    in the assignment. Every other row does, its NaN entries counting as -1."""
    from scipy.optimize import linear_sum_assignment

    ca = r.shape[0]
    nan = np.isnan(r)
    constant_a = nan.all(1) if constant_a is None else np.asarray(constant_a, bool)
    best_b = np.full(ca, -1, np.int64)
    best_r = np.full(ca, np.nan)
    matched_b = np.full(ca, -1, np.int64)
    matched_r = np.full(ca, np.nan)
    some = np.flatnonzero(~nan.all(1) & ~constant_a)
    best_b[some] = np.nanargmax(r[some], axis=1)
    best_r[some] = r[some, best_b[some]]
    rows = np.flatnonzero(~constant_a)
    if rows.size and r.shape[1]:
        i, j = linear_sum_assignment(np.where(nan[rows], -1.0, r[rows]), maximize=True)
        matched_b[rows[i]] = j
        matched_r[rows[i]] = r[rows[i], j]
    return best_b, best_r, matched_b, matched_r


@dataclass(frozen=True)
class Pair:
    """One layer name in networks A and B: what a CrossSums instance of a collection covers."""

    net_a: str
    net_b: str
    a: LayerSpec
    b: LayerSpec

    @property
    def layer(self) -> str:
        return split(self.a.name)[1]

    @property
    def name(self) -> str:
        return f"{self.net_a}~{self.net_b}/{self.layer}"

    @property
    def per(self) -> str:
        """Samples per image and position when both maps have one size, else per image."""
        return "position" if self.a.feature_size == self.b.feature_size else "image"


class CrossSums(Accumulator):
    """Float64 sums for the Pearson correlation of every channel pair (A, B) of one layer."""

    kind = "matches"
    table = catalog.MATCHES

    def __init__(self, layer: str, channels_a: int, channels_b: int, per: str = "position"):
        if per not in PER:
            raise ValueError(f"invalid per {per!r}; allowed: {', '.join(PER)}")
        self.layer, self.per = str(layer), per
        self.channels = (int(channels_a), int(channels_b))
        ca, cb = self.channels
        self.n = 0
        self.sx, self.sxx = torch.zeros(ca, dtype=torch.float64), torch.zeros(ca, dtype=torch.float64)
        self.sy, self.syy = torch.zeros(cb, dtype=torch.float64), torch.zeros(cb, dtype=torch.float64)
        self.sxy = torch.zeros((ca, cb), dtype=torch.float64)
        self.lo = [torch.full((c,), torch.inf, dtype=torch.float64) for c in self.channels]
        self.hi = [torch.full((c,), -torch.inf, dtype=torch.float64) for c in self.channels]

    @classmethod
    def for_layers(cls, layers: Sequence[LayerSpec], *, net_a: str, net_b: str
                   ) -> list[tuple[Pair, "CrossSums"]]:
        """One instance per layer of A that B has too, in A's order."""
        by_name = {s.name: s for s in layers}
        pairs = [Pair(net_a, net_b, s, by_name[feature(net_b, split(s.name)[1])])
                 for s in layers if split(s.name)[0] == net_a
                 and feature(net_b, split(s.name)[1]) in by_name]
        return [(p, cls(p.layer, p.a.channels, p.b.channels, p.per)) for p in pairs]

    def add(self, batch: Batch, pair: Pair) -> None:
        self.update(activations(batch, pair.a.name), activations(batch, pair.b.name),
                    (LayerScan.shared(batch, pair.a.name), LayerScan.shared(batch, pair.b.name)))

    def rows(self, model: str, pair: Pair) -> pa.Table:
        return self.to_table(pair.net_a, pair.net_b)

    def _to(self, device: torch.device) -> None:
        for f in ("sx", "sxx", "sy", "syy", "sxy"):
            setattr(self, f, getattr(self, f).to(device))
        self.lo = [t.to(device) for t in self.lo]
        self.hi = [t.to(device) for t in self.hi]

    def update(self, acts_a: Tensor, acts_b: Tensor,
               scans: tuple[LayerScan, LayerScan] | None = None) -> "CrossSums":
        """One batch of the same images in both networks (any device; state follows it);
        `scans`: their `LayerScan`s when the caller has them (else they are read here)."""
        n = int(acts_a.shape[0])
        if int(acts_b.shape[0]) != n:
            raise ValueError("both networks' activations must hold the same images")
        if (acts_a.shape[1], acts_b.shape[1]) != self.channels:
            raise ValueError(f"layer {self.layer}: expected {self.channels} channels, got "
                             f"{(acts_a.shape[1], acts_b.shape[1])}")
        if self.per == "position" and acts_a.shape[2:] != acts_b.shape[2:]:
            raise ValueError(f"layer {self.layer}: maps of {tuple(acts_a.shape[2:])} and "
                             f"{tuple(acts_b.shape[2:])} differ; use per='image'")
        if n == 0:
            return self
        if self.sxy.device != acts_a.device:
            self._to(acts_a.device)
        scans = scans or (LayerScan.of(acts_a), LayerScan.of(acts_b))
        per_image = max(int(np.prod(acts_a.shape[1:])), int(np.prod(acts_b.shape[1:])), 1)
        step = max(1, _CHUNK_ELEMENTS // per_image)
        for a in range(0, n, step):
            x = _samples(acts_a, self.per, a, min(a + step, n))
            y = _samples(acts_b, self.per, a, min(a + step, n))
            self.n += x.shape[1]
            self.sx += x.sum(1)
            self.sy += y.sum(1)
            # ‖x‖² is Σx² in one read (no x*x temporary), to ~1e-16 relative
            self.sxx += torch.linalg.vector_norm(x, dim=1) ** 2
            self.syy += torch.linalg.vector_norm(y, dim=1) ** 2
            self.sxy += x @ y.T
        for k, scan in enumerate(scans):     # the extremes from the scan: no further read
            lo, hi = _extremes(scan, self.per)
            self.lo[k] = torch.minimum(self.lo[k], lo)
            self.hi[k] = torch.maximum(self.hi[k], hi)
        return self

    def merge(self, other: "CrossSums") -> "CrossSums":
        if (other.layer, other.per, other.channels) != (self.layer, self.per, self.channels):
            raise ValueError("cannot merge cross sums of another layer, channels or sampling")
        dev = self.sxy.device
        self.n += other.n
        for f in ("sx", "sxx", "sy", "syy", "sxy"):
            setattr(self, f, getattr(self, f) + getattr(other, f).to(dev))
        self.lo = [torch.minimum(a, b.to(dev)) for a, b in zip(self.lo, other.lo)]
        self.hi = [torch.maximum(a, b.to(dev)) for a, b in zip(self.hi, other.hi)]
        return self

    def state(self) -> dict[str, Any]:
        host = {f: getattr(self, f).cpu().numpy() for f in ("sx", "sxx", "sy", "syy", "sxy")}
        return {"layer": self.layer, "per": self.per, "channels": list(self.channels),
                "n": self.n, **host, "lo_a": self.lo[0].cpu().numpy(),
                "lo_b": self.lo[1].cpu().numpy(), "hi_a": self.hi[0].cpu().numpy(),
                "hi_b": self.hi[1].cpu().numpy()}

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> "CrossSums":
        acc = cls(s["layer"], *s["channels"], per=s["per"])
        acc.n = int(s["n"])
        for f in ("sx", "sxx", "sy", "syy", "sxy"):
            setattr(acc, f, torch.from_numpy(np.array(s[f], dtype=np.float64)))
        acc.lo = [torch.from_numpy(np.array(s[k], dtype=np.float64)) for k in ("lo_a", "lo_b")]
        acc.hi = [torch.from_numpy(np.array(s[k], dtype=np.float64)) for k in ("hi_a", "hi_b")]
        return acc

    def constant(self) -> tuple[np.ndarray, np.ndarray]:
        """Masks of A's and B's constant channels (every one before any sample)."""
        return tuple((lo >= hi).cpu().numpy() for lo, hi in zip(self.lo, self.hi))

    def correlation(self) -> np.ndarray:
        """r (C_A, C_B); all NaN before any sample."""
        if self.n == 0:
            return np.full(self.channels, np.nan)
        h = {f: getattr(self, f).cpu().numpy() for f in ("sx", "sxx", "sy", "syy", "sxy")}
        return correlation(float(self.n), h["sx"], h["sy"], h["sxx"], h["syy"], h["sxy"],
                           *self.constant())

    def to_table(self, net_a: str, net_b: str) -> pa.Table:
        best_b, best_r, matched_b, matched_r = match(self.correlation(), self.constant()[0])
        ca = self.channels[0]
        return pa.table({
            "net_a": pa.array([net_a] * ca, pa.string()),
            "net_b": pa.array([net_b] * ca, pa.string()),
            "layer": pa.array([self.layer] * ca, pa.string()),
            "channel_a": pa.array(np.arange(ca, dtype=np.int32)),
            "best_b": pa.array(best_b.astype(np.int32), mask=best_b < 0),
            "best_r": pa.array(best_r),
            "matched_b": pa.array(matched_b.astype(np.int32), mask=matched_b < 0),
            "matched_r": pa.array(matched_r),
            "samples": pa.array(np.full(ca, self.n, np.int64)),
            "per": pa.array([self.per] * ca, pa.string()),
        }, schema=self.table.schema)
