"""Where the time goes, from image files to accumulator state: the measurements behind jobs.bench.

No Ray and no storage of its own: files are read only through `pipeline.data.decode` (the sources),
and the synthetic JPEGs come back as bytes for the caller to write.

    runner = bench_runner("resnet34", "pool1,conv3,conv7", crop=224)   # random weights
    figures = measure(runner, manifest, transform, Timing(images=256, cpus=8))
    print("\n".join(summary_lines(figures | {"crop": 224})))

`measure` times, on the same images and model: decoding files into model-ready batches (with
`cpus` threads, then 1 and 2 threads on `scaling_images` files; on CUDA also nvJPEG), the whole
forward, the forward truncated after the deepest analysed layer, the analysis step (truncated
forward plus every accumulator), files to accumulator state end to end, and the accumulators alone
against the floor of reading the activations once (`pipeline.stats.analysis.accumulator_timing`).
In-memory passes run in turn, `repeats` rounds after a warm-up round, and each one's best counts
(a loaded machine slows some repeats, never speeds one up; running in turn, the passes meet the
same machine and the same allocator state).
`bench_actmax` measures activation maximization: all channels of a layer batched vs one channel
through the whole network.
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.stats.analysis import interleaved

__all__ = ["Timing", "synthetic_jpeg", "synthetic_name", "paper_state_bytes", "decode_seconds",
           "interleaved", "accumulator_figures", "bench_runner", "measure",
           "summary_lines", "bench_actmax"]


@dataclass(frozen=True)
class Timing:
    """How to time: the workload, the worker's share and the repetitions (jobs.bench fills it
    with jobs.analyze's defaults: batch, threads, strict fp32)."""
    images: int = 256           # images per pass (cycling through the source if it has fewer)
    batch_size: int = 64        # images per forward
    repeats: int = 3            # timed repetitions of the in-memory passes; the best counts
    threads: int = 1            # torch threads of one worker
    decode_threads: int = 1     # its decode threads
    scaling_images: int = 256   # images for the 1- and 2-thread decode figures
    device: str = "cpu"         # cpu | cuda (already resolved)


# ------------------------------------------------------------------------------ synthetic data
def synthetic_name(i: int) -> str:
    """The file name of synthetic image i (0-based): ImageNet's validation naming."""
    return f"ILSVRC2012_val_{i + 1:08d}.JPEG"


def synthetic_jpeg(i: int, seed: int = 0) -> bytes:
    """File bytes of synthetic validation image i, like ImageNet's in size and decode cost.

    ~3/4 are 500x375 or 375x500, the rest spread around 400 px; 1 in 100 grayscale, 1 in 1000
    CMYK, 1 in 1000 a PNG named .JPEG (the decoder's fallbacks). Content: coarse colour blocks
    plus noise, so that files average ~110 KB at quality 90 (ImageNet's validation JPEGs average
    ~128 KB): decode cost follows the entropy of the file.
    """
    from PIL import Image

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
    img = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC),
                     dtype=np.float32)
    img = (img + rng.normal(0, 16, img.shape)).clip(0, 255).astype(np.uint8)
    pil = Image.fromarray(img)
    buf = io.BytesIO()
    if i % 1000 == 501:
        pil.save(buf, format="PNG")
    else:
        pil.convert("L" if i % 100 == 7 else "CMYK" if i % 1000 == 13 else "RGB").save(
            buf, format="JPEG", quality=90)
    return buf.getvalue()


# ------------------------------------------------------------------------------- measurements
def paper_state_bytes(top_k: int = 16, mean_all: bool = False) -> dict[str, Any]:
    """Worker state of the paper layers for a full-size resnet34 on 224 crops (no images)."""
    from pipeline.stats.analysis import AnalysisOptions, AnalysisResult, layer_specs, state_nbytes
    from pipeline.models.layers import PAPER_LAYERS, resolve_layers
    from pipeline.models.zoo import build_model

    with torch.device("meta"):
        model = build_model("resnet34")
    specs = layer_specs(model, resolve_layers(model, list(PAPER_LAYERS)), 224)
    opts = AnalysisOptions(top_k=top_k, mean_neurons=("center", "all") if mean_all else ("center",))
    res = AnalysisResult(specs, opts)
    layers = res.by_layer()
    for accs in layers.values():   # fill the top-k to k entries: its size once warmed up
        for acc in accs.values():
            if acc.kind == "topk":
                acc.update(torch.zeros(top_k, acc.channels, 1, 1), torch.arange(top_k))
    return {"bytes": state_nbytes(res.state()),
            "per_layer": {n: sum(state_nbytes(a.state()) for a in accs.values())
                          for n, accs in layers.items()}}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def decode_seconds(manifest: Any, transform: Any, idx: np.ndarray, batch_size: int, cpus: int,
                   device: str, nvjpeg: bool = False, keep: bool = False) -> tuple[float, list]:
    """Seconds to turn the files `idx` into model-ready batches on `device` (after a warm-up
    batch: thread pool, kernels), and the batches when `keep`."""
    from pipeline.data.decode import Decoder, Prefetcher

    threads = torch.get_num_threads()
    torch.set_num_threads(cpus)
    kept = []
    try:
        with Decoder(transform, cpus=cpus, device=device, nvjpeg=nvjpeg) as dec:
            dec.load(manifest, idx[:min(len(idx), batch_size)])
            _sync(device)
            t0 = time.perf_counter()
            for b in Prefetcher(manifest, dec, batch_size).run([idx]):
                if keep:
                    kept.append(b)
            _sync(device)
            return time.perf_counter() - t0, kept
    finally:
        torch.set_num_threads(threads)


def accumulator_figures(runner: Any, batch: tuple, repeats: int) -> dict[str, float]:
    """`pipeline.stats.analysis.accumulator_timing` on the activations of one batch: the accumulators
    in a long run's steady state and on a fresh result, against one `amax` read of the same
    activations (the floor any accumulator pays)."""
    from pipeline.stats.analysis import accumulator_timing

    x, ix = batch
    images = x.to(runner.device, non_blocking=True)
    acts = runner.activations(images)
    _sync(runner.device.type)
    return accumulator_timing(runner.specs, runner.options, acts, images, ix, repeats=repeats,
                              compile=runner.compile)


def _decode_figures(manifest: Any, transform: Any, idx: np.ndarray, t: Timing
                    ) -> tuple[dict[str, Any], list]:
    """Decode throughputs (files -> batches; 1 vs 2 threads; nvJPEG on CUDA) and the host
    batches of the first pass, which feed the in-memory passes."""
    bs, dt = t.batch_size, t.decode_threads
    t_dec, host = decode_seconds(manifest, transform, idx, bs, dt, "cpu", keep=True)
    out: dict[str, Any] = {}
    if t.device == "cuda":
        out["decode_cpu_to_host_images_per_s"] = round(len(idx) / t_dec, 2)
        t_dec, _ = decode_seconds(manifest, transform, idx, bs, dt, "cuda")
        t_nv, _ = decode_seconds(manifest, transform, idx, bs, dt, "cuda", nvjpeg=True)
        out["nvjpeg_decode_images_per_s"] = round(len(idx) / t_nv, 2)
    sidx = idx[:min(len(idx), t.scaling_images)]
    t1s, t2s = [], []
    for _ in range(t.repeats):    # interleaved, best of each: a loaded machine hurts both
        t1s.append(decode_seconds(manifest, transform, sidx, bs, 1, "cpu")[0])
        t2s.append(decode_seconds(manifest, transform, sidx, bs, 2, "cpu")[0])
    d1, d2 = len(sidx) / min(t1s), len(sidx) / min(t2s)
    out |= {"decode_images_per_s": round(len(idx) / t_dec, 2),
            "decode_images_per_s_cpus1": round(d1, 2), "decode_images_per_s_cpus2": round(d2, 2),
            "decode_scaling_2_over_1": round(d2 / d1, 3), "scaling_images": len(sidx),
            "skipped": sum(len(b.skipped) for b in host)}
    return out, [b for b in host if len(b)]


def cycled(manifest: Any, n: int) -> Any:
    """The manifest's first `n` images, cycling through it when it has fewer (image_index stays
    0..n-1): the job's own reader then serves any number of benchmark images."""
    import pyarrow as pa

    from pipeline.data.listing import Manifest

    idx = np.arange(n, dtype=np.int64)
    table = manifest.table.take(pa.array(idx % len(manifest)))
    table = table.set_column(0, "image_index", pa.array(idx))
    return Manifest(manifest.root, table, manifest.classes)


def end_to_end(runner: Any, manifest: Any, transform: Any, t: Timing) -> dict[str, float]:
    """Files to accumulator state through `ShardFeed`, the body of a jobs.analyze actor (its
    decode pipeline, its model rebuilt from the blob, its threads, strict fp32), on one shard
    of `t.images` images (nvJPEG on CUDA, as there): seconds to build the worker and to run the
    shard."""
    from pipeline.stats.worker import FeedSpec, ShardFeed, model_blob

    blob = model_blob(runner.model.cpu(), runner.model.name, runner.preprocess)
    runner.model.to(runner.device)
    spec = FeedSpec(runner.specs, runner.options, cycled(manifest, t.images), transform, None,
                    t.device, t.batch_size, t.threads, t.decode_threads)
    t0 = time.perf_counter()
    feed = ShardFeed(blob, spec)
    built = time.perf_counter()
    try:
        feed.run(0, t.images)
        _sync(t.device)
        return {"worker_start": built - t0, "seconds": time.perf_counter() - built}
    finally:
        feed.close()


def _model_seconds(runner: Any, batches: list, t: Timing) -> dict[str, float]:
    """Best seconds of the whole forward, the analysis step and the truncated forward over
    `batches` in memory (interleaved, so that a noisy neighbour hurts each pass alike), and the
    worker state the analysis leaves."""
    from pipeline.stats.analysis import state_nbytes

    state = {}

    def forward() -> None:
        with torch.inference_mode():
            for x, _ in batches:
                x = x.to(runner.device, non_blocking=True).float().div_(255)
                runner.model(runner.preprocess(x))
        _sync(t.device)

    def truncated() -> None:
        for x, _ in batches:
            runner.activations(x)
        _sync(t.device)

    def analysis() -> None:      # one shard of these images: a fresh result, flushed
        res = state["result"] = runner.new_result()
        for x, ix in batches:
            runner.step(res, x, ix)
        res.flush()
        _sync(t.device)

    best = interleaved({"forward": forward, "analysis": analysis, "truncated": truncated},
                       t.repeats)
    # the state's trip to the host is once per shard (the engine saves it): not timed here
    return best | {"state_bytes": state_nbytes(state["result"].state())}


def bench_runner(model_name: str, layers: str, crop: int, top_k: int = 16,
                 mean_all: bool = False, width: int = 64, device: str = "cpu",
                 batch_size: int = 64) -> Any:
    """The analysis worker jobs.bench times: `model_name` with random weights (seed 0; `width`
    applies to ResNets), `layers` (paper names or module paths) at `crop`; ValueError lists
    what is allowed."""
    from pipeline.stats.analysis import AnalysisOptions, ShardRunner, layer_specs
    from pipeline.models.layers import resolve_layers
    from pipeline.models.zoo import build_model, width_for
    from pipeline.data.preprocess import IMAGENET

    torch.manual_seed(0)
    model = build_model(model_name, num_classes=1000, width=width_for(model_name, width))
    lays = resolve_layers(model, layers)
    opts = AnalysisOptions(top_k=top_k, mean_neurons=("center", "all") if mean_all else ("center",))
    return ShardRunner(model, IMAGENET, layer_specs(model, lays, crop), opts, device=device,
                       batch_size=batch_size, layers=lays)


def _describe(runner: Any, t: Timing) -> dict[str, Any]:
    """The JSON line's keys that name what was measured, and where."""
    import torchvision

    from pipeline.models.precision import setting

    m, o = runner.model, runner.options
    out = {"device": t.device, "batch_size": t.batch_size, "model": m.name, "width": m.width,
           "layers": [s.name for s in runner.specs], "top_k": o.top_k,
           "mean_all": "all" in o.mean_neurons, "threads": t.threads,
           "decode_threads": t.decode_threads, "precision": setting()["mode"],
           "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                        "cuda": torch.version.cuda},
           "paper_worker_state_bytes": paper_state_bytes(o.top_k, "all" in o.mean_neurons)["bytes"]}
    if t.device == "cuda":
        out["gpu"] = torch.cuda.get_device_name()
    return out


def measure(runner: Any, manifest: Any, transform: Any, t: Timing) -> dict[str, Any]:
    """Every per-image figure of jobs.bench's JSON line (its fixed costs are the job's:
    jobs/bench.py), in strict fp32 as the job's workers run."""
    from pipeline.models.precision import restore, set_strict_fp32

    idx = np.arange(t.images, dtype=np.int64) % len(manifest)
    before, threads = set_strict_fp32(), torch.get_num_threads()
    try:
        dec, host = _decode_figures(manifest, transform, idx, t)
        images = torch.cat([b.images for b in host])
        indices = torch.as_tensor(np.concatenate([b.indices for b in host]), dtype=torch.int64)
        if t.device == "cuda":
            images = images.pin_memory()
        bs, n = t.batch_size, len(images)
        batches = [(images[i:i + bs], indices[i:i + bs]) for i in range(0, n, bs)]
        torch.set_num_threads(t.threads)
        s = _model_seconds(runner, batches, t)
        acc = accumulator_figures(runner, batches[0], t.repeats)
        e2e = end_to_end(runner, manifest, transform, t)
    finally:
        torch.set_num_threads(threads)
        restore(before)
    ana, rate = n / s["analysis"], t.images / e2e["seconds"]
    return _describe(runner, t) | dec | {
        "images": n, "forward_images_per_s": round(n / s["forward"], 2),
        "analysis_images_per_s": round(ana, 2),
        "truncated_forward_images_per_s": round(n / s["truncated"], 2),
        "analysis_over_truncated_forward": round(s["truncated"] / s["analysis"], 3),
        "analysis_over_full_forward": round(s["forward"] / s["analysis"], 3),
        "end_to_end_images_per_s": round(rate, 2),
        "worker_start_seconds": round(e2e["worker_start"], 3),
        "accumulator_ms_per_batch": acc["accumulator_ms_per_batch"],
        "accumulator_cold_ms_per_batch": acc["accumulator_cold_ms_per_batch"],
        "amax_floor_ms_per_batch": acc["amax_floor_ms_per_batch"],
        "accumulator_over_amax_floor": acc["accumulator_floor_ratio"],
        "accumulator_over_truncated_forward": round(
            acc["accumulator_ms_per_batch"] / 1e3 / (s["truncated"] / len(batches)), 3),
        "decode_over_analysis": round(dec["decode_images_per_s"] / ana, 3),
        "end_to_end_over_analysis": round(rate / ana, 3),
        "worker_state_bytes": s["state_bytes"]}


def summary_lines(r: dict[str, Any]) -> list[str]:
    """The human-readable lines of a jobs.bench result (the JSON line's keys)."""
    nv = (f"; nvJPEG {r['nvjpeg_decode_images_per_s']:.1f}"
          if "nvjpeg_decode_images_per_s" in r else "")
    lines = [
        f"forward   {r['forward_images_per_s']:10.1f} img/s  ({r['model']} width {r['width']}, "
        f"{r['crop']}px, batch {r['batch_size']}, {r['threads']} threads, {r['device']}, "
        f"{r['precision']})",
        f"truncated {r['truncated_forward_images_per_s']:10.1f} img/s  (the forward cut after "
        f"{r['layers'][-1] if r['layers'] else '-'})",
        f"analysis  {r['analysis_images_per_s']:10.1f} img/s  (layers {','.join(r['layers'])}, "
        f"top-{r['top_k']}, every accumulator; x{r['analysis_over_truncated_forward']:.3f} the "
        f"truncated forward, x{r['analysis_over_full_forward']:.3f} the full one)",
        f"decode    {r['decode_images_per_s']:10.1f} img/s  ({r['decode_threads']} threads; 1: "
        f"{r['decode_images_per_s_cpus1']:.1f}, 2: {r['decode_images_per_s_cpus2']:.1f}, "
        f"x{r['decode_scaling_2_over_1']:.2f}){nv}",
        f"end to end {r['end_to_end_images_per_s']:9.1f} img/s  (files to accumulator state "
        f"through the worker's ShardFeed; worker start {r['worker_start_seconds']:.2f} s)",
        f"accumulators {r['accumulator_ms_per_batch']:.2f} ms/batch, steady state (fresh: "
        f"{r['accumulator_cold_ms_per_batch']:.2f}; reading the activations once: "
        f"{r['amax_floor_ms_per_batch']:.2f} ms, x{r['accumulator_over_amax_floor']:.2f})",
        f"worker state {r['worker_state_bytes'] / 2**20:.2f} MiB here; paper layers of a "
        f"full-size resnet34 at 224: {r['paper_worker_state_bytes'] / 2**20:.2f} MiB"]
    if "fixed_seconds" in r:
        fixed = ", ".join(f"{k} {v:.2f}" for k, v in r["fixed_seconds"].items() if v is not None)
        lines += [f"fixed     {r['fixed_seconds_50k']:10.1f} s      (50,000 images on "
                  f"{r['workers']} worker(s), {r['shards_50k']} shards: {fixed})",
                  f"50,000 images in {r['projected_seconds_50k']:.0f} s ({r['fixed_seconds_50k']:.1f} s "
                  f"fixed + {r['compute_seconds_50k']:.0f} s at the end-to-end rate)"]
    return lines


def bench_actmax(model: str = "resnet34", width: int = 64, layer: str = "conv3",
                 channels: int = 64, size: int = 224, steps: int = 31,
                 no_crop: bool = False, threads: int | None = None) -> dict[str, Any]:
    """Seconds for all `channels` of `layer` batched (forward stopped at the layer, RF window
    crop: `batched_s`, the Adam steps of a jobs.actmax task) vs ONE channel through the full
    network (batch 1, whole input, forward to the logits); `batched_over_one_channel_full` = batched / one-channel, the
    issue's "no more than about four" figure. Where a task's other time goes: building the model
    (`model_build_s`, BN calibrated as for an untrained model), its first call (`first_call_s`:
    the geometry trace and the kernels' first run) and the whole chunk with its PNGs and rows
    (`chunk_s`). Any supported model; `layer` a paper name or module path (`width` applies to
    ResNets)."""
    from dataclasses import replace

    from pipeline.actmax.optimize import Settings, calibrate_bn, maximize_channels, neuron, optimize, pixel
    from pipeline.models.layers import resolve_layers
    from pipeline.models.zoo import build_model, width_for
    from pipeline.data.preprocess import IMAGENET

    from pipeline.actmax.optimize import timed_chunk
    from pipeline.results.png import png_bytes

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    t = time.perf_counter()
    net = calibrate_bn(build_model(model, width=width_for(model, width)), size,
                       images=4, batch=4)
    build = time.perf_counter() - t
    lay = resolve_layers(net, layer)[0]
    channels = min(channels, lay.channels)
    settings = Settings(steps=steps)
    # a task's first call: the geometry trace, the kernels' first run, Adam's first step
    t = time.perf_counter()
    maximize_channels(net, lay, [0], size, IMAGENET, replace(settings, steps=1))
    first = time.perf_counter() - t
    _, chunk = timed_chunk(net, model, IMAGENET, lay, list(range(channels)), size, settings,
                           encode=png_bytes)
    batched = chunk["steps"]
    t = time.perf_counter()
    params, image_fn = pixel((1, 3, size, size))
    optimize(net, neuron(lay.name, 0), params, image_fn, steps=steps, stop=False)
    one = time.perf_counter() - t
    out = {"model": model, "width": net.width, "layer": lay.name, "channels": channels,
           "size": size, "steps": steps, "threads": torch.get_num_threads(),
           "model_build_s": build, "first_call_s": first, "chunk_s": chunk["total"],
           "batched_s": batched, "one_channel_full_s": one, "batched_over_one_channel_full": batched / one}
    if no_crop:
        t = time.perf_counter()
        maximize_channels(net, lay, range(channels), size, IMAGENET, replace(settings, crop=False))
        out["batched_no_crop_s"] = time.perf_counter() - t
        out["ratio_no_crop"] = out["batched_no_crop_s"] / one
    return out
