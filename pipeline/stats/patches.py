"""Top-k patches as PNG, without torch: the part of rendering that a Ray task can do in a light
worker (numpy and Pillow only, so a fresh worker process starts in a fraction of a second).

A top-k row points at an RF square (top, left, size) of a decoded image, black outside it.
Many rows share a square (every `center` row of a layer and image has the same one; an `any`
row often repeats another channel's), so each distinct square is cut and encoded once:

    keys, inverse = distinct(rows)                    # rows: (R, 4) image_index, top, left, size
    pieces = [cut(images[i], t, l, s) for i, t, l, s in keys]   # in-image part, a few KB each
    pngs = encode(pieces)                             # PNG bytes per distinct square
    per_row = [pngs[k] for k in inverse]

`cut` keeps only the part of the square inside the image (an RF may be several times the
image), `encode` places it on black and writes the PNG (`pipeline.results.png`, the bytes the
analysis always wrote). `parts` splits the pieces into groups of about equal pixel work.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.results.png import png_bytes

__all__ = ["Piece", "distinct", "cut", "encode", "parts"]


@dataclass(frozen=True)
class Piece:
    """The in-image part of one RF square: `pixels` (h, w, 3) uint8 go at rows y:y+h, columns
    x:x+w of a black `size` x `size` square."""
    pixels: np.ndarray
    y: int
    x: int
    size: int

    @property
    def work(self) -> int:      # pixels the PNG encoder goes through
        return self.size * self.size


def distinct(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (image_index, top, left, size) of `rows` (R, 4) int64, sorted, and for each
    row the position of its square among them."""
    keys, inverse = np.unique(np.asarray(rows, dtype=np.int64).reshape(-1, 4), axis=0,
                              return_inverse=True)
    return keys, inverse.reshape(-1)


def cut(image: np.ndarray, top: int, left: int, size: int) -> Piece:
    """The RF square at (top, left) of an (H, W, 3) image, as its in-image part (`Piece`);
    top/left may be negative or run past the image."""
    h, w = image.shape[:2]
    y0, y1 = min(max(top, 0), h), min(max(top + size, 0), h)
    x0, x1 = min(max(left, 0), w), min(max(left + size, 0), w)
    return Piece(np.ascontiguousarray(image[y0:y1, x0:x1]), y0 - top if y1 > y0 else 0,
                 x0 - left if x1 > x0 else 0, int(size))


def encode(pieces: list[Piece]) -> list[bytes]:
    """PNG bytes of each piece's full square (black outside the image)."""
    out = []
    for p in pieces:
        square = np.zeros((p.size, p.size, 3), dtype=np.uint8)
        h, w = p.pixels.shape[:2]
        square[p.y:p.y + h, p.x:p.x + w] = p.pixels
        out.append(png_bytes(square))
    return out


def parts(pieces: list[Piece], n: int) -> list[list[int]]:
    """Positions of `pieces` in at most `n` groups of about equal work (largest first, each to
    the lightest group so far), each group in ascending order."""
    groups: list[list[int]] = [[] for _ in range(max(1, min(n, len(pieces))))]
    load = [0] * len(groups)
    for k in sorted(range(len(pieces)), key=lambda k: -pieces[k].work):
        g = load.index(min(load))
        groups[g].append(k)
        load[g] += pieces[k].work
    return [sorted(g) for g in groups if g]
