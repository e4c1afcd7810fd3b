"""Linear CKA between every pair of layers of two networks: unbiased HSIC averaged over minibatches.

    acc = CKA([("resnet34", ["pool1", "conv3"]), ("plainnet34", ["pool1", "conv3"])])
    acc.update([x_a_pool1, x_a_conv3, x_b_pool1, x_b_conv3])   # one minibatch, (n, ...) each
    acc.merge(other)                   # sums: any split of the minibatches merged == one pass
    acc.state(); CKA.from_state(s)     # plain numpy arrays
    acc.to_table()                     # cka.parquet rows of the grids A×B, A×A, B×B

As an accumulator of a `pipeline.stats.collection.Collection` (`Use.of(CKA, net_a=..., net_b=...,
batch_size=B)`): `for_layers` makes ONE instance over every (network, layer) feature of the
batch (`pipeline.compare.scan.feature` names), whose `add` takes each Batch as one minibatch:
every image_index of the batch lies in [k·B, (k+1)·B), and no minibatch k is added twice, even
across merged shards.

For a minibatch of n >= 4 images, X is a layer's output flattened per image (n, D), K = XXᵀ with
its diagonal set to 0 (L likewise for another layer), and

    HSIC₁(K, L) = [tr(KL) + (1ᵀK1)(1ᵀL1) / ((n−1)(n−2)) − 2/(n−2) · 1ᵀKL1] / (n(n−3))

(Song et al. 2012, "Feature selection via dependence maximization", JMLR 13, eq. 5): the
U-statistic of ‖Cov(x, y)‖²_F, unbiased for every n, which Nguyen, Raghu & Kornblith 2021 ("Do
wide and deep networks learn the same things?", ICLR) average over minibatches. The table gives
each pair's mean over minibatches (unweighted) and cka = hsic_ab / sqrt(hsic_aa · hsic_bb).
A minibatch of fewer than `MIN_IMAGES` images has no estimate (n(n−3) ≤ 0) and is not counted.
The biased estimator tr(KHLH)/(n−1)² is never computed: on small minibatches it differs.

Exactness: HSIC₁ is exactly invariant to adding one vector to every row of X (each term of the
U-statistic is doubly centred), so X is centred by its minibatch mean before the Gram: the
products then stay small, without the large common part that post-ReLU features share and that
the formula would otherwise cancel. `precision="float64"` converts X to float64 (the reference);
`"float32"` multiplies in float32 (2x the speed on CPU, several times on GPUs) and converts each
Gram to float64: on centred features CKA stays within ~1e-7 of float64 (tests/pipeline/compare:
< 1e-6). Everything after the Gram (the HSIC terms, the sums over minibatches) is float64. The
sums are added in minibatch order within a shard and in shard order by the merge, so any split
agrees to ~1e-15 relative.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from pipeline.compare.scan import activations, feature, split
from pipeline.results import catalog
from pipeline.stats.collection import Accumulator, Batch, LayerSpec

__all__ = ["CKA", "Grid", "MIN_IMAGES", "PRECISIONS", "gram", "unbiased_hsic", "cka_grid",
           "minibatch_of"]

MIN_IMAGES = 4                   # n(n−3) > 0: the unbiased estimator needs 4 images
PRECISIONS = ("float64", "float32")
# Gram columns centred (and converted) at a time: few large blocks, since every small op costs a
# thread synchronisation that a busy neighbour makes expensive (measured on 2 shared cores)
_CHUNK_BYTES = 128 << 20



def _dtype(precision: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise ValueError(f"invalid precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    return torch.float64 if precision == "float64" else torch.float32


def _xxt(c: Tensor) -> Tensor:
    """c cᵀ from three products of row halves (the lower-left block is the upper-right's
    transpose): 3/4 of the multiplications of one product."""
    h = c.shape[0] // 2
    if h < 32:
        return c @ c.T
    top, bottom = c[:h], c[h:]
    k = torch.empty((c.shape[0],) * 2, dtype=c.dtype, device=c.device)
    k[:h, :h] = top @ top.T
    k[:h, h:] = top @ bottom.T
    k[h:, h:] = bottom @ bottom.T
    k[h:, :h] = k[:h, h:].T
    return k


def gram(x: Tensor, precision: str = "float64", overwrite: bool = False) -> Tensor:
    """K = X̃X̃ᵀ (n, n) float64 with a zero diagonal, X̃ = X flattened per image minus its
    minibatch mean, multiplied in `precision`.

    `overwrite` (float32 only, for a caller that owns `x` and is done with it): X is centred in
    place and multiplied whole (no copy: the fastest path); otherwise column blocks of at most
    `_CHUNK_BYTES` are converted and centred, and their products add in float64."""
    dt = _dtype(precision)
    n = x.shape[0]
    flat = x.reshape(n, -1)
    if overwrite and dt == x.dtype == torch.float32 and flat.is_contiguous():
        with torch.inference_mode(x.is_inference()):     # a Trace output may be one
            flat -= flat.mean(0)
            k = _xxt(flat).to(torch.float64)
    else:
        width = max(1, _CHUNK_BYTES // (max(n, 1) * (8 if dt == torch.float64 else 4)))
        k = torch.zeros((n, n), dtype=torch.float64, device=x.device)
        for a in range(0, flat.shape[1], width):
            block = flat[:, a:a + width].to(dt)
            block = block - block.mean(0)
            k += _xxt(block).to(torch.float64)
    k = (k + k.T) * 0.5            # a GEMM need not return both triangles bit-equal
    k.fill_diagonal_(0.0)
    return k


def unbiased_hsic(grams: Tensor) -> Tensor:
    """HSIC₁ of every pair of `grams` (M, n, n), float64 with zero diagonals: (M, M) float64.

    tr(KL) is Σ K∘L (symmetric K), 1ᵀK1 the sum of K, 1ᵀKL1 the product of the row sums: three
    small matrix products cover all M² pairs."""
    m, n, _ = grams.shape
    if n < MIN_IMAGES:
        raise ValueError(f"the unbiased HSIC needs at least {MIN_IMAGES} images, got {n}")
    flat = grams.reshape(m, n * n)
    rows = grams.sum(2)                          # K1, (M, n)
    tot = rows.sum(1)                            # 1ᵀK1, (M,)
    return (flat @ flat.T + torch.outer(tot, tot) / ((n - 1) * (n - 2))
            - (rows @ rows.T) * (2.0 / (n - 2))) / (n * (n - 3))


def cka_grid(hsic: np.ndarray) -> np.ndarray:
    """CKA of every pair from mean HSIC values (M, M): hsic_ij / sqrt(hsic_ii · hsic_jj); NaN
    where a self-HSIC is not positive (a constant layer: 0; an estimate below 0)."""
    d = np.diag(hsic).copy()
    d[~(d > 0)] = np.nan
    with np.errstate(invalid="ignore"):
        return hsic / np.sqrt(np.outer(d, d))


def minibatch_of(indices: "np.ndarray | Tensor", batch_size: int) -> int:
    """The minibatch k that every image_index of a batch lies in; ValueError when they straddle
    two (a batch must be one minibatch, never a mix)."""
    k = np.unique(np.asarray(indices, dtype=np.int64) // batch_size)
    if k.size != 1:
        raise ValueError(f"a batch spans minibatches {k.tolist()} of size {batch_size}; batches "
                         f"must be cut at multiples of the batch size")
    return int(k[0])


@dataclass(frozen=True)
class Grid:
    """What one CKA instance of a collection covers: every layer of networks A and B."""

    net_a: str
    net_b: str
    layers: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.net_a}~{self.net_b}"


class CKA(Accumulator):
    """Sums of HSIC₁ over minibatches for every pair of (network, layer) features.

    `batch_size` (collection use): the minibatch B that `add` checks each Batch against and
    records (`minibatches`); `in_place`: `add` may centre the batch's activations in place
    (the float32 path without a copy), so the collection runs CKA after every other
    accumulator of the batch."""

    kind = "cka"
    table = catalog.CKA

    def __init__(self, nets: Sequence[tuple[str, Sequence[str]]], precision: str = "float64",
                 batch_size: int | None = None, in_place: bool = False):
        _dtype(precision)
        self.nets = tuple((str(n), tuple(str(x) for x in layers)) for n, layers in nets)
        names = [n for n, _ in self.nets]
        if not 1 <= len(names) <= 2 or len(set(names)) != len(names):
            raise ValueError(f"CKA compares one or two distinct networks, got {names}")
        if batch_size is not None and batch_size < MIN_IMAGES:
            raise ValueError(f"the CKA minibatch must hold at least {MIN_IMAGES} images, got "
                             f"{batch_size}")
        self.keys = [(n, layer) for n, layers in self.nets for layer in layers]
        self.precision = precision
        self.batch_size, self.in_place = batch_size, bool(in_place)
        self.hsic = torch.zeros((len(self.keys),) * 2, dtype=torch.float64)
        self.batches = 0
        self.images = 0
        self.minibatches: list[int] = []     # minibatch k of every Batch added (any size)

    @classmethod
    def for_layers(cls, layers: Sequence[LayerSpec], *, net_a: str, net_b: str,
                   batch_size: int, precision: str = "float64", in_place: bool = False
                   ) -> list[tuple[Grid, "CKA"]]:
        """One instance over A's and B's layers (`feature` names, each layer under both)."""
        names = [split(s.name) for s in layers]
        ours = tuple(layer for net, layer in names if net == net_a)
        grid = Grid(net_a, net_b, ours)
        return [(grid, cls([(net_a, ours), (net_b, ours)], precision, batch_size, in_place))]

    def add(self, batch: Batch, grid: Grid) -> None:
        """One Batch = one minibatch (checked against `batch_size`)."""
        if self.batch_size is not None and batch.n:
            k = minibatch_of(batch.index.tensor.numpy(), self.batch_size)
            if k in self.minibatches:
                raise ValueError(f"minibatch {k} added twice")
            self.minibatches.append(k)
        self.update([activations(batch, feature(n, layer)) for n, layer in self.keys],
                    overwrite=self.in_place)

    def rows(self, model: str, grid: Grid) -> pa.Table:
        return self.to_table()

    def update(self, features: Sequence[Tensor], overwrite: bool = False) -> bool:
        """One minibatch: a feature tensor (n, ...) per key, in `keys` order. Returns whether it
        counted (n >= MIN_IMAGES). `overwrite`: the caller is done with the tensors, which may be
        centred in place (`gram`); one tensor given for several keys gets one Gram."""
        if len(features) != len(self.keys):
            raise ValueError(f"expected {len(self.keys)} feature tensors, got {len(features)}")
        n = int(features[0].shape[0])
        if any(int(f.shape[0]) != n for f in features):
            raise ValueError("every feature tensor of a minibatch must hold the same images")
        if n < MIN_IMAGES:
            return False
        grams: dict[int, Tensor] = {}
        for f in features:
            if id(f) not in grams:
                grams[id(f)] = gram(f, self.precision, overwrite)
        h = unbiased_hsic(torch.stack([grams[id(f)] for f in features]))
        self.hsic = self.hsic.to(h.device) + h
        self.batches += 1
        self.images += n
        return True

    def merge(self, other: "CKA") -> "CKA":
        if (other.nets, other.precision, other.batch_size) != (self.nets, self.precision,
                                                                self.batch_size):
            raise ValueError("cannot merge CKA sums of other networks, layers, precision or "
                             "minibatch size")
        if set(self.minibatches) & set(other.minibatches):
            raise ValueError("the two results share minibatches: a shard counted twice")
        self.hsic = self.hsic + other.hsic.to(self.hsic.device)
        self.batches += other.batches
        self.images += other.images
        self.minibatches = sorted(self.minibatches + other.minibatches)
        return self

    def state(self) -> dict[str, Any]:
        """Plain values: the names, each network's layers, the (M, M) float64 sums, counts."""
        return {"names": [n for n, _ in self.nets],
                "layers": {n: list(layers) for n, layers in self.nets},
                "precision": self.precision, "hsic": self.hsic.cpu().numpy(),
                "batches": self.batches, "images": self.images, "batch_size": self.batch_size,
                "in_place": self.in_place,
                "minibatches": np.asarray(self.minibatches, np.int64)}

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> "CKA":
        acc = cls([(n, s["layers"][n]) for n in s["names"]], s["precision"], s["batch_size"],
                  s["in_place"])
        acc.hsic = torch.from_numpy(np.array(s["hsic"], dtype=np.float64))
        acc.batches, acc.images = int(s["batches"]), int(s["images"])
        acc.minibatches = [int(k) for k in s["minibatches"]]
        return acc

    def mean_hsic(self) -> np.ndarray:
        """(M, M) mean HSIC₁ over the counted minibatches (NaN when none counted)."""
        h = self.hsic.cpu().numpy()
        return h / self.batches if self.batches else np.full_like(h, np.nan)

    def to_table(self) -> pa.Table:
        """The grids A×B, A×A and B×B (A×A alone for one network), rows in layer order."""
        h = self.mean_hsic()
        c = cka_grid(h)
        at = {key: i for i, key in enumerate(self.keys)}
        grids = [(0, 1), (0, 0), (1, 1)] if len(self.nets) == 2 else [(0, 0)]
        rows: dict[str, list] = {f: [] for f in self.table.schema.names}
        for ga, gb in grids:
            (na, la), (nb, lb) = self.nets[ga], self.nets[gb]
            for x in la:
                for y in lb:
                    i, j = at[(na, x)], at[(nb, y)]
                    for f, v in (("net_a", na), ("layer_a", x), ("net_b", nb), ("layer_b", y),
                                 ("cka", c[i, j]), ("hsic_ab", h[i, j]), ("hsic_aa", h[i, i]),
                                 ("hsic_bb", h[j, j]), ("n_images", self.images),
                                 ("n_batches", self.batches)):
                        rows[f].append(v)
        return pa.table(rows, schema=self.table.schema)
