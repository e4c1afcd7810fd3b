"""Strict fp32 for measurements: TF32 (and oneDNN's reduced fp32 modes) off for every matmul and
convolution.

The census calls a channel inactive when its maximum is exactly 0 and the ablation compares
losses to four digits; on Ampere and later GPUs PyTorch runs cuDNN convolutions in TF32 by
default (10-bit mantissa inputs), which can turn a tiny positive activation into 0 or move a
loss in the fourth digit. `jobs.analyze` and `jobs.ablate` therefore run their workers under
`strict_fp32()` and record `setting()` in their partials' fingerprint and `current()` (as seen
inside each worker) in `run.json`.

    with strict_fp32():           # a Ray task: flags restored afterwards (workers are reused)
        ...
    set_strict_fp32()             # an actor's constructor: the actor's process stays strict
    current()                     # {"cuda.matmul": "ieee", "cudnn.conv": "ieee", ...}
    setting()                     # what strict_fp32 sets: the part of a fingerprint

Uses PyTorch's `fp32_precision` API where it exists (2.9+; mixing it with the legacy
`allow_tf32` flags raises there) and the legacy flags before it.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

__all__ = ["MODE", "current", "strict_flags", "setting", "set_strict_fp32", "restore",
           "strict_fp32", "is_strict"]

MODE = "strict-fp32"
# backends whose fp32 matmuls/convolutions may silently use a reduced-precision format
_KNOBS = ("cuda.matmul", "cudnn.conv", "cudnn.rnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn")


def _backend(path: str):
    import torch

    obj = torch.backends
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _new_api() -> bool:
    b = _backend("cuda.matmul")
    return b is not None and hasattr(b, "fp32_precision")


def _knobs() -> list[str]:
    return [k for k in _KNOBS if hasattr(_backend(k), "fp32_precision")]


def current() -> dict[str, str | bool]:
    """The precision flags in force in this process (new API: backend -> fp32_precision)."""
    import torch

    if _new_api():
        return {k: str(_backend(k).fp32_precision) for k in _knobs()}
    return {"cuda.matmul.allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn.allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def strict_flags() -> dict[str, str | bool]:
    """The flags `set_strict_fp32` sets, in the shape of `current()`."""
    if _new_api():
        return {k: "ieee" for k in _knobs()}
    return {"cuda.matmul.allow_tf32": False, "cudnn.allow_tf32": False,
            "float32_matmul_precision": "highest"}


def setting() -> dict[str, object]:
    """What the measuring jobs run under, for run.json and the partials' fingerprint."""
    return {"mode": MODE, "tf32": False, "flags": strict_flags()}


def restore(flags: dict[str, str | bool]) -> None:
    """Put back flags returned by `current()` (or `set_strict_fp32()`)."""
    import torch

    if _new_api():
        for k, v in flags.items():
            if hasattr(_backend(k), "fp32_precision"):
                _backend(k).fp32_precision = v
        return
    torch.backends.cuda.matmul.allow_tf32 = bool(flags["cuda.matmul.allow_tf32"])
    torch.backends.cudnn.allow_tf32 = bool(flags["cudnn.allow_tf32"])
    torch.set_float32_matmul_precision(str(flags["float32_matmul_precision"]))


def set_strict_fp32() -> dict[str, str | bool]:
    """Switch this process to strict fp32; returns the previous flags (for `restore`)."""
    before = current()
    restore(strict_flags())
    return before


def is_strict(flags: dict[str, str | bool] | None = None) -> bool:
    return (current() if flags is None else flags) == strict_flags()


@contextlib.contextmanager
def strict_fp32() -> Iterator[dict[str, str | bool]]:
    """Strict fp32 inside the block (yields the flags in force); the old flags come back after."""
    before = set_strict_fp32()
    try:
        yield current()
    finally:
        restore(before)
