"""Small real images for decoder tests (no pytest import: the CUDA tests run without pytest on
the GPU hosts, tests/nodes.py): every kind the decoder routes differently."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def image(seed: int, h: int, w: int) -> np.ndarray:
    """Smooth + noise: JPEG-like content whose resize rounds differently somewhere."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / (5 + c) + yy / 9 + seed) * 90 + 128 for c in range(3)], -1)
    return (base + rng.normal(0, 20, (h, w, 3))).clip(0, 255).astype(np.uint8)


def encode(arr: np.ndarray, mode: str = "RGB", fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    opts = {"quality": 90, **kw} if fmt == "JPEG" else kw
    Image.fromarray(arr).convert(mode).save(buf, format=fmt, **opts)
    return buf.getvalue()


def pil_rgb(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)


KINDS = {
    "rgb": lambda a: encode(a),
    "gray": lambda a: encode(a, "L"),
    "progressive": lambda a: encode(a, progressive=True),
    "subsampling444": lambda a: encode(a, subsampling=0),
    "cmyk": lambda a: encode(a, "CMYK"),
    "png": lambda a: encode(a, fmt="PNG"),
}


def folder(path: Path, sizes=((300, 200), (64, 90), (72, 72), (120, 80), (50, 61))) -> list[bytes]:
    """Files img_00.JPEG ... of the kinds rgb, gray, cmyk, png, progressive in turn."""
    kinds = ["rgb", "gray", "cmyk", "png", "progressive"]
    blobs = []
    for i, (h, w) in enumerate(sizes):
        d = KINDS[kinds[i % len(kinds)]](image(i, h, w))
        (path / f"img_{i:02d}.JPEG").write_bytes(d)
        blobs.append(d)
    return blobs
