"""Top-k stimulus patches: cut the RF squares of the final top-k from their images, as PNG.

Pure compute on decoded images (`render_group`, a task's body, decodes them through
pipeline.data.decode): rows are grouped per image so that each image is decoded once, and per patch
size so that one `cut_patches` gather serves many rows.

    groups = image_groups(topk_table, parts=8)         # [array of image_index, ...]
    for rows in patch_groups(topk_table, parts=8):    # one task each decodes its images once
        pngs = render_rows(rows, batch.images, batch.indices)  # {row id: PNG bytes}
    table = with_patches(topk_table, pngs)             # stimuli/topk.parquet (DESIGN.md)
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from pipeline.models.geometry import cut_patches
from pipeline.results import catalog
from pipeline.results.png import png_bytes

__all__ = ["TOPK_TABLE_SCHEMA", "image_groups", "patch_groups", "render_rows",
           "render_group", "with_patches"]

TOPK_TABLE_SCHEMA = catalog.TOPK.schema
TOPK_GEOMETRY_SCHEMA = catalog.TOPK.without("patch")     # the rows before their patches


def image_groups(topk: pa.Table, parts: int) -> list[np.ndarray]:
    """The distinct image_index values of `topk`, sorted, cut into <= `parts` contiguous groups."""
    ids = np.unique(topk.column("image_index").to_numpy())
    if ids.size == 0:
        return []
    return [g for g in np.array_split(ids, max(1, min(parts, ids.size))) if g.size]


def patch_groups(topk: pa.Table, parts: int) -> list[pa.Table]:
    """The rows `render_rows` needs (row, image_index, top, left, size), one table per group of
    `image_groups`: each group is one task that decodes its images once."""
    import pyarrow.compute as pc

    rows = topk.select(["image_index", "top", "left", "size"]).append_column(
        "row", pa.array(range(topk.num_rows), pa.int64()))
    return [rows.filter(pc.is_in(rows["image_index"], pa.array(g)))
            for g in image_groups(topk, parts)]


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


def render_group(manifest: Any, transform: Any, rows: pa.Table,
                 demo_root: str | None = None) -> dict[int, bytes]:
    """A patch task's body: decode the images of `rows` (one `patch_groups` table) once through
    pipeline.data.decode, then `render_rows`. `demo_root`: make this node's copy of the demo data."""
    from pipeline.data.decode import load_batch

    if demo_root is not None:
        from pipeline.data.demo import ensure_demo_data

        ensure_demo_data(demo_root)
    batch = load_batch(manifest, sorted(set(rows.column("image_index").to_pylist())), transform)
    return render_rows(rows, batch.images, batch.indices)


def with_patches(topk: pa.Table, pngs: dict[int, bytes]) -> pa.Table:
    """Append the `patch` column (row i of `topk` gets pngs[i], null if absent)."""
    col = pa.array([pngs.get(i) for i in range(topk.num_rows)], pa.binary())
    return topk.cast(TOPK_GEOMETRY_SCHEMA).append_column("patch", col)
