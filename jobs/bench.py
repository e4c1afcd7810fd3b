"""Benchmark: where the time goes, from image files to accumulator state, in one process.

    python -m jobs.bench                         # demo data, resnet34 width 16, 64x64 crops
    python -m jobs.bench --images 512 --json     # last line: one JSON object
    python -m jobs.bench --width 64 --resize 256 --crop 224 --device cuda
    python -m jobs.bench --synthetic 5000 --images 5000 --device cuda --json   # ImageNet-size JPEGs
    python -m jobs.bench --model mobilenet_v3_small --layers features.1.block.0.2,features.3
    python -m jobs.bench --compare --crop 224 --resize 256 --json   # jobs.compare's worker

It times, on the same images and model (`pipeline.stats.benchmark.measure`, which says how): decoding
files into model-ready batches (`--cpus` threads, then 1 and 2; nvJPEG on CUDA), the whole forward,
the forward truncated after the deepest analysed layer, the analysis step (truncated forward plus
every accumulator; `--mean-all` adds the channel-wide mean), files to accumulator state end to end,
and the accumulators alone against the floor of reading the activations once. The JSON line adds
the ratios, the projected seconds for 50,000 images and the worker state size of the paper layers
of a full-size resnet34. Human-readable lines go to stdout first, stage lines to stderr.
`--compare` times jobs.compare's worker instead (`pipeline.compare.benchmark`): --model and its
PlainNet (or the same architecture with another seed) on the same images, the comparison step
against the two truncated forwards alone, and its peak memory against the Gram and cross-sum
sizes (minibatch --batch-size, default 256).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

from jobs.runtime.console import Console
from jobs.runtime.inputs import model_choices
from jobs.runtime.options import BadInput, Options, at_least, bad_input, opt, run_cli

PROG = "python -m jobs.bench"


@dataclass(frozen=True)
class Config(Options):
    device: str = opt("auto", "where to compute", choices=("auto", "cpu", "cuda"))
    images: int = opt(256, "images timed per pass", check=at_least(1))
    batch_size: int | None = opt(None, "images per forward pass (default: jobs.analyze's, 256 "
                                 "at demo size, 64 at 224 px)", check=at_least(1))
    model: str = opt("resnet34", "any torchvision CNN by name, random weights (a name it does "
                     "not know gets the list)", choices=model_choices, metavar="NAME")
    width: int | None = opt(None, "ResNet base width (default 16 for demo-size crops, else 64)",
                            check=at_least(1))
    layers: str = opt("pool1,conv3,conv7", "analysed layers: paper names or module paths")
    top_k: int = opt(16, "stimuli kept per channel and neuron", check=at_least(1))
    resize: int | None = opt(None, "shorter side before the crop (default: the demo's 72, else "
                             "256)", check=at_least(1))
    crop: int | None = opt(None, "centre crop side (default 64, else 224)", check=at_least(1))
    mean_all: bool = opt(False, "also the channel-wide mean stimulus")
    repeats: int = opt(3, "timed repetitions (best one counts)", check=at_least(1))
    json: bool = opt(False, "print one JSON line last")
    data: str | None = opt(None, "image folder or .parquet manifest to read (default: the "
                           "demo's validation split)")
    synthetic: int = opt(0, "write this many synthetic JPEGs of ImageNet's size distribution "
                         "into --data (a temporary folder without it) and read those",
                         check=at_least(0))
    cpus: int | None = opt(None, "decode threads and torch threads (default: the CPUs this "
                           "process may use)", check=at_least(1))
    scaling_images: int = opt(256, "images decoded with 1 and with 2 threads (decode scaling)",
                              check=at_least(1))
    compare: bool = opt(False, "time jobs.compare's worker: --model against its PlainNet on the "
                        "same images, the comparison step against the two truncated forwards, "
                        "and its peak memory (minibatch: --batch-size, default 256)")

    def check(self) -> None:
        if self.synthetic and self.data is not None and "://" in self.data:
            raise BadInput(f"--synthetic writes local files; --data {self.data} is not a local "
                           f"folder")


def make_synthetic(folder: str, n: int, seed: int = 0) -> str:
    """Write `n` synthetic validation-style JPEGs into a local folder (kept if already there)."""
    from pipeline.stats.benchmark import synthetic_jpeg, synthetic_name
    from pipeline.data.decode import default_cpus

    def write(i: int) -> None:
        path = os.path.join(folder, synthetic_name(i))
        with open(path + ".tmp", "wb") as f:
            f.write(synthetic_jpeg(i, seed))
        os.replace(path + ".tmp", path)        # a file is there whole or not at all

    os.makedirs(folder, exist_ok=True)
    todo = [i for i in range(n) if not os.path.exists(os.path.join(folder, synthetic_name(i)))]
    with ThreadPoolExecutor(default_cpus()) as pool:   # PIL encodes without the GIL
        list(pool.map(write, todo))
    return folder


def run(cfg: Config) -> dict[str, Any]:
    """Build the source and the model, measure, and return the JSON line's dictionary."""
    from jobs.runtime.device import resolve_device
    from pipeline.data.decode import default_cpus
    from pipeline.data.demo import DEMO_CROP, DEMO_WIDTH
    from pipeline.models.study import eval_transform, read_source
    from pipeline.stats import benchmark
    from pipeline.stats.analysis import default_batch_size

    con, cpus = Console("bench"), cfg.cpus or default_cpus()
    device = resolve_device(cfg.device, cluster=False).kind
    with tempfile.TemporaryDirectory(prefix="bench-synthetic-") as tmp:
        with con.stage("data", quiet=True):     # bad input surfaces here and below: one line
            url = make_synthetic(cfg.data or tmp, cfg.synthetic) if cfg.synthetic else cfg.data
            with bad_input(ValueError, FileNotFoundError, first_line=True):
                data = read_source(url)
                transform = eval_transform(cfg.resize, cfg.crop, demo=data.demo)
        if cfg.compare:
            return _compare(cfg, con, data, transform, device, cpus)
        batch = cfg.batch_size or default_batch_size(transform.crop)
        with bad_input(first_line=True):   # the message lists what is allowed
            runner = benchmark.bench_runner(
                cfg.model, cfg.layers, transform.crop, cfg.top_k, cfg.mean_all,
                cfg.width or (DEMO_WIDTH if transform.crop <= DEMO_CROP else 64), device, batch)
        timing = benchmark.Timing(cfg.images, batch, cfg.repeats, cpus,
                                  cfg.scaling_images, device)
        with con.stage("measure"):
            res = benchmark.measure(runner, data.manifest, transform, timing)
    return res | {"crop": transform.crop, "resize": transform.resize, "files": len(data.manifest),
                  "data": "demo" if data.demo else ("synthetic" if cfg.synthetic else "files")}


def _compare(cfg: Config, con: Console, data: Any, transform: Any, device: str,
             cpus: int) -> dict[str, Any]:
    """`--compare`: jobs.compare's worker on --images decoded images (pipeline.compare.benchmark)."""
    import numpy as np

    from pipeline.compare.benchmark import CompareBench, bench_pair, measure_compare
    from pipeline.data.decode import load_batch
    from pipeline.data.demo import DEMO_CROP, DEMO_WIDTH
    from pipeline.models.zoo import is_resnet

    plain = cfg.model.replace("resnet", "plainnet", 1) if cfg.model.startswith("resnet") else None
    b = CompareBench((cfg.model, plain or cfg.model), cfg.layers, transform.crop,
                     cfg.width or (DEMO_WIDTH if transform.crop <= DEMO_CROP else 64),
                     cfg.batch_size or 256, "float32", device, cfg.repeats, cpus)
    idx = np.arange(cfg.images) % len(data.manifest)
    with bad_input(first_line=True):   # an unknown layer: the message lists what is allowed
        pair = bench_pair(b)
    if not is_resnet(cfg.model):
        con.info(f"{cfg.model} has no PlainNet: B is {cfg.model} with another seed")
    with con.stage("decode", quiet=True):
        batch = load_batch(data.manifest, idx, transform)
    with con.stage("measure"):
        res = measure_compare(b, batch.images, np.maximum(batch.labels, 0) % b.classes,
                              pair=pair)
    return res | {"resize": transform.resize, "files": len(data.manifest),
                  "data": "demo" if data.demo else ("synthetic" if cfg.synthetic else "files")}


def main(argv: Sequence[str] | None = None) -> int:
    def body(cfg: Config) -> None:
        from pipeline.compare.benchmark import compare_summary
        from pipeline.stats.benchmark import summary_lines

        res = run(cfg)
        print("\n".join(compare_summary(res) if cfg.compare else summary_lines(res)))
        if cfg.json:
            print(json.dumps(res, sort_keys=True))
    return run_cli(PROG, __doc__, Config, body, argv)


if __name__ == "__main__":
    sys.exit(main())
