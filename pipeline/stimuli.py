"""Top-k stimulus patches: cut the RF squares of the final top-k from their images, as PNG.

Pure compute on decoded images (the job reads them): rows are grouped per image so that each
image is decoded once, and per patch size so that one `cut_patches` gather serves many rows.

    groups = image_groups(topk_table, parts=8)         # [array of image_index, ...]
    pngs = render_rows(rows_of_group, batch.images, batch.indices)   # {row id: PNG bytes}
    table = with_patches(topk_table, pngs)             # stimuli/topk.parquet (DESIGN.md)
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from .analysis import TOPK_GEOMETRY_SCHEMA
from .geometry import cut_patches
from .images import png_bytes

__all__ = ["TOPK_TABLE_SCHEMA", "image_groups", "render_rows", "with_patches"]

TOPK_TABLE_SCHEMA = pa.schema(list(TOPK_GEOMETRY_SCHEMA) + [("patch", pa.binary())])


def image_groups(topk: pa.Table, parts: int) -> list[np.ndarray]:
    """The distinct image_index values of `topk`, sorted, cut into <= `parts` contiguous groups."""
    ids = np.unique(topk.column("image_index").to_numpy())
    if ids.size == 0:
        return []
    return [g for g in np.array_split(ids, max(1, min(parts, ids.size))) if g.size]


def render_rows(rows: pa.Table, images: Tensor, indices: np.ndarray) -> dict[int, bytes]:
    """PNG of every row of `rows` (columns row, image_index, top, left, size) from `images`.

    images: uint8 (N, 3, H, W) whose image_index values are `indices`. A row whose image is
    missing (unreadable since the analysis) gets no entry.
    """
    pos = {int(i): k for k, i in enumerate(np.asarray(indices))}
    row_ids = rows.column("row").to_numpy()
    img = rows.column("image_index").to_numpy()
    tops, lefts = rows.column("top").to_numpy(), rows.column("left").to_numpy()
    sizes = rows.column("size").to_numpy()
    out: dict[int, bytes] = {}
    for size in np.unique(sizes):
        sel = np.nonzero((sizes == size) & np.isin(img, list(pos)))[0]
        if sel.size == 0:
            continue
        which = torch.as_tensor([pos[int(i)] for i in img[sel]], dtype=torch.int64)
        patches, _ = cut_patches(images[which], torch.as_tensor(tops[sel]),
                                 torch.as_tensor(lefts[sel]), int(size))
        for k, r in enumerate(sel):
            # lossless: the pixels the network saw
            out[int(row_ids[r])] = png_bytes(patches[k].permute(1, 2, 0).cpu().numpy())
    return out


def with_patches(topk: pa.Table, pngs: dict[int, bytes]) -> pa.Table:
    """Append the `patch` column (row i of `topk` gets pngs[i], null if absent)."""
    col = pa.array([pngs.get(i) for i in range(topk.num_rows)], pa.binary())
    return topk.cast(TOPK_GEOMETRY_SCHEMA).append_column("patch", col)
