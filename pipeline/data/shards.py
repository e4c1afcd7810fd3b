"""Shards of a manifest: contiguous [start, stop) ranges of image_index (pure arithmetic, no I/O).

    for start, stop in shard_ranges(50_000, shards=64): ...      # sizes differ by at most one
    shard_ranges(10, shard_size=4) == [(0, 4), (4, 8), (8, 10)]

Jobs cut their units with it (jobs.analyze's shards, jobs.ablate's evaluation batches through
pipeline.ablation.noise); `pipeline.data.listing` re-exports it beside the manifest it cuts.
"""
from __future__ import annotations

import numpy as np

__all__ = ["shard_ranges"]


def shard_ranges(n: int, shards: int | None = None, shard_size: int | None = None) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges covering 0..n, deterministic.

    Exactly one of `shards` (sizes differ by at most one, larger ones first; never more shards
    than images, so none is empty) or `shard_size` (all full but the last).
    """
    if (shards is None) == (shard_size is None):
        raise ValueError("give exactly one of shards or shard_size")
    if n < 1:
        raise ValueError(f"nothing to shard: {n} images")
    if shards is not None:
        if shards < 1:
            raise ValueError(f"shards must be >= 1, got {shards}")
        k = min(shards, n)
        q, r = divmod(n, k)
        bounds = np.cumsum([0] + [q + 1] * r + [q] * (k - r))
        return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
    assert shard_size is not None
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [(a, min(a + shard_size, n)) for a in range(0, n, shard_size)]
