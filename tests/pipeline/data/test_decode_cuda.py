"""nvJPEG against the CPU path on a real GPU. No Ray, moto or hypothesis here, and pytest only
if present: infra/gpu-bench.sh runs these by node id on GPU hosts that have none of them (through
tests/nodes.py). Without CUDA they skip."""
from __future__ import annotations

import torch

from pipeline.data.decode import Decoder, EvalTransform, Prefetcher, load_batch
from pipeline.data.listing import build_manifest
from tests.images import folder

SKIP = None if torch.cuda.is_available() else "needs a CUDA GPU"
try:
    import pytest

    pytestmark = pytest.mark.skipif(SKIP is not None, reason=str(SKIP))
except ImportError:     # tests/nodes.py reads SKIP
    pass

SIZES = [(300, 200), (64, 90), (72, 72), (120, 80), (50, 61), (480, 640), (480, 640), (300, 200)]


def _source(tmp_path):
    good = folder(tmp_path, SIZES)
    (tmp_path / "z_truncated.JPEG").write_bytes(good[0][: len(good[0]) // 2])
    (tmp_path / "z_text.JPEG").write_bytes(b"not an image")
    return build_manifest(str(tmp_path))


def test_cuda_nvjpeg_matches_cpu_path_and_falls_back(tmp_path):
    m = _source(tmp_path)
    tf = EvalTransform(64, 56)
    cpu = load_batch(m, range(len(m)), tf)
    with Decoder(tf, cpus=2, device="cuda", nvjpeg=True) as gpu_dec, \
            Decoder(tf, cpus=2, device="cuda") as pinned:
        gpu = gpu_dec.load(m, range(len(m)))
        host = pinned.load(m, range(len(m)))
    assert gpu.images.is_cuda and host.images.is_cuda
    assert gpu.indices.tolist() == cpu.indices.tolist() == host.indices.tolist()
    assert [s[:2] for s in gpu.skipped] == [s[:2] for s in cpu.skipped]
    assert len(cpu.skipped) == 2
    assert torch.equal(host.images.cpu(), cpu.images)              # pinned copy: same bytes
    # nvJPEG's IDCT/upsampling differ from libjpeg-turbo's by a few levels; never more.
    diff = (gpu.images.cpu().int() - cpu.images.int()).abs()
    assert diff.max().item() <= 8 and diff.float().mean().item() < 1.0
    # the CPU-routed rows (grayscale, CMYK, PNG) are the CPU path's bytes exactly
    for row in (1, 2, 3, 6):
        assert torch.equal(gpu.images[row].cpu(), cpu.images[row]), row


def test_cuda_prefetcher_streams_nvjpeg_batches(tmp_path):
    m = _source(tmp_path)
    tf = EvalTransform(64, 56)
    with Decoder(tf, cpus=2, device="cuda", nvjpeg=True) as dec:
        whole = dec.load(m, range(len(m)))
        streamed = list(Prefetcher(m, dec, batch_size=3).run([(0, 4), (4, len(m))]))
    assert all(b.images.is_cuda for b in streamed)
    assert [b.indices.tolist() for b in streamed] == [[0, 1, 2], [3], [4, 5, 6], [7]]
    assert torch.equal(torch.cat([b.images for b in streamed]), whole.images)
