"""pipeline.results.png (PNG encode/decode, shared by stimuli, actmax, report, neuron types) and
pipeline.seeds (derive_seed, shared by ablation and actmax)."""
from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from pipeline.results.png import decode_png, png_bytes
from pipeline.seeds import derive_seed


def test_png_roundtrip_is_lossless_and_floats_are_rounded():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert (decode_png(png_bytes(img)) == img).all()
    assert decode_png(png_bytes(np.array([[[0.0, 0.5, np.nan]]]))).tolist() == [[[0, 128, 0]]]
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        png_bytes(np.zeros((3, 4, 4), np.uint8))


def test_bytes_equal_pil_defaults_and_other_modes_decode_to_rgb():
    """The bytes of every table stay what PIL's defaults wrote before the helper was shared."""
    img = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="PNG")
    assert png_bytes(img) == buf.getvalue()
    gray = io.BytesIO()
    Image.fromarray(np.full((2, 3), 77, np.uint8), "L").save(gray, format="PNG")
    assert decode_png(gray.getvalue()).tolist() == [[[77] * 3] * 3] * 2


def test_derive_seed_is_sha256_of_the_joined_parts():
    digest = hashlib.sha256(b"noise/1/4711").digest()
    assert derive_seed("noise", 1, 4711) == int.from_bytes(digest[:8], "little") & (2**63 - 1)
    assert 0 <= derive_seed("x") < 2**63 and derive_seed("a", 1) != derive_seed("a", 2)


def test_derive_seed_equals_the_copies_it_replaces():
    from pipeline.ablation import noise as ablation
    from pipeline.actmax import optimize as actmax

    for parts in (("noise", 0, 5), ("subset", 3, 17), ("actmax", 0, "conv3", 9)):
        assert derive_seed(*parts) == ablation.derive_seed(*parts) == actmax.derive_seed(*parts)
