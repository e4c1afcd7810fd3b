"""How fast and how big a jobs.compare worker is: the measurements behind `jobs.bench --compare`.

    pair = CompareBench(layers="pool1,conv3,conv7", crop=224, batch_size=256, cpus=2)
    figures = measure_compare(pair, images, labels)       # uint8 (N, 3, 224, 224), int64 (N,)
    print("\\n".join(compare_summary(figures)))

Speed, on the same images in memory, interleaved (`pipeline.stats.analysis.interleaved`: the
best of `repeats` rounds that run each pass in turn): the two truncated forwards alone (network
A then B, each stopped after its deepest compared layer), the whole comparison step (the same
forwards plus the Grams and HSIC terms, the Pearson cross sums and the class means) with the
Grams in float32, and the same with float64 Grams. `ratio` = comparison images/s ÷ forwards
images/s (the goal: >= 0.7 at 224 px on CPU for the paper's layers).

Memory: the peak resident set of a fresh process (`peak_rss`, a subprocess through
`sys.executable`) that builds both models and runs two minibatches of forwards alone, and one
that runs two comparison steps; against the sizes the accumulators need (`sizes`): the stacked
per-minibatch Grams (M × B × B float64), the C_A × C_B cross sums, the class sums, and the
captured activations of both networks. On CUDA: the device's peak allocation in this process.
No Ray, no storage.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from pipeline.compare.cka import MIN_IMAGES
from pipeline.compare.collection import ComparePlan
from pipeline.stats.analysis import AnalysisResult, interleaved

__all__ = ["CompareBench", "bench_pair", "sizes", "peak_rss", "measure_compare",
           "compare_summary"]


@dataclass(frozen=True)
class CompareBench:
    """What to time (jobs.bench's flags of the same meaning)."""
    models: tuple[str, str] = ("resnet34", "plainnet34")
    layers: str = "pool1,conv3,conv7"
    crop: int = 224
    width: int = 64                 # ResNet base width
    batch_size: int = 256           # the CKA minibatch, one forward per network
    precision: str = "float32"      # the Grams of the timed comparison step
    device: str = "cpu"
    repeats: int = 3
    cpus: int = 1
    classes: int = 1000


def bench_pair(b: CompareBench) -> tuple[Any, ComparePlan]:
    """(PairRunner, ComparePlan) of two random-weight networks (seeds 0 and 1); the plan's CKA
    centres the activations in place, as the job's does."""
    from pipeline.compare.runner import PairRunner
    from pipeline.data.preprocess import IMAGENET
    from pipeline.models.layers import resolve_layers
    from pipeline.models.zoo import build_model, is_resnet
    from pipeline.stats.analysis import layer_specs

    nets, layers, specs = [], [], []
    for seed, name in enumerate(b.models):
        torch.manual_seed(seed)
        net = build_model(name, num_classes=b.classes,
                          width=b.width if is_resnet(name) else 64).eval()
        lays = resolve_layers(net, b.layers)
        nets.append(net)
        layers.append(lays)
        specs.append(tuple(layer_specs(net, lays, b.crop)))
    names = tuple(b.models) if b.models[0] != b.models[1] else tuple(
        f"{b.models[0]}_{s}" for s in "ab")
    plan = ComparePlan(names, specs[0], specs[1], b.classes, b.batch_size, b.precision,
                       in_place=True)
    return PairRunner(tuple(nets), (IMAGENET, IMAGENET), tuple(layers), b.device), plan


def sizes(plan: ComparePlan) -> dict[str, int]:
    """Bytes the comparison holds besides the models: `gram_bytes` (the stacked float64 Grams
    of one minibatch, M = 2 × layers of B × B), `cross_sum_bytes` (Σ C_A × C_B + 6 C float64
    per layer), `class_sum_bytes`, `hsic_bytes` (the M × M sums) and `activation_bytes` (both
    networks' captured float32 outputs of one minibatch)."""
    b, m = plan.batch_size, 2 * len(plan.layers)
    cross = sum((sa.channels * sb.channels + 3 * (sa.channels + sb.channels)) * 8
                for sa, sb in zip(plan.a, plan.b))
    cls = sum((plan.classes * s.channels) * 8 + plan.classes * 8 for s in (*plan.a, *plan.b))
    acts = sum(b * s.channels * s.feature_size ** 2 * 4 for s in (*plan.a, *plan.b))
    return {"gram_bytes": m * b * b * 8, "cross_sum_bytes": cross, "class_sum_bytes": cls,
            "hsic_bytes": m * m * 8, "activation_bytes": acts}


def _images(b: CompareBench, n: int) -> tuple[torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, 256, (n, 3, b.crop, b.crop), generator=g, dtype=torch.uint8),
            np.arange(n) % b.classes)


def _high_water() -> int:
    """This process's peak resident bytes since it started (Linux: VmHWM, which, unlike
    getrusage's ru_maxrss, does not carry over the peak of the parent that forked it); 0 where
    /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        return 0


def _peak_main(config: str) -> None:
    """The body of `peak_rss`'s subprocess: print {"before": bytes, "peak": bytes}."""
    args = json.loads(config)
    kind = args.pop("kind")
    b = CompareBench(**{**args, "models": tuple(args["models"])})
    torch.set_num_threads(b.cpus)
    runner, plan = bench_pair(b)
    images, labels = _images(b, 2 * b.batch_size)
    before = _high_water()
    result = AnalysisResult(plan.specs, plan.collection())
    for k in range(2):
        sl = slice(k * b.batch_size, (k + 1) * b.batch_size)
        if kind == "compare":
            runner.step(plan, result, images[sl], np.arange(sl.start, sl.stop), labels[sl])
        else:
            runner.activations(images[sl])
    peak = _high_water()
    print(json.dumps({"before": before, "peak": peak}))


def peak_rss(b: CompareBench, kind: str) -> dict[str, int]:
    """Peak resident bytes of a fresh CPU process that builds the pair (`before`: with the
    models and the images) and runs two minibatches of `kind` (forwards | compare)."""
    cfg = json.dumps({**asdict(b), "kind": kind})
    code = "import sys; from pipeline.compare.benchmark import _peak_main; _peak_main(sys.argv[1])"
    out = subprocess.run([sys.executable, "-c", code, cfg], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_compare(b: CompareBench, images: torch.Tensor, labels: np.ndarray,
                    memory: bool = True, pair: tuple[Any, ComparePlan] | None = None
                    ) -> dict[str, Any]:
    """Every figure of `jobs.bench --compare` (module docstring) on `images` (uint8), cut into
    whole minibatches of b.batch_size (all of them when fewer); `pair`: `bench_pair(b)`."""
    n = (len(images) // b.batch_size) * b.batch_size or len(images)
    if n < MIN_IMAGES:
        raise ValueError(f"the comparison needs at least {MIN_IMAGES} images, got {len(images)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(b.cpus)
    try:
        runner, plan = pair or bench_pair(b)
        plan64 = replace(plan, precision="float64")
        batches = [(images[i:i + b.batch_size], np.arange(i, min(i + b.batch_size, n)),
                    labels[i:i + b.batch_size]) for i in range(0, n, b.batch_size)]
        if b.device == "cuda":
            batches = [(x.pin_memory(), ix, lab) for x, ix, lab in batches]
            torch.cuda.reset_peak_memory_stats()

        def forwards() -> None:
            for x, _, _ in batches:
                runner.activations(x)
            _sync(b.device)

        def compare(p: ComparePlan):
            def run() -> None:
                result = AnalysisResult(p.specs, p.collection())
                for x, ix, lab in batches:
                    runner.step(p, result, x, ix, lab)
                _sync(b.device)
            return run

        best = interleaved({"forwards": forwards, "compare": compare(plan),
                            "compare64": compare(plan64)}, b.repeats)
    finally:
        torch.set_num_threads(threads)
    out = {"compare_models": list(plan.names), "compare_layers": list(plan.layers),
           "crop": b.crop, "width": b.width, "batch_size": b.batch_size,
           "precision": b.precision, "device": b.device, "cpus": b.cpus, "images": n,
           "forwards_images_per_s": round(n / best["forwards"], 2),
           "compare_images_per_s": round(n / best["compare"], 2),
           "compare_float64_images_per_s": round(n / best["compare64"], 2),
           "compare_over_two_truncated_forwards": round(best["forwards"] / best["compare"], 3),
           "compare_float64_over_two_truncated_forwards": round(
               best["forwards"] / best["compare64"], 3), **sizes(plan)}
    if b.device == "cuda":
        out["gpu"] = torch.cuda.get_device_name()
        out["peak_device_bytes"] = int(torch.cuda.max_memory_allocated())
    elif memory:
        fw, cp = peak_rss(b, "forwards"), peak_rss(b, "compare")
        out.update({"peak_rss_forwards_bytes": fw["peak"], "peak_rss_compare_bytes": cp["peak"],
                    "peak_rss_models_bytes": cp["before"],
                    "peak_rss_compare_extra_bytes": cp["peak"] - fw["peak"]})
    return out


def compare_summary(r: dict[str, Any]) -> list[str]:
    """The human-readable lines of a `jobs.bench --compare` result."""
    mib = 2 ** 20
    lines = [
        f"forwards  {r['forwards_images_per_s']:10.1f} img/s  ({' and '.join(r['compare_models'])}"
        f" width {r['width']}, {r['crop']}px, minibatch {r['batch_size']}, {r['device']}, "
        f"{r['cpus']} threads; truncated after {r['compare_layers'][-1]})",
        f"compare   {r['compare_images_per_s']:10.1f} img/s  (layers "
        f"{','.join(r['compare_layers'])}; {r['precision']} Grams, float64 sums)",
        f"ratio     {r['compare_over_two_truncated_forwards']:10.3f}  (float64 Grams: "
        f"{r['compare_float64_images_per_s']:.1f} img/s, ratio "
        f"{r['compare_float64_over_two_truncated_forwards']:.3f})",
        f"sizes     Grams {r['gram_bytes'] / mib:.1f} MiB per minibatch, cross sums "
        f"{r['cross_sum_bytes'] / mib:.2f} MiB, class sums {r['class_sum_bytes'] / mib:.2f} MiB, "
        f"activations {r['activation_bytes'] / mib:.1f} MiB per minibatch"]
    if "peak_rss_compare_bytes" in r:
        lines.append(f"memory    peak RSS {r['peak_rss_compare_bytes'] / mib:.0f} MiB comparing, "
                     f"{r['peak_rss_forwards_bytes'] / mib:.0f} MiB forwards alone (+"
                     f"{r['peak_rss_compare_extra_bytes'] / mib:.0f} MiB); models and images: "
                     f"{r['peak_rss_models_bytes'] / mib:.0f} MiB")
    if "peak_device_bytes" in r:
        lines.append(f"memory    peak GPU allocation {r['peak_device_bytes'] / mib:.0f} MiB")
    return lines
