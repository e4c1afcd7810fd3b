"""Benchmark: plain forward pass vs the full analysis pass, same process, images and model.

    python -m jobs.bench                         # demo data, resnet34 width 16, 64x64 crops
    python -m jobs.bench --images 512 --json     # last line: one JSON object
    python -m jobs.bench --width 64 --resize 256 --crop 224 --device cuda

The images are decoded once into memory (cycling through the demo's validation split when more
are asked for than it holds), so both passes time compute only: `forward` is the model's whole
forward pass; `analysis` is what a shard worker does per batch (the forward up to the deepest
analysed layer, then every accumulator: top-k for neurons any and center, the centre mean
stimulus, channel statistics; `--mean-all` adds the channel-wide mean). The ratio
analysis/forward is the price of the statistics (target >= 0.8 on CPU). The JSON line also
holds the forward up to the deepest layer alone and the worker state size for the paper layers
of a full-size resnet34 (O(layers x channels x (k + RF^2))).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

from jobs.common import BadInput, bad_input_exits, job_parser, resolve_device

PROG = "python -m jobs.bench"


@dataclass(frozen=True)
class Config:
    device: str = "auto"        # auto | cpu | cuda
    images: int = 256           # images timed per pass
    batch_size: int = 64        # images per forward
    model: str = "resnet34"     # architecture (random weights: speed does not depend on them)
    width: int | None = None    # base width; default the demo's (16) on demo-size crops, else 64
    layers: str = "pool1,conv3,conv7"
    top_k: int = 16
    resize: int | None = None   # default: the demo transform (72 / 64)
    crop: int | None = None
    mean_all: bool = False
    repeats: int = 3            # timed repetitions; the best is reported
    json: bool = False

    @classmethod
    def from_args(cls, a) -> "Config":
        for name in ("images", "batch_size", "top_k", "repeats"):
            if getattr(a, name) < 1:
                raise BadInput(f"--{name.replace('_', '-')} must be a positive integer, "
                               f"got {getattr(a, name)}")
        for name in ("width", "resize", "crop"):
            v = getattr(a, name)
            if v is not None and v < 1:
                raise BadInput(f"--{name} must be a positive integer, got {v}")
        return cls(device=a.device, images=a.images, batch_size=a.batch_size, model=a.model,
                   width=a.width, layers=a.layers, top_k=a.top_k, resize=a.resize, crop=a.crop,
                   mean_all=a.mean_all, repeats=a.repeats, json=a.json)


def build_parser():
    p = job_parser("bench", __doc__)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--images", type=int, default=256, help="images timed per pass")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--model", default="resnet34", help="architecture (random weights)")
    p.add_argument("--width", type=int, default=None,
                   help="base width (default 16 for demo-size crops, else 64)")
    p.add_argument("--layers", default="pool1,conv3,conv7", help="analysed layers")
    p.add_argument("--top-k", type=int, default=16, help="stimuli kept per channel and neuron")
    p.add_argument("--resize", type=int, default=None, help="shorter side before the crop "
                                                            "(default: the demo's 72)")
    p.add_argument("--crop", type=int, default=None, help="centre crop side (default 64)")
    p.add_argument("--mean-all", action="store_true", help="also the channel-wide mean stimulus")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (best one counts)")
    p.add_argument("--json", action="store_true", help="print one JSON line last")
    return p


def paper_state_bytes(top_k: int = 16, mean_all: bool = False) -> dict:
    """Worker state of the paper layers for a full-size resnet34 on 224 crops (no images)."""
    import torch

    from pipeline.analysis import AnalysisOptions, AnalysisResult, layer_specs, state_nbytes
    from pipeline.layers import PAPER_LAYERS, resolve_layers
    from pipeline.models import build_model

    with torch.device("meta"):
        model = build_model("resnet34")
    specs = layer_specs(model, resolve_layers(model, list(PAPER_LAYERS)), 224)
    opts = AnalysisOptions(top_k=top_k, mean_neurons=("center", "all") if mean_all else ("center",))
    res = AnalysisResult(specs, opts)
    for layer in res.layers.values():   # fill the top-k to k entries: its size once warmed up
        for acc in layer.topk.values():
            acc.update(torch.zeros(top_k, acc.channels, 1, 1), torch.arange(top_k))
    return {"bytes": state_nbytes(res.state()),
            "per_layer": {n: state_nbytes(r.state()) for n, r in res.layers.items()}}


def _load_images(n: int, transform):
    import torch

    from pipeline.demo import ensure_demo_data
    from pipeline.sources import build_manifest, load_batch

    manifest = build_manifest(ensure_demo_data() + "/val")
    have = min(n, len(manifest))
    batch = load_batch(manifest, list(range(have)), transform)
    reps = -(-n // max(len(batch.images), 1))
    images = batch.images.repeat(reps, 1, 1, 1)[:n]
    return images, torch.arange(n, dtype=torch.int64)


def run(cfg: Config) -> dict:
    import torch

    from pipeline.analysis import AnalysisOptions, ShardRunner, layer_specs, state_nbytes
    from pipeline.demo import DEMO_CROP, DEMO_RESIZE, DEMO_WIDTH
    from pipeline.layers import resolve_layers
    from pipeline.models import build_model
    from pipeline.preprocess import IMAGENET
    from pipeline.sources import EvalTransform

    device = resolve_device(cfg.device)
    transform = EvalTransform(cfg.resize or DEMO_RESIZE, cfg.crop or DEMO_CROP)
    width = cfg.width or (DEMO_WIDTH if transform.crop <= DEMO_CROP else 64)
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=1000, width=width).eval()
    layers = resolve_layers(model, cfg.layers)
    specs = layer_specs(model, layers, transform.crop)
    opts = AnalysisOptions(top_k=cfg.top_k,
                           mean_neurons=("center", "all") if cfg.mean_all else ("center",))
    images, indices = _load_images(cfg.images, transform)
    runner = ShardRunner(model, IMAGENET, specs, opts, device=device, batch_size=cfg.batch_size)
    if device == "cuda":
        images = images.pin_memory()
    bs = cfg.batch_size
    batches = [(images[i:i + bs], indices[i:i + bs]) for i in range(0, len(images), bs)]

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def forward():
        with torch.inference_mode():
            for x, _ in batches:
                runner.model(runner.preprocess(x.to(device, non_blocking=True).float().div_(255)))
        sync()

    def truncated():
        for x, _ in batches:
            runner.activations(x)
        sync()

    state = {}

    def analysis():
        res = runner.new_result()
        for x, idx in batches:
            runner.step(res, x, idx)
        sync()
        state["bytes"] = state_nbytes(res.state())

    def best(fn) -> float:
        fn()  # warm-up (allocator, kernels, first-call overheads)
        times = []
        for _ in range(cfg.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    n = len(images)
    # interleaved so that a noisy neighbour hurts both passes alike
    t_fwd, t_ana, t_trunc = best(forward), best(analysis), best(truncated)
    out = {
        "device": device, "images": n, "batch_size": bs, "model": cfg.model, "width": width,
        "crop": transform.crop, "layers": [s.name for s in specs], "top_k": cfg.top_k,
        "mean_all": cfg.mean_all, "threads": torch.get_num_threads(),
        "forward_images_per_s": round(n / t_fwd, 2),
        "analysis_images_per_s": round(n / t_ana, 2),
        "truncated_forward_images_per_s": round(n / t_trunc, 2),
        "ratio": round(t_fwd / t_ana, 3),
        "worker_state_bytes": state["bytes"],
        "paper_worker_state_bytes": paper_state_bytes(cfg.top_k, cfg.mean_all)["bytes"],
    }
    if device == "cuda":
        out["gpu"] = torch.cuda.get_device_name()
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with bad_input_exits(PROG):
        cfg = Config.from_args(args)
        res = run(cfg)
    print(f"forward   {res['forward_images_per_s']:10.1f} img/s  ({res['model']} width "
          f"{res['width']}, {res['crop']}px, batch {res['batch_size']}, {res['device']})")
    print(f"analysis  {res['analysis_images_per_s']:10.1f} img/s  (layers "
          f"{','.join(res['layers'])}, top-{res['top_k']}, every accumulator)")
    print(f"ratio     {res['ratio']:10.3f}")
    print(f"worker state {res['worker_state_bytes'] / 2**20:.2f} MiB here; paper layers of a "
          f"full-size resnet34 at 224: {res['paper_worker_state_bytes'] / 2**20:.2f} MiB")
    if cfg.json:
        print(json.dumps(res, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
