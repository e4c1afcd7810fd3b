"""Data sources: a URL -> a manifest (image_index, path, label) -> decoded RGB crops.

STUB: the signatures below are the contract; the implementation is being written.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch


@dataclass(frozen=True)
class EvalTransform:
    resize: int = 256   # shorter side resized to this (bilinear, antialiased)
    crop: int = 224     # then a centre crop of crop x crop


@dataclass
class Manifest:
    root: str                   # dataset root URL (local path or s3://...)
    table: pa.Table             # image_index int64, path string (relative to root), label int64 (null if none)
    classes: list[str] = field(default_factory=list)   # label -> class name (synset id / folder name)

    def __len__(self) -> int:
        return self.table.num_rows

    def url(self, image_index: int) -> str:
        raise NotImplementedError

    @property
    def labels(self) -> np.ndarray:
        raise NotImplementedError


@dataclass
class Batch:
    images: torch.Tensor        # uint8 (N, 3, crop, crop) RGB; as_float() gives [0, 1]
    indices: np.ndarray         # int64 image_index of each row
    labels: np.ndarray          # int64 labels (-1 where unknown)
    skipped: list[tuple[int, str, str]]   # (image_index, path, reason) of unreadable files

    def as_float(self, device: str | torch.device = "cpu") -> torch.Tensor:
        raise NotImplementedError


def build_manifest(url: str, require_labels: bool = False) -> Manifest:
    raise NotImplementedError


def write_manifest(manifest: Manifest, url: str) -> None:
    raise NotImplementedError


def read_manifest(url: str) -> Manifest:
    raise NotImplementedError


def shard_ranges(n: int, shards: int | None = None, shard_size: int | None = None) -> list[tuple[int, int]]:
    raise NotImplementedError


def decode_image(data: bytes, transform: EvalTransform) -> torch.Tensor:
    raise NotImplementedError


def load_batch(manifest: Manifest, indices: list[int] | np.ndarray, transform: EvalTransform) -> Batch:
    raise NotImplementedError


def iter_batches(manifest: Manifest, start: int, stop: int, batch_size: int,
                 transform: EvalTransform, prefetch: int = 1) -> Iterator[Batch]:
    raise NotImplementedError
