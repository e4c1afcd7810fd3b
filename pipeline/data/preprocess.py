"""Model preprocessing: ZCA colour whitening (the paper) or ImageNet mean/std (torchvision).

Sources hand out raw RGB crops in [0, 1]; a `Preprocess` maps them into the model's input space
and back (`inverse`, for displaying activation-maximization images). A checkpoint carries its
preprocessing as `state()` and restores it with `preprocess_from_state`.

The 3x3 ZCA matrix is fitted from mergeable sums, so shards can be summed in parallel:

    stats = WhiteningStats(); stats.update(batch)        # batch: (N, 3, H, W) in [0, 1]
    stats.merge(other_stats)
    zca = stats.fit()                                    # ZCA(mean, matrix)
    x_white = zca(batch)                                 # per-pixel colour covariance ~ I
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["Preprocess", "Normalize", "ZCA", "WhiteningStats", "IMAGENET",
           "preprocess_from_state"]


class Preprocess:
    kind = "identity"

    def _constant(self, name: str, values: list, x: Tensor, shape: tuple[int, ...]) -> Tensor:
        """`values` as a tensor like `x` (dtype, device), made once per dtype and device: a new
        one per batch would copy from pageable host memory, which waits for the GPU."""
        cache = self.__dict__.setdefault("_constants", {})
        key = (name, x.dtype, x.device)
        t = cache.get(key)
        if t is None:
            t = cache[key] = torch.tensor(values, dtype=x.dtype, device=x.device).view(shape)
        return t

    def __call__(self, x: Tensor) -> Tensor:
        return x

    def inverse(self, x: Tensor) -> Tensor:
        return x

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.state()})"


class Normalize(Preprocess):
    """Per-channel (x - mean) / std, as torchvision's ImageNet checkpoints expect."""

    kind = "normalize"

    def __init__(self, mean: list[float], std: list[float]):
        self.mean = [float(v) for v in mean]
        self.std = [float(v) for v in std]

    def __call__(self, x: Tensor) -> Tensor:
        shape = (1, 3, 1, 1)
        return (x - self._constant("mean", self.mean, x, shape)) / \
            self._constant("std", self.std, x, shape)

    def inverse(self, x: Tensor) -> Tensor:
        shape = (1, 3, 1, 1)
        return x * self._constant("std", self.std, x, shape) + \
            self._constant("mean", self.mean, x, shape)

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "mean": self.mean, "std": self.std}


IMAGENET = Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


class ZCA(Preprocess):
    """Colour whitening y = W (x - mean), W = U diag(1/sqrt(λ + eps)) Uᵀ, applied per pixel."""

    kind = "zca"

    def __init__(self, mean: list[float], matrix: list[list[float]]):
        self.mean = [float(v) for v in mean]
        self.matrix = [[float(v) for v in row] for row in matrix]

    def _tensors(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return (self._constant("mean", self.mean, x, (1, 3, 1, 1)),
                self._constant("matrix", self.matrix, x, (3, 3)))

    def __call__(self, x: Tensor) -> Tensor:
        mean, w = self._tensors(x)
        return torch.einsum("ij,njhw->nihw", w, x - mean)

    def inverse(self, x: Tensor) -> Tensor:
        mean, w = self._tensors(x)
        return torch.einsum("ij,njhw->nihw", torch.linalg.inv(w), x) + mean

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "mean": self.mean, "matrix": self.matrix}


class WhiteningStats:
    """Mergeable colour moments: n, Σx (3,), Σxxᵀ (3, 3) over pixels, in float64."""

    def __init__(self) -> None:
        self.n = 0
        self.sum = np.zeros(3, dtype=np.float64)
        self.sum_outer = np.zeros((3, 3), dtype=np.float64)

    def update(self, batch: Tensor) -> "WhiteningStats":
        px = batch.detach().to(torch.float64).permute(1, 0, 2, 3).reshape(3, -1)
        self.n += px.shape[1]
        self.sum += px.sum(1).cpu().numpy()
        self.sum_outer += (px @ px.T).cpu().numpy()
        return self

    def merge(self, other: "WhiteningStats") -> "WhiteningStats":
        self.n += other.n
        self.sum += other.sum
        self.sum_outer += other.sum_outer
        return self

    def state(self) -> dict[str, Any]:
        return {"n": self.n, "sum": self.sum.tolist(), "sum_outer": self.sum_outer.tolist()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "WhiteningStats":
        s = cls()
        s.n = int(state["n"])
        s.sum = np.asarray(state["sum"], dtype=np.float64)
        s.sum_outer = np.asarray(state["sum_outer"], dtype=np.float64)
        return s

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError("whitening needs at least two pixels")
        mean = self.sum / self.n
        cov = self.sum_outer / self.n - np.outer(mean, mean)
        return mean, cov

    def fit(self, eps: float = 1e-5) -> ZCA:
        mean, cov = self.mean_cov()
        lam, u = np.linalg.eigh(cov)
        w = u @ np.diag(1.0 / np.sqrt(np.maximum(lam, 0.0) + eps)) @ u.T
        return ZCA(mean.tolist(), w.tolist())


_KINDS = {"identity": Preprocess, "normalize": Normalize, "zca": ZCA}


def preprocess_from_state(state: dict[str, Any]) -> Preprocess:
    kind = state.get("kind")
    if kind not in _KINDS:
        raise ValueError(f"unknown preprocessing {kind!r}; allowed: {', '.join(_KINDS)}")
    args = {k: v for k, v in state.items() if k != "kind"}
    return _KINDS[kind](**args)
