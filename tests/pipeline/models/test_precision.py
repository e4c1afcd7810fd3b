"""pipeline.models.precision: strict fp32 on and off, flags as torch.backends reports them."""
from __future__ import annotations

import torch

from pipeline.models import precision


def test_strict_fp32_turns_reduced_precision_off_and_restores_the_flags():
    before = precision.current()
    with precision.strict_fp32() as flags:
        assert flags == precision.strict_flags() == precision.current()
        assert precision.is_strict()
        if hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cudnn.conv,
                                                              "fp32_precision"):
            assert torch.backends.cudnn.conv.fp32_precision == "ieee"
            assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        else:
            assert not torch.backends.cudnn.allow_tf32
            assert not torch.backends.cuda.matmul.allow_tf32
    assert precision.current() == before
    old = precision.set_strict_fp32()
    try:
        assert old == before and precision.is_strict()
    finally:
        precision.restore(old)
    assert precision.current() == before
    assert precision.setting() == {"mode": "strict-fp32", "tf32": False,
                                   "flags": precision.strict_flags()}
