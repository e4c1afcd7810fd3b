"""PNG encode and decode: the one place where pixels become PNG bytes and back.

    data = png_bytes(rgb)          # (H, W, 3) uint8, or float in [0, 1] (NaN -> 0) -> PNG bytes
    rgb = decode_png(data)         # PNG (or any PIL-readable) bytes -> (H, W, 3) uint8 RGB

Top-k patches (`pipeline.stats.stimuli`), actmax images, the report's figures and the neuron-type
census all go through these two functions, so a patch written by the analysis decodes to
exactly the pixels the network saw. PIL's default (zlib level 6, no optimize pass) keeps the
bytes of every table identical to what the project wrote before these helpers were shared.
"""
from __future__ import annotations

import io

import numpy as np

__all__ = ["png_bytes", "decode_png"]


def png_bytes(image: np.ndarray) -> bytes:
    """(H, W, 3) RGB -> lossless PNG bytes; float images in [0, 1] are rounded to uint8."""
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = (np.clip(np.nan_to_num(image, nan=0.0), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"an RGB image is (H, W, 3), got shape {image.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG (or any PIL-readable) bytes -> (H, W, 3) uint8 RGB (gray or RGBA converted)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))
