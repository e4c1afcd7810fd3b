"""Embedded demo data from scikit-image's bundled photographs (STUB: being written)."""
from __future__ import annotations

DEMO_IMAGE_SIZE = 72   # side of the JPEG crops written to disk
DEMO_RESIZE = 72       # evaluation transform for the demo: shorter side -> 72
DEMO_CROP = 64         # then centre crop 64
DEMO_WIDTH = 16        # base width of the demo models


def ensure_demo_data(root: str | None = None, seed: int = 0) -> str:
    raise NotImplementedError
