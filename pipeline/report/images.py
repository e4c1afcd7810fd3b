"""The report's pictures: tiles and the mosaics the figures are made of.

Pure numpy/PIL; nothing here knows about tables or HTML. PNG encode/decode is
`pipeline.results.png` (re-exported here for the report's callers). Every figure is a mosaic of equal
tiles on white, so a test can find tile i at a computable pixel position (see `mosaic`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.results.png import decode_png, png_bytes

__all__ = ["png_bytes", "decode_png", "mean_image", "difference_images", "fade", "filter_images",
           "cell_size", "fit_tile",
           "blank", "mosaic", "topk_grid", "crop_center_rf", "is_true", "Figure", "ImageSink",
           "PAD"]

PAD = 2       # pixels between tiles
_BG = 255     # white background between tiles


def mean_image(values: Any, size: int, stretch: bool = True) -> np.ndarray:
    """A mean-stimulus row (3·size·size floats, C-order (3, size, size)) -> (size, size, 3) uint8.

    The mean of many patches is close to uniform grey, so by default the finite pixels are
    stretched to the full [0, 1] range (one min/max for all three colours, which keeps hue).
    NaN pixels (never inside the image) are drawn black, as outside pixels are in RF patches.
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.size != 3 * size * size:
        raise ValueError(f"mean stimulus has {arr.size} values, expected 3*{size}*{size}")
    img = arr.reshape(3, size, size).transpose(1, 2, 0)
    finite = np.isfinite(img)
    if stretch and finite.any():
        lo, hi = float(img[finite].min()), float(img[finite].max())
        if hi - lo > 1e-8:
            img = (img - lo) / (hi - lo)
    img = np.where(finite, img, 0.0)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def difference_images(diffs: list[np.ndarray]) -> list[np.ndarray]:
    """Deviations (3, s, s) of mean stimuli from their baseline -> (s, s, 3) uint8 images at one
    common scale: 0 is grey and the largest |deviation| of them all reaches black or white.

    One scale for a layer's channels (not one each), so that a channel whose mean stimulus is
    no different from the baseline stays grey instead of being stretched into vivid noise.
    NaN pixels (never inside the image) are black.
    """
    finite = [np.abs(d[np.isfinite(d)]) for d in diffs]
    scale = max((float(f.max()) for f in finite if f.size), default=0.0)
    out = []
    for d in diffs:
        img = 0.5 + (d / (2.0 * scale) if scale > 0 else np.zeros_like(d))
        img = np.where(np.isfinite(img), img, 0.0).transpose(1, 2, 0)
        out.append((np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
    return out


def fade(tile: np.ndarray, keep: float = 0.3) -> np.ndarray:
    """A tile washed out towards white: a channel the census calls 'no structure'."""
    return (tile.astype(np.float64) * keep + 255.0 * (1 - keep) + 0.5).astype(np.uint8)


def filter_images(weight: np.ndarray) -> list[np.ndarray]:
    """First-conv weights (C, 3, k, k) -> C images (k, k, 3) uint8, zero mapped to grey.

    Each filter is scaled by its own largest |w| so that its sign structure is visible:
    pixel = 0.5 + w / (2·max|w|).
    """
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 4 or w.shape[1] != 3:
        raise ValueError(f"first-conv weight must have shape (C, 3, k, k), got {w.shape}")
    out = []
    for f in w:
        scale = np.abs(f).max()
        img = 0.5 + (f / (2.0 * scale) if scale > 0 else f * 0.0)
        out.append((np.clip(img.transpose(1, 2, 0), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
    return out


def cell_size(size: int, target: int = 56, cap: int = 112) -> int:
    """Display size of a size×size patch: an integer upscale near `target`, at most `cap`."""
    if size <= 0:
        return target
    if size >= target:
        return min(size, cap)
    return size * max(1, round(target / size))


def fit_tile(image: np.ndarray, cell: int) -> np.ndarray:
    """Resize (H, W, 3) uint8 to (cell, cell, 3): nearest when enlarging, area when shrinking."""
    h, w = image.shape[:2]
    if (h, w) == (cell, cell):
        return image
    resample = Image.NEAREST if max(h, w) <= cell else Image.BOX
    return np.asarray(Image.fromarray(image, "RGB").resize((cell, cell), resample))


def blank(cell: int, value: int = 235) -> np.ndarray:
    """A light-grey tile: 'not available' inside a figure."""
    return np.full((cell, cell, 3), value, dtype=np.uint8)


def mosaic(tiles: list[np.ndarray], cols: int, pad: int = PAD,
           labels: list[str] | None = None, label_height: int = 0) -> np.ndarray:
    """Tiles of equal shape (h, w, 3) laid out row-major in `cols` columns on white.

    Tile i's top-left corner lies at (label_height + pad + r·(h + pad + label_height),
    pad + c·(w + pad)) with r, c = divmod(i, cols); a label, when given, is drawn above it.
    """
    if not tiles:
        raise ValueError("mosaic of no tiles")
    h, w = tiles[0].shape[:2]
    cols = max(1, min(cols, len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    step_y, step_x = h + pad + label_height, w + pad
    canvas = np.full((pad + rows * step_y, pad + cols * step_x, 3), _BG, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        if tile.shape[:2] != (h, w):
            raise ValueError(f"tile {i} has shape {tile.shape[:2]}, expected {(h, w)}")
        r, c = divmod(i, cols)
        y, x = pad + r * step_y + label_height, pad + c * step_x
        canvas[y:y + h, x:x + w] = tile
    if labels and label_height:
        im = Image.fromarray(canvas)
        draw = ImageDraw.Draw(im)
        font = _font(label_height - 2)
        for i, text in enumerate(labels[:len(tiles)]):
            r, c = divmod(i, cols)
            draw.text((pad + c * step_x, pad + r * step_y), text, fill=(40, 40, 40), font=font)
        canvas = np.asarray(im)
    return canvas


def _font(px: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=max(8, px))
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def topk_grid(patches: list[bytes | None], cell: int, cols: int = 4, pad: int = 1) -> np.ndarray:
    """Up to cols·cols top-k patches (rank order) -> one grid, missing ranks light grey."""
    n = cols * cols
    tiles = [fit_tile(decode_png(p), cell) if p else blank(cell) for p in patches[:n]]
    tiles += [blank(cell)] * (n - len(tiles))
    return mosaic(tiles, cols, pad=pad)


def crop_center_rf(image: np.ndarray, rf: dict | None) -> np.ndarray:
    """Crop an actmax image to its centre neuron's receptive field (clipped to the image).

    The box is the geometry object's (`pipeline.models.geometry.RF.box` of `RF.center()`, from a
    receptive_fields.parquet row, per axis where the row has the per-axis columns). The image
    is returned whole when the geometry is unknown, larger than the image, or not local (a
    layer with `global_context` depends on every pixel, so a crop would hide what it drew).
    """
    if not rf or is_true(rf.get("global_context")):
        return image
    geo = _rf_of_row(rf)
    if geo is None or geo.size >= min(image.shape[:2]):
        return image
    top, left, size = geo.box(*geo.center())
    y0, x0 = max(0, top), max(0, left)
    y1, x1 = min(image.shape[0], top + size), min(image.shape[1], left + size)
    if y1 - y0 < 2 or x1 - x0 < 2:
        return image
    return image[y0:y1, x0:x1]


def _rf_of_row(row: dict):
    """A `pipeline.models.geometry.RF` from a receptive_fields.parquet row; None when incomplete."""
    from pipeline.models.geometry import RF

    def num(key: str, cast=int):
        v = row.get(key)
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else cast(v)

    size, jump, feat = num("rf_size"), num("jump"), num("feature_size")
    if not size or not jump or not feat or size <= 0 or feat <= 0:
        return None
    return RF(size=size, jump=jump, offset=num("offset", float) or 0.0, feature_size=feat,
              size_y=num("rf_size_y"), size_x=num("rf_size_x"), jump_x=num("jump_x"),
              offset_x=num("offset_x", float), feature_size_x=num("feature_width"))


def is_true(value: Any) -> bool:
    """True only for a true boolean: a missing flag (None, NaN after a table concat) is false."""
    return isinstance(value, (bool, np.bool_)) and bool(value)


@dataclass(frozen=True)
class Figure:
    """A PNG the report wrote: what an <img> tag needs."""
    src: str      # relative to the page
    width: int
    height: int
    alt: str


class ImageSink:
    """Collects (relative path, PNG bytes) for `render_report` to hand out section by section,
    so that a report of many layers never holds all its PNGs at once."""

    def __init__(self) -> None:
        self._pending: list[tuple[str, bytes]] = []

    def add(self, name: str, image: np.ndarray, alt: str = "") -> Figure:
        rel = f"img/{name}.png"
        self._pending.append((rel, png_bytes(image)))
        return Figure(rel, int(image.shape[1]), int(image.shape[0]), alt)

    def drain(self) -> Iterator[tuple[str, bytes]]:
        while self._pending:
            yield self._pending.pop(0)
