"""Benchmark: where the time goes, from image files to accumulator state, in one process.

    python -m jobs.bench                         # demo data, resnet34 width 16, 64x64 crops
    python -m jobs.bench --images 512 --json     # last line: one JSON object
    python -m jobs.bench --width 64 --resize 256 --crop 224 --device cuda
    python -m jobs.bench --synthetic 5000 --images 5000 --device cuda --json   # ImageNet-size JPEGs

On the same images and model it times:
* decode: files to model-ready uint8 batches on the device (`pipeline.decode.Prefetcher`), with
  `--cpus` decode threads, and again with 1 and 2 threads on `--scaling-images` images so that
  scaling is visible; on CUDA also nvJPEG (`decode_jpeg(device="cuda")`) side by side;
* `forward`: the model's whole forward pass on images already in memory;
* `truncated`: the forward cut after the deepest analysed layer;
* `analysis`: what a shard worker does per batch (truncated forward, then every accumulator:
  top-k for neurons any and center, the centre mean stimulus, channel statistics; `--mean-all`
  adds the channel-wide mean) on images in memory;
* `end_to_end`: files to accumulator state (decode pipeline feeding the analysis);
* the accumulators alone (`AnalysisResult.update` on captured activations, ms per batch) against
  the floor of reading the same activations once (a per-channel amax).
The JSON line also holds the ratios, the projected seconds for 50,000 images, and the worker state
size for the paper layers of a full-size resnet34 (O(layers x channels x (k + RF^2))).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass

from jobs.common import BadInput, bad_input_exits, job_parser, resolve_device

PROG = "python -m jobs.bench"


@dataclass(frozen=True)
class Config:
    device: str = "auto"        # auto | cpu | cuda
    images: int = 256           # images timed per pass (cycling through the source if it has fewer)
    batch_size: int = 64        # images per forward
    model: str = "resnet34"     # architecture (random weights: speed does not depend on them)
    width: int | None = None    # base width; default the demo's (16) on demo-size crops, else 64
    layers: str = "pool1,conv3,conv7"
    top_k: int = 16
    resize: int | None = None   # default: the demo transform (72 / 64), ImageNet's on --data
    crop: int | None = None
    mean_all: bool = False
    repeats: int = 3            # timed repetitions of the in-memory passes; the best is reported
    json: bool = False
    data: str | None = None     # image files to read (folder or manifest); default the demo's val
    synthetic: int = 0          # > 0: first write this many ImageNet-size JPEGs (into --data)
    cpus: int | None = None     # decode threads (and torch threads); default this process's CPUs
    scaling_images: int = 256   # images for the 1- and 2-thread decode figures

    @classmethod
    def from_args(cls, a) -> "Config":
        for name in ("images", "batch_size", "top_k", "repeats", "scaling_images"):
            if getattr(a, name) < 1:
                raise BadInput(f"--{name.replace('_', '-')} must be a positive integer, "
                               f"got {getattr(a, name)}")
        for name in ("width", "resize", "crop", "cpus"):
            v = getattr(a, name)
            if v is not None and v < 1:
                raise BadInput(f"--{name} must be a positive integer, got {v}")
        if a.synthetic < 0:
            raise BadInput(f"--synthetic must be >= 0 (0: no synthetic images), got {a.synthetic}")
        return cls(device=a.device, images=a.images, batch_size=a.batch_size, model=a.model,
                   width=a.width, layers=a.layers, top_k=a.top_k, resize=a.resize, crop=a.crop,
                   mean_all=a.mean_all, repeats=a.repeats, json=a.json, data=a.data,
                   synthetic=a.synthetic, cpus=a.cpus, scaling_images=a.scaling_images)


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
                                                            "(default: the demo's 72, else 256)")
    p.add_argument("--crop", type=int, default=None, help="centre crop side (default 64, else 224)")
    p.add_argument("--mean-all", action="store_true", help="also the channel-wide mean stimulus")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (best one counts)")
    p.add_argument("--json", action="store_true", help="print one JSON line last")
    p.add_argument("--data", default=None, help="image folder or .parquet manifest to read "
                                                "(default: the demo's validation split)")
    p.add_argument("--synthetic", type=int, default=0,
                   help="write this many synthetic JPEGs of ImageNet's size distribution into "
                        "--data (a temporary folder without it) and read those")
    p.add_argument("--cpus", type=int, default=None,
                   help="decode threads and torch threads (default: the CPUs this process may use)")
    p.add_argument("--scaling-images", type=int, default=256,
                   help="images decoded with 1 and with 2 threads (decode scaling)")
    return p


# ImageNet's validation images: ~3/4 are 500x375 or 375x500, the rest spread around 400 px;
# 1 in 100 grayscale, 1 in 1000 CMYK, 1 in 1000 a PNG named .JPEG (the decoder fallbacks).
# Content: coarse colour blocks plus noise, so that files average ~110 KB at quality 90 (ImageNet's
# validation JPEGs average ~128 KB): decode cost follows the entropy of the file.
def _synthetic_one(args: tuple[str, int, int]) -> None:
    import io

    import numpy as np
    from PIL import Image

    folder, i, seed = args
    rng = np.random.default_rng([seed, i])
    u = rng.random()
    if u < 0.6:
        w, h = 500, 375
    elif u < 0.75:
        w, h = 375, 500
    else:
        short = int(rng.integers(200, 501))
        long_ = int(min(short * rng.uniform(1.0, 1.6), 800))
        w, h = (long_, short) if rng.random() < 0.7 else (short, long_)
    small = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    img = (img + rng.normal(0, 16, img.shape)).clip(0, 255).astype(np.uint8)
    pil = Image.fromarray(img)
    buf = io.BytesIO()
    if i % 1000 == 501:
        pil.save(buf, format="PNG")
    else:
        pil.convert("L" if i % 100 == 7 else "CMYK" if i % 1000 == 13 else "RGB").save(
            buf, format="JPEG", quality=90)
    path = f"{folder}/ILSVRC2012_val_{i + 1:08d}.JPEG"
    with open(path + ".tmp", "wb") as f:
        f.write(buf.getvalue())
    os.replace(path + ".tmp", path)


def make_synthetic(folder: str, n: int, seed: int = 0) -> str:
    """Write `n` synthetic validation-style JPEGs into a local folder (kept if already there)."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.decode import default_cpus

    os.makedirs(folder, exist_ok=True)
    todo = [i for i in range(n) if not os.path.exists(f"{folder}/ILSVRC2012_val_{i + 1:08d}.JPEG")]
    with ThreadPoolExecutor(default_cpus()) as pool:   # PIL encodes without the GIL
        list(pool.map(_synthetic_one, [(folder, i, seed) for i in todo]))
    return folder


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


def _source(cfg: Config, tmp: str | None):
    """(manifest, transform, demo) for the images the benchmark reads."""
    from jobs.common import eval_transform, resolve_data

    url = cfg.data
    if cfg.synthetic:
        if url is not None and "://" in url:
            raise BadInput(f"--synthetic writes local files; --data {url} is not a local folder")
        url = make_synthetic(url or str(tmp), cfg.synthetic)
    data = resolve_data(url)
    return data.manifest, eval_transform(cfg.resize, cfg.crop, demo=data.demo), data.demo


def _decode_pass(manifest, transform, idx, batch_size: int, cpus: int, device: str,
                 nvjpeg: bool = False, keep: bool = False):
    """Seconds to turn the files `idx` into model-ready batches on `device`, and the batches."""
    import torch

    from pipeline.decode import Decoder, Prefetcher

    threads = torch.get_num_threads()
    torch.set_num_threads(cpus)
    kept = []
    try:
        with Decoder(transform, cpus=cpus, device=device, nvjpeg=nvjpeg) as dec:
            dec.load(manifest, idx[:min(len(idx), batch_size)])   # warm-up: pool, kernels
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for b in Prefetcher(manifest, dec, batch_size).run([idx]):
                if keep:
                    kept.append(b)
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0, kept
    finally:
        torch.set_num_threads(threads)


def run(cfg: Config) -> dict:
    import numpy as np
    import torch
    import torchvision

    from pipeline.analysis import AnalysisOptions, ShardRunner, layer_specs, state_nbytes
    from pipeline.decode import default_cpus
    from pipeline.demo import DEMO_CROP, DEMO_WIDTH
    from pipeline.layers import resolve_layers
    from pipeline.models import build_model
    from pipeline.preprocess import IMAGENET

    device = resolve_device(cfg.device)
    cpus = cfg.cpus or default_cpus()
    with tempfile.TemporaryDirectory(prefix="bench-synthetic-") as tmp:
        manifest, transform, demo = _source(cfg, tmp)
        width = cfg.width or (DEMO_WIDTH if transform.crop <= DEMO_CROP else 64)
        torch.manual_seed(0)
        model = build_model(cfg.model, num_classes=1000, width=width).eval()
        layers = resolve_layers(model, cfg.layers)
        specs = layer_specs(model, layers, transform.crop)
        opts = AnalysisOptions(top_k=cfg.top_k,
                               mean_neurons=("center", "all") if cfg.mean_all else ("center",))
        runner = ShardRunner(model, IMAGENET, specs, opts, device=device, batch_size=cfg.batch_size)
        bs = cfg.batch_size
        idx = np.arange(cfg.images, dtype=np.int64) % len(manifest)

        def sync():
            if device == "cuda":
                torch.cuda.synchronize()

        # --- decode: files -> model-ready batches; the host copy of it feeds the in-memory passes
        t_dec, host = _decode_pass(manifest, transform, idx, bs, cpus, "cpu", keep=True)
        skipped = sum(len(b.skipped) for b in host)
        host = [b for b in host if len(b)]
        images = torch.cat([b.images for b in host])
        indices = torch.as_tensor(np.concatenate([b.indices for b in host]), dtype=torch.int64)
        out_dev: dict = {}
        if device == "cuda":
            images = images.pin_memory()
            out_dev["decode_cpu_to_host_images_per_s"] = round(len(idx) / t_dec, 2)
            t_dec, _ = _decode_pass(manifest, transform, idx, bs, cpus, "cuda")
            t_nv, _ = _decode_pass(manifest, transform, idx, bs, cpus, "cuda", nvjpeg=True)
            out_dev["nvjpeg_decode_images_per_s"] = round(len(idx) / t_nv, 2)
        sidx = idx[:min(len(idx), cfg.scaling_images)]
        t1s, t2s = [], []
        for _ in range(cfg.repeats):    # interleaved, best of each: a loaded machine hurts both
            t1s.append(_decode_pass(manifest, transform, sidx, bs, 1, "cpu")[0])
            t2s.append(_decode_pass(manifest, transform, sidx, bs, 2, "cpu")[0])
        t1, t2 = min(t1s), min(t2s)

        batches = [(images[i:i + bs], indices[i:i + bs]) for i in range(0, len(images), bs)]

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
            for x, ix in batches:
                runner.step(res, x, ix)
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

        threads = torch.get_num_threads()
        torch.set_num_threads(cpus)
        try:
            n = len(images)
            # interleaved so that a noisy neighbour hurts both passes alike
            t_fwd, t_ana, t_trunc = best(forward), best(analysis), best(truncated)
            acc_ms, floor_ms = _accumulator_ms(runner, batches[:8], sync)

            def end_to_end(nvjpeg: bool) -> float:
                from pipeline.decode import Decoder, Prefetcher

                res = runner.new_result()
                with Decoder(transform, cpus=cpus, device=device, nvjpeg=nvjpeg) as dec:
                    dec.load(manifest, idx[:min(len(idx), bs)])
                    sync()
                    t0 = time.perf_counter()
                    for b in Prefetcher(manifest, dec, bs).run([idx]):
                        runner.step(res, b.images, b.indices)
                    sync()
                    return time.perf_counter() - t0

            t_e2e = end_to_end(False)
            if device == "cuda":
                t_e2e_nv = end_to_end(True)
                out_dev["end_to_end_nvjpeg_images_per_s"] = round(len(idx) / t_e2e_nv, 2)
        finally:
            torch.set_num_threads(threads)

    e2e = len(idx) / t_e2e
    best_e2e = max(e2e, out_dev.get("end_to_end_nvjpeg_images_per_s", 0.0))
    d1, d2 = len(sidx) / t1, len(sidx) / t2
    out = {
        "device": device, "images": n, "batch_size": bs, "model": cfg.model, "width": width,
        "crop": transform.crop, "resize": transform.resize, "layers": [s.name for s in specs],
        "top_k": cfg.top_k, "mean_all": cfg.mean_all, "threads": cpus, "cpus": cpus,
        "data": "demo" if demo else ("synthetic" if cfg.synthetic else "files"),
        "files": len(manifest), "skipped": skipped,
        "forward_images_per_s": round(n / t_fwd, 2),
        "analysis_images_per_s": round(n / t_ana, 2),
        "truncated_forward_images_per_s": round(n / t_trunc, 2),
        "ratio": round(t_fwd / t_ana, 3),
        "decode_images_per_s": round(len(idx) / t_dec, 2),
        "decode_images_per_s_cpus1": round(d1, 2),
        "decode_images_per_s_cpus2": round(d2, 2),
        "decode_scaling_2_over_1": round(d2 / d1, 3),
        "scaling_images": len(sidx),
        "end_to_end_images_per_s": round(e2e, 2),
        "accumulator_ms_per_batch": round(acc_ms, 3),
        "amax_floor_ms_per_batch": round(floor_ms, 3),
        "accumulator_over_amax_floor": round(acc_ms / max(floor_ms, 1e-9), 2),
        "accumulator_over_truncated_forward": round(acc_ms / 1e3 / (t_trunc / len(batches)), 3),
        "decode_over_analysis": round((len(idx) / t_dec) / (n / t_ana), 3),
        "end_to_end_over_analysis": round(e2e / (n / t_ana), 3),
        "projected_seconds_50k": round(50_000 / best_e2e, 1),
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                     "cuda": torch.version.cuda},
        "worker_state_bytes": state["bytes"],
        "paper_worker_state_bytes": paper_state_bytes(cfg.top_k, cfg.mean_all)["bytes"],
        **out_dev,
    }
    if device == "cuda":
        out["gpu"] = torch.cuda.get_device_name()
    return out


def _accumulator_ms(runner, batches: list, sync) -> tuple[float, float]:
    """ms per batch of `AnalysisResult.update` on captured activations, and of reading the same
    activations once (per-channel amax: the floor any accumulator pays)."""
    import torch

    captured = []
    for x, ix in batches:
        images = x.to(runner.device, non_blocking=True)
        captured.append((runner.activations(images), images, ix))
    sync()

    def accumulate() -> float:
        res = runner.new_result()
        t0 = time.perf_counter()
        with torch.no_grad():
            for acts, images, ix in captured:
                res.update(acts, images, ix)
        sync()
        return time.perf_counter() - t0

    def floor() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            for acts, _, _ in captured:
                for a in acts.values():
                    a.amax(dim=(0, 2, 3))
        sync()
        return time.perf_counter() - t0

    accumulate(), floor()   # warm-up
    acc = min(accumulate() for _ in range(2))
    flo = min(floor() for _ in range(2))
    k = max(len(captured), 1)
    return acc / k * 1e3, flo / k * 1e3


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
    print(f"decode    {res['decode_images_per_s']:10.1f} img/s  ({res['cpus']} threads; 1: "
          f"{res['decode_images_per_s_cpus1']:.1f}, 2: {res['decode_images_per_s_cpus2']:.1f}, "
          f"x{res['decode_scaling_2_over_1']:.2f})"
          + (f"; nvJPEG {res['nvjpeg_decode_images_per_s']:.1f}"
             if "nvjpeg_decode_images_per_s" in res else ""))
    print(f"end to end {res['end_to_end_images_per_s']:9.1f} img/s  (files to accumulator state; "
          f"50,000 images in {res['projected_seconds_50k']:.0f} s)")
    print(f"accumulators {res['accumulator_ms_per_batch']:.2f} ms/batch (reading the activations "
          f"once: {res['amax_floor_ms_per_batch']:.2f} ms)")
    print(f"worker state {res['worker_state_bytes'] / 2**20:.2f} MiB here; paper layers of a "
          f"full-size resnet34 at 224: {res['paper_worker_state_bytes'] / 2**20:.2f} MiB")
    if cfg.json:
        print(json.dumps(res, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
