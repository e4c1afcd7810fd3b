"""The analysis on a real GPU: the accumulators give the CPU's tables from the same activations,
and a worker's steady state never waits for the device. No Ray, moto or hypothesis here, and
pytest only if present: infra/gpu-bench.sh runs these by node id on GPU hosts that have none of
them (through tests/nodes.py). Without CUDA they skip."""
from __future__ import annotations

import numpy as np
import torch

from pipeline.data.preprocess import IMAGENET
from pipeline.models.layers import resolve_layers
from pipeline.models.zoo import build_model
from pipeline.stats.analysis import AnalysisOptions, AnalysisResult, ShardRunner, layer_specs

SKIP = None if torch.cuda.is_available() else "needs a CUDA GPU"
try:
    import pytest

    pytestmark = pytest.mark.skipif(SKIP is not None, reason=str(SKIP))
except ImportError:     # tests/nodes.py reads SKIP
    pass


def _model(width: int = 8):
    torch.manual_seed(0)
    model = build_model("resnet34", num_classes=10, width=width).eval()
    layers = resolve_layers(model, "pool1,conv3,conv7")
    return model, layers, layer_specs(model, layers, 64)


def _batches(n: int, size: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    return images, torch.randperm(10 * n, generator=g)[:n]


def test_cuda_analysis_equals_cpu_on_the_same_activations():
    """The same activations (computed once, on the CPU, with ties) through the accumulators on
    both devices: every top-k row, count, maximum and RF sum equal; channel sums to 1e-6 (the
    eager CPU path sums each image in float32, the GPU in float64: pipeline.stats.accumulators)."""
    model, layers, specs = _model()
    images, idx = _batches(40)
    runner = ShardRunner(model, IMAGENET, specs, AnalysisOptions(top_k=4), device="cpu",
                         batch_size=20, layers=layers)
    results = {d: AnalysisResult(specs, runner.options) for d in ("cpu", "cuda")}
    with torch.no_grad():
        for a in range(0, 40, 20):
            acts = {k: v.round(decimals=1) for k, v in runner.activations(images[a:a + 20]).items()}
            for dev, res in results.items():
                res.update({k: v.to(dev) for k, v in acts.items()}, images[a:a + 20].to(dev),
                           idx[a:a + 20])
    cpu, gpu = (results[d].tables("resnet34") for d in ("cpu", "cuda"))
    assert cpu["topk"].equals(gpu["topk"])
    assert cpu["mean"].drop(["mean"]).equals(gpu["mean"].drop(["mean"]))
    c, g = cpu["channels"], gpu["channels"]
    for col in ("images", "max", "positions", "positive", "inactive"):
        assert c[col].equals(g[col]), col
    np.testing.assert_allclose(c["sum"].to_numpy(), g["sum"].to_numpy(), rtol=1e-6)


def test_cuda_steady_state_never_waits_for_the_device():
    """After a warm-up batch, `ShardRunner.step` on device-resident batches (the Prefetcher's)
    makes no call that synchronises the host with the GPU (torch's sync debug mode raises on
    one); the state crosses to the host only in `state()`."""
    model, layers, specs = _model(width=16)
    runner = ShardRunner(model, IMAGENET, specs, AnalysisOptions(), device="cuda",
                         batch_size=32, layers=layers)
    images, idx = _batches(32 * 4 + 7, seed=1)
    images = images.cuda()
    result = runner.new_result()
    runner.step(result, images[:32], idx[:32].numpy())          # warm-up: constants, kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for a in range(32, len(images), 32):                     # the last batch is padded
            runner.step(result, images[a:a + 32], idx[a:a + 32].numpy())
    finally:
        torch.cuda.set_sync_debug_mode(0)
    state = result.state()
    assert result.images == len(images)
    assert all(isinstance(v, np.ndarray) for v in state["layers"]["conv7"]["topk"]["any"].values()
               if not isinstance(v, (int, str)))
