"""URL strings: the one join of the project (no I/O, no fsspec).

    join("s3://bucket/run", "analysis", "resnet34")  == "s3://bucket/run/analysis/resnet34"
"""
from __future__ import annotations

__all__ = ["join"]


def join(url: str, *parts: str) -> str:
    """Join URL parts with '/', keeping the scheme (`s3://b/x` + `y` -> `s3://b/x/y`)."""
    out = url.rstrip("/")
    for p in parts:
        out += "/" + p.strip("/")
    return out
