"""Top-k stimulus patches: cut the RF squares of the final top-k from their images, as PNG.

The driver decodes each image that a top-k row points at once (`pipeline.data.decode`, a thread
pool), cuts each distinct RF square once (`pipeline.stats.patches`: every `center` row of a
layer and image shares one square, `any` rows often repeat), and has the PNGs encoded in
groups of about equal work: by `encode_groups` (jobs.analyze: Ray tasks in light workers that
import numpy and Pillow only), else here in turn.

    pngs = patch_pngs(manifest, transform, topk, threads=8)   # {row: PNG bytes}
    table = with_patches(topk, pngs)                           # stimuli/topk.parquet (DESIGN.md)
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pyarrow as pa

from pipeline.results import catalog
from pipeline.stats.patches import Piece, cut, distinct, encode, parts

__all__ = ["TOPK_TABLE_SCHEMA", "patch_pngs", "with_patches", "DECODE_CHUNK", "GROUP_PIXELS"]

TOPK_TABLE_SCHEMA = catalog.TOPK.schema
TOPK_GEOMETRY_SCHEMA = catalog.TOPK.without("patch")     # the rows before their patches
DECODE_CHUNK = 256          # images decoded (and held) at a time while the squares are cut
# PNG work per group: Pillow encodes ~50 M square pixels a second on one core of the build
# machine, so a group is ~0.5 s of work, worth a task of its own (a light worker starts in less)
GROUP_PIXELS = 25_000_000

EncodeGroups = Callable[[list[list[Piece]]], list[list[bytes]]]


def _pieces(manifest: Any, transform: Any, keys: np.ndarray, threads: int | None
            ) -> dict[int, Piece]:
    """The `Piece` of each distinct square `keys` (image_index, top, left, size), images decoded
    DECODE_CHUNK at a time; squares of images that no longer decode are left out."""
    from pipeline.data.decode import Decoder

    ids = np.unique(keys[:, 0])
    out: dict[int, Piece] = {}
    with Decoder(transform, cpus=threads) as dec:
        for a in range(0, len(ids), DECODE_CHUNK):
            batch = dec.load(manifest, ids[a:a + DECODE_CHUNK])
            images = batch.images.permute(0, 2, 3, 1).numpy()          # (N, H, W, 3) views
            pos = {int(i): k for k, i in enumerate(batch.indices)}
            for k in np.nonzero(np.isin(keys[:, 0], ids[a:a + DECODE_CHUNK]))[0]:
                i, top, left, size = (int(v) for v in keys[k])
                if i in pos:
                    out[int(k)] = cut(images[pos[i]], top, left, size)
    return out


def patch_pngs(manifest: Any, transform: Any, topk: pa.Table, *, threads: int | None = None,
               max_groups: int = 1, encode_groups: EncodeGroups | None = None
               ) -> dict[int, bytes]:
    """PNG bytes of each row of `topk` (columns image_index, top, left, size): row position ->
    bytes; a row whose image no longer decodes gets no entry. The distinct squares go in
    groups of about GROUP_PIXELS of work (at most `max_groups`) to `encode_groups` (default:
    encoded here, one after the other)."""
    if topk.num_rows == 0:
        return {}
    rows = np.stack([topk.column(c).to_numpy().astype(np.int64)
                     for c in ("image_index", "top", "left", "size")], 1)
    keys, inverse = distinct(rows)
    pieces = _pieces(manifest, transform, keys, threads)
    order = sorted(pieces)
    work = sum(p.work for p in pieces.values())
    n = max(1, min(max_groups, -(-work // GROUP_PIXELS)))
    split = [[order[k] for k in g] for g in parts([pieces[k] for k in order], n)]
    run = encode_groups or (lambda gs: [encode(g) for g in gs])
    pngs = {k: b for g, out in zip(split, run([[pieces[k] for k in g] for g in split]))
            for k, b in zip(g, out)}
    return {r: pngs[int(k)] for r, k in enumerate(inverse) if int(k) in pngs}


def with_patches(topk: pa.Table, pngs: dict[int, bytes]) -> pa.Table:
    """Append the `patch` column (row i of `topk` gets pngs[i], null if absent)."""
    col = pa.array([pngs.get(i) for i in range(topk.num_rows)], pa.binary())
    return topk.cast(TOPK_GEOMETRY_SCHEMA).append_column("patch", col)
