"""The device check: one analysis worker's path, Ray-free, timed stage by stage on this machine.

    python -m pipeline.stats.devicecheck --out ./bench-out --images 5000    # what gpu-bench.sh runs

It runs the code a Ray analysis actor runs (`pipeline.stats.worker.ShardFeed`: one decode
pipeline, the model, the accumulators) without Ray, on synthetic JPEGs of ImageNet's typical
size (`pipeline.stats.benchmark.synthetic_jpeg`: ~500x375, quality 90, 1 in 100 grayscale, 1 in
1000 CMYK, 1 in 1000 a PNG named .JPEG) made on the spot, at 224 px (shorter side 256), the
paper's layers (pool1, conv3, conv7) of a resnet34 (width 64, random weights, seed 0), strict
fp32, at batch 64 and 256. Per batch size, each stage alone on the same images:

* `read`: the files' bytes (the decoder's reader, `threads` at once);
* `decode_cpu`: bytes to 224-px uint8 crops on the CPU (libjpeg-turbo, `threads` threads);
* `decode_nvjpeg` (CUDA): the same through nvJPEG in batches, CPU fallback included;
* `preprocess`, `forward` (cut after conv7), `accumulators`, `state_to_host`: in memory, on
  the device, synchronised around each stage;
* `end_to_end`: files to accumulator state through `ShardFeed` (the actor's body) over shards
  of `shard_size` images, with its fixed costs: building the worker (model to the device,
  decoder threads) and the first batch.

The projection for 50,000 images is the worker's fixed costs plus 50,000 over the end-to-end
rate; `bottleneck` names the slowest stage. Results go to `<out>/device-check.json`; a line per
stage to stdout. Nothing here imports Ray, s3fs or anything the GPU hosts lack (torch >= 2.11,
torchvision >= 0.26, numpy, pyarrow, pillow, fsspec), and nothing is installed or downloaded.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Sequence

import numpy as np
import torch

__all__ = ["write_synthetic", "Clock", "read_seconds", "stage_seconds", "end_to_end", "check",
           "main"]

PAPER = "pool1,conv3,conv7"
IMAGES_50K = 50_000


def write_synthetic(folder: str, n: int, seed: int = 0, threads: int | None = None) -> str:
    """Write `n` synthetic validation JPEGs (`synthetic_jpeg`) into a local folder, in parallel
    (PIL and numpy release the GIL for most of the work); files already there are kept."""
    from pipeline.data.decode import default_cpus
    from pipeline.stats.benchmark import synthetic_jpeg, synthetic_name

    def write(i: int) -> None:
        path = os.path.join(folder, synthetic_name(i))
        with open(path + ".tmp", "wb") as f:
            f.write(synthetic_jpeg(i, seed))
        os.replace(path + ".tmp", path)        # a file is there whole or not at all

    os.makedirs(folder, exist_ok=True)
    todo = [i for i in range(n) if not os.path.exists(os.path.join(folder, synthetic_name(i)))]
    with ThreadPoolExecutor(threads or default_cpus()) as pool:
        list(pool.map(write, todo))
    return folder


class Clock:
    """Seconds per stage; CUDA is synchronised at both ends of each timed block, so a stage is
    charged with its own device work."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if self.cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t


def read_seconds(manifest: Any, threads: int) -> tuple[float, int]:
    """Seconds to read every file's bytes with `threads` threads, and the bytes read."""
    from pipeline.data.decode import read_file

    locs = manifest.locate(range(len(manifest)))
    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        size = sum(len(b) for b in pool.map(lambda loc: read_file(*loc), locs))
    return time.perf_counter() - t, size


def _decoded(manifest: Any, transform: Any, batch: int, threads: int, device: str,
             nvjpeg: bool) -> tuple[float, list]:
    """Seconds to decode every file into batches on `device` (after one warm-up batch), and
    the batches."""
    from pipeline.stats.benchmark import decode_seconds

    idx = np.arange(len(manifest), dtype=np.int64)
    return decode_seconds(manifest, transform, idx, batch, threads, device, nvjpeg, keep=True)


def full_batches(batches: list, size: int) -> list[tuple[torch.Tensor, np.ndarray]]:
    """The images of `batches` re-cut into batches of exactly `size` (cycling through them when
    there are fewer than `size`; image indices stay distinct), so every stage sees full
    batches, as the job's padded forward does."""
    images = torch.cat([b.images for b in batches])
    n = len(images)
    count = max(1, n // size) * size
    pos = np.arange(count, dtype=np.int64)
    images = images[torch.as_tensor(pos % n, device=images.device)]
    return [(images[a:a + size], pos[a:a + size]) for a in range(0, count, size)]


def stage_seconds(runner: Any, batches: list, repeats: int = 1) -> dict[str, float]:
    """Seconds of preprocessing, the truncated forward, the accumulators and the state's trip
    to the host over full batches of `batches` (`full_batches`: uint8 images already on the
    device), the best of `repeats` passes after a warm-up batch; `images` counts them."""
    full = full_batches(batches, runner.batch_size)
    with torch.no_grad():
        runner.step(runner.new_result(), *full[0])        # warm-up: kernels, allocator
        best: dict[str, float] = {}
        for _ in range(max(1, repeats)):
            clock, result = Clock(runner.device), runner.new_result()
            for images, indices in full:
                with clock("preprocess"):
                    x = runner.inputs(images)
                with clock("forward"):
                    acts = runner.forward(x)
                with clock("accumulators"):
                    result.update(acts, images, indices)
            with clock("state_to_host"):
                result.state()
            best = {k: min(v, best.get(k, v)) for k, v in clock.seconds.items()}
    return best | {"images": len(full) * runner.batch_size}


def end_to_end(blob: dict, feed_spec: Any, shards: Sequence[tuple[int, int]]
               ) -> dict[str, float]:
    """Files to accumulator state through `ShardFeed` (a Ray actor's body, run here without
    Ray): seconds to build the worker, to its first batch, for every shard, and per shard to
    bring the state to the host (inside `run`)."""
    from pipeline.stats.worker import ShardFeed

    t0 = time.perf_counter()
    feed = ShardFeed(blob, feed_spec)
    built = time.perf_counter()
    try:
        for a, b in shards:
            feed.feed(a, b)
        images, first = 0, None
        for a, b in shards:
            _, info = feed.run(a, b)
            images += info["images"]
            first = first if first is not None else time.perf_counter()
        if feed_spec.device == "cuda":
            torch.cuda.synchronize()
        done = time.perf_counter()
    finally:
        feed.close()
    return {"worker_start_seconds": built - t0, "first_shard_seconds": first - built,
            "seconds": done - built, "images": images}


def _versions() -> dict[str, Any]:
    import torchvision

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "torchvision": torchvision.__version__, "numpy": np.__version__,
           "cuda": torch.version.cuda, "cudnn": None}
    if torch.cuda.is_available():
        out["cudnn"] = torch.backends.cudnn.version()
    return out


def _rates(seconds: dict[str, float], images: int) -> dict[str, float]:
    return {k: round(images / v, 1) for k, v in seconds.items() if v > 0}


def check(manifest: Any, device: str = "auto", batches: Sequence[int] = (64, 256),
          threads: int | None = None, shard_size: int = 2000, width: int = 64,
          repeats: int = 1, log=print) -> dict[str, Any]:
    """Every figure of the device check on the images of `manifest` (module docstring)."""
    from pipeline.data.decode import EvalTransform, default_cpus
    from pipeline.models.precision import current, set_strict_fp32

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    cpus = threads or default_cpus()
    decode_threads = min(8, cpus) if dev == "cuda" else max(1, cpus // 4)
    torch_threads = 1 if dev == "cuda" else max(1, cpus - decode_threads)
    set_strict_fp32()
    transform = EvalTransform(256, 224)
    n = len(manifest)
    out: dict[str, Any] = {
        "device": dev, "gpu": torch.cuda.get_device_name() if dev == "cuda" else None,
        "cpus": cpus, "decode_threads": decode_threads, "torch_threads": torch_threads,
        "images": n, "model": "resnet34", "width": width, "layers": PAPER.split(","),
        "crop": 224, "resize": 256, "precision": current(), "versions": _versions(),
        "shard_size": shard_size, "batch": {}}
    t_read, size = read_seconds(manifest, decode_threads)
    out["read"] = {"images_per_s": round(n / t_read, 1), "mb_per_s": round(size / t_read / 1e6, 1),
                   "mean_file_kb": round(size / n / 1e3, 1)}
    log(f"read          {n / t_read:10.1f} img/s  ({size / t_read / 1e6:.0f} MB/s, "
        f"{decode_threads} threads)")
    for bs in batches:
        out["batch"][str(bs)] = _one_batch_size(manifest, transform, dev, bs, decode_threads,
                                                torch_threads, width, shard_size, repeats, log)
    best = max(out["batch"].values(), key=lambda r: r["end_to_end"]["images_per_s"])
    out["best_batch_size"] = best["batch_size"]
    out["projected_seconds_50k"] = best["projected_seconds_50k"]
    out["bottleneck"] = best["bottleneck"]
    log(f"50,000 images: {out['projected_seconds_50k']:.1f} s projected at batch "
        f"{out['best_batch_size']} (bottleneck: {out['bottleneck']})")
    return out


def _one_batch_size(manifest: Any, transform: Any, dev: str, bs: int, decode_threads: int,
                    torch_threads: int, width: int, shard_size: int, repeats: int,
                    log) -> dict[str, Any]:
    """The figures of one batch size (`check`)."""
    from pipeline.data.listing import shard_ranges
    from pipeline.data.preprocess import IMAGENET
    from pipeline.stats.worker import FeedSpec, model_blob
    from pipeline.stats.benchmark import bench_runner

    n = len(manifest)
    torch.set_num_threads(torch_threads)
    t = time.perf_counter()
    runner = bench_runner("resnet34", PAPER, transform.crop, width=width, device=dev,
                          batch_size=bs)
    blob = model_blob(runner.model.cpu(), "resnet34", IMAGENET)
    runner.model.to(runner.device)
    build = time.perf_counter() - t
    r: dict[str, Any] = {"batch_size": bs, "model_build_seconds": round(build, 3)}
    secs: dict[str, float] = {}
    secs["decode_cpu"], host = _decoded(manifest, transform, bs, decode_threads, "cpu", False)
    if dev == "cuda":
        secs["decode_nvjpeg"], batches = _decoded(manifest, transform, bs, decode_threads,
                                                  "cuda", True)
    else:
        batches = host
    stages = stage_seconds(runner, batches, repeats)
    staged = stages.pop("images")
    rates = _rates(secs, n) | _rates(stages, staged)
    spec = FeedSpec(runner.specs, runner.options, manifest, transform, None, dev, bs,
                    torch_threads, decode_threads)
    shards = shard_ranges(n, shard_size=shard_size)
    e2e = end_to_end(blob, spec, shards)
    rate = e2e["images"] / e2e["seconds"]
    fixed = build + e2e["worker_start_seconds"]
    per_shard_state = stages["state_to_host"]
    projected = fixed + IMAGES_50K / rate + per_shard_state * (-(-IMAGES_50K // shard_size))
    decode_key = "decode_nvjpeg" if dev == "cuda" else "decode_cpu"
    parts = {k: rates[k] for k in (decode_key, "preprocess", "forward", "accumulators")}
    r |= {"images_per_s": rates, "seconds": {k: round(v, 4) for k, v in (secs | stages).items()},
          "stage_images": staged,
          "end_to_end": {"images_per_s": round(rate, 1), "images": e2e["images"],
                         "seconds": round(e2e["seconds"], 3), "shards": len(shards),
                         "worker_start_seconds": round(e2e["worker_start_seconds"], 3),
                         "first_shard_seconds": round(e2e["first_shard_seconds"], 3)},
          "fixed_seconds": round(fixed, 3), "bottleneck": min(parts, key=parts.get),
          "projected_seconds_50k": round(projected, 1)}
    for k, v in rates.items():
        log(f"batch {bs:3d}  {k:13s} {v:10.1f} img/s")
    log(f"batch {bs:3d}  end to end    {rate:10.1f} img/s  ({e2e['images']} images, "
        f"{len(shards)} shards; worker start {e2e['worker_start_seconds']:.2f} s)")
    return r


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.stats.devicecheck",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for device-check.json")
    p.add_argument("--data", help="folder of the synthetic JPEGs (made if missing; default: "
                   "$TMPDIR/preferred-stimuli-device-check)")
    p.add_argument("--images", type=int, default=5000, help="synthetic JPEGs (default 5000)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batches", default="64,256", help="batch sizes, comma separated")
    p.add_argument("--threads", type=int, help="CPUs to use (default: this process's)")
    p.add_argument("--width", type=int, default=64, help="resnet34 base width (default 64)")
    p.add_argument("--shard-size", type=int, default=2000, help="images per shard end to end")
    p.add_argument("--repeats", type=int, default=1, help="in-memory passes (best counts)")
    p.add_argument("--note", action="append", default=[], metavar="KEY=VALUE",
                   help="extra facts for the JSON (the shell script's CUDA tests, driver)")
    a = p.parse_args(argv)
    bad = [f"--{k} must be >= 1, got {v}" for k, v in (("images", a.images),
           ("shard-size", a.shard_size), ("repeats", a.repeats), ("width", a.width)) if v < 1]
    try:
        batches = [int(v) for v in a.batches.split(",") if v.strip()]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        bad.append(f"--batches must be positive integers, got {a.batches!r}")
    if a.device == "cuda" and not torch.cuda.is_available():
        bad.append("--device cuda asked for, but torch sees no CUDA device")
    if bad:
        print(f"{p.prog}: error: {bad[0]}", file=sys.stderr)
        return 2
    data = a.data or os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                  "preferred-stimuli-device-check")
    t = time.perf_counter()
    write_synthetic(data, a.images)
    made = time.perf_counter() - t
    print(f"data          {a.images} synthetic JPEGs in {data} ({made:.1f} s)", flush=True)
    from pipeline.data.listing import Manifest, build_manifest

    m = build_manifest(data)              # the folder may hold more from an earlier, bigger run
    m = Manifest(m.root, m.table.slice(0, a.images), m.classes)
    res = check(m, a.device, batches, a.threads, a.shard_size, a.width, a.repeats,
                log=lambda s: print(s, flush=True))
    res["data"] = {"folder": data, "seconds_to_make": round(made, 1)}
    res |= dict(kv.split("=", 1) for kv in a.note if "=" in kv)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "device-check.json")
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
