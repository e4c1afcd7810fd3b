"""Seed derivation: one stable integer seed from any parts, the same in every process.

    g = torch.Generator("cpu").manual_seed(derive_seed("noise", seed, image_index))

Python's `hash()` changes between processes; SHA-256 does not, so a Ray task on any node draws
the same random numbers for the same (purpose, seed, item), and results never depend on how
work was split. Used by the ablation noise and subsets and by actmax's random starts.
"""
from __future__ import annotations

import hashlib

__all__ = ["derive_seed"]


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed: the first 8 bytes (little-endian) of SHA-256 over "/".join(parts), top bit
    cleared (e.g. parts ("noise", 1, 4711) hash b"noise/1/4711")."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
