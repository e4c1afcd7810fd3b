"""Benchmark: where the time of a jobs.analyze run goes, at the job's own settings.

    python -m jobs.bench                         # demo data, resnet34 width 16, 64x64 crops
    python -m jobs.bench --images 512 --json     # last line: one JSON object
    python -m jobs.bench --synthetic 256 --images 256 --resize 256 --crop 224 --width 64 --json
    python -m jobs.bench --synthetic 5000 --images 5000 --device cuda --json   # ImageNet-size JPEGs
    python -m jobs.bench --model mobilenet_v3_small --layers features.1.block.0.2,features.3
    python -m jobs.bench --compare --crop 224 --resize 256 --json   # jobs.compare's worker

The benchmark is the job: its batch size, torch and decode threads (one worker's share of this
machine, as jobs.analyze plans it), strict fp32, and its worker's body (`ShardFeed`) end to end,
unless told otherwise. Per image (`pipeline.stats.benchmark.measure`, which says how): decoding
files into batches (then 1 and 2 threads; nvJPEG on CUDA), the whole forward, the forward cut
after the deepest analysed layer, the analysis step (truncated forward plus every accumulator;
`--mean-all` adds the channel-wide mean), end to end, and the accumulators against one read of
the activations. Fixed costs, measured here with the job's own code: Ray's start, a worker
process's interpreter and imports, building the worker, saving and loading a shard's state,
merging two, cutting and encoding the top-k patches, writing the tables. The JSON names every
ratio by what it divides and projects 50,000 images on this machine's workers with the fixed
costs included. Human-readable lines go to stdout first, stage lines to stderr.
`--compare` times jobs.compare's worker instead (`pipeline.compare.benchmark`): --model and its
PlainNet (or the same architecture with another seed) on the same images, the comparison step
against the two truncated forwards alone (torch threads: --threads, else --cpus), and its peak
memory against the Gram and cross-sum sizes (minibatch --batch-size, default 256).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Sequence

from jobs.runtime.console import Console
from jobs.runtime.inputs import model_choices
from jobs.runtime.options import BadInput, Options, at_least, bad_input, opt, run_cli

PROG = "python -m jobs.bench"
IMAGES_50K = 50_000


@dataclass(frozen=True)
class Config(Options):
    device: str = opt("auto", "where to compute", choices=("auto", "cpu", "cuda"))
    images: int = opt(256, "images timed per pass", check=at_least(1))
    batch_size: int | None = opt(None, "images per forward pass (default: jobs.analyze's: 256 on "
                                 "CUDA; on the CPU 256 at demo size, 64 at 224 px)",
                                 check=at_least(1))
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
    cpus: int | None = opt(None, "CPUs of the machine the job would run on (default: the CPUs "
                           "this process may use)", check=at_least(1))
    threads: int | None = opt(None, "torch threads of the worker (default: jobs.analyze's "
                              "share for one worker)", check=at_least(1))
    decode_threads: int | None = opt(None, "decode threads of the worker (default: "
                                     "jobs.analyze's)", check=at_least(1))
    scaling_images: int = opt(256, "images decoded with 1 and with 2 threads (decode scaling)",
                              check=at_least(1))
    compare: bool = opt(False, "time jobs.compare's worker: --model against its PlainNet on the "
                        "same images, the comparison step against the two truncated forwards, "
                        "and its peak memory (minibatch: --batch-size, default 256)")
    ray: bool = opt(True, "measure Ray's start too (a local Ray in a subprocess)",
                    flag="--no-ray")
    actmax: str | None = opt(None, "time jobs.actmax instead: every channel of this layer "
                             "(e.g. conv3), its start-up apart from its Adam steps")

    def check(self) -> None:
        if self.synthetic and self.data is not None and "://" in self.data:
            raise BadInput(f"--synthetic writes local files; --data {self.data} is not a local "
                           f"folder")


def job_plan(device: str, cpus: int) -> tuple[int, int, int]:
    """(workers, torch threads, decode threads) jobs.analyze plans on one machine of `cpus`
    CPUs (one GPU on CUDA): what a worker of the job runs with."""
    from jobs.runtime.device import Device

    gpus = 1 if device == "cuda" else 0
    plan, dec = Device(device, "bench", gpus, cpus, node_cpus=cpus).decode_plan()
    return plan.workers, plan.threads, dec


def _subprocess_seconds(code: str) -> float:
    """Wall seconds of a fresh interpreter running `code` (what a new Ray worker pays)."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                   env={**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"})
    return time.perf_counter() - t


def _timed(fn, *args) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def fixed_costs(runner: Any, manifest: Any, transform: Any, ray: bool) -> dict[str, float | None]:
    """Seconds of the job's fixed costs, measured with its code (jobs.analyze's merge, the
    engine's store, the table writer), each once for the projection to scale: Ray's start and a
    worker process (fresh interpreters), a shard state's save and load, one pairwise merge, the
    tables, the top-k patches (cut and encoded in this process: the job spreads the encoding
    over Ray tasks) and the writes."""
    from jobs import analyze
    from jobs.runtime import engine
    from pipeline.data.decode import load_batch
    from pipeline.results import catalog
    from pipeline.results.tables import write
    from pipeline.stats.stimuli import patch_pngs, with_patches

    out: dict[str, float | None] = {"ray_start": None}
    if ray:
        out["ray_start"] = _subprocess_seconds(
            "import ray; ray.init(address='local', num_cpus=1, include_dashboard=False, "
            "logging_level='ERROR'); ray.shutdown()")
    out["worker_process"] = _subprocess_seconds("import pipeline.stats.analysis, "
                                                "pipeline.data.decode")
    result = runner.new_result()       # a full state: one batch fills every top-k
    batch = load_batch(manifest, list(range(min(len(manifest), runner.batch_size))), transform)
    runner.step(result, batch.images, batch.indices)
    state = result.state()
    with tempfile.TemporaryDirectory(prefix="bench-fixed-") as tmp:
        store = engine.Store(tmp, "bench")
        _, out["state_save"] = _timed(store.save, "a", state, {})
        loaded, out["state_load"] = _timed(store.load, "a")
        merged, out["merge_pair"] = _timed(analyze._fold, runner.collection, loaded,
                                           store.load("a"))
        tables, out["tables"] = _timed(merged.tables, runner.model.name)
        topk = tables[catalog.TOPK.name]
        pngs, out["patches"] = _timed(patch_pngs, manifest, transform, topk)
        tables[catalog.TOPK.name] = with_patches(topk, pngs)
        t = time.perf_counter()
        for table in runner.collection.tables:       # the job's writes, in a scratch --out
            write(table, tables[table.name], tmp)
        out["write"] = time.perf_counter() - t
    return {k: None if v is None else round(v, 4) for k, v in out.items()}


def projection(res: dict[str, Any], fixed: dict[str, float | None], workers: int,
               shards: int) -> dict[str, Any]:
    """50,000 images on `workers` workers in `shards` shards: the fixed costs (once, per shard,
    per merge) plus the images at one worker's end-to-end rate times the workers."""
    f = {k: v or 0.0 for k, v in fixed.items()}
    once = (f["ray_start"] + res["setup_seconds"] + f["worker_process"]
            + res["worker_start_seconds"] + f["tables"] + f["patches"] + f["write"])
    per_shard = -(-shards // workers) * f["state_save"] + shards * f["state_load"] \
        + (shards - 1) * f["merge_pair"]
    compute = IMAGES_50K / (workers * res["end_to_end_images_per_s"])
    return {"workers": workers, "shards_50k": shards, "fixed_seconds": fixed,
            "fixed_seconds_50k": round(once + per_shard, 2),
            "compute_seconds_50k": round(compute, 1),
            "projected_seconds_50k": round(once + per_shard + compute, 1)}


def run(cfg: Config) -> dict[str, Any]:
    """Build the source and the model, measure, and return the JSON line's dictionary."""
    from jobs.runtime.device import Plan, resolve_device
    from pipeline.data.decode import default_cpus
    from pipeline.data.demo import DEMO_CROP, DEMO_WIDTH
    from pipeline.models.study import eval_transform, read_source
    from pipeline.stats import benchmark
    from pipeline.stats.analysis import default_batch_size
    from pipeline.stats.devicecheck import write_synthetic

    con, device = Console("bench"), resolve_device(cfg.device, cluster=False).kind
    cpus = cfg.cpus or default_cpus()
    workers, threads, dec = job_plan(device, cpus)
    with tempfile.TemporaryDirectory(prefix="bench-synthetic-") as tmp:
        with con.stage("data", quiet=True):     # bad input surfaces here and below: one line
            url = write_synthetic(cfg.data or tmp, cfg.synthetic) if cfg.synthetic else cfg.data
            with bad_input(ValueError, FileNotFoundError, first_line=True):
                data = read_source(url)
                transform = eval_transform(cfg.resize, cfg.crop, demo=data.demo)
        if cfg.compare:
            return _compare(cfg, con, data, transform, device, cfg.threads or cpus)
        batch = cfg.batch_size or default_batch_size(transform.crop, device)
        with bad_input(first_line=True):   # the message lists what is allowed
            runner, setup = _timed(
                benchmark.bench_runner, cfg.model, cfg.layers, transform.crop, cfg.top_k,
                cfg.mean_all, cfg.width or (DEMO_WIDTH if transform.crop <= DEMO_CROP else 64),
                device, batch)
        timing = benchmark.Timing(cfg.images, batch, cfg.repeats, cfg.threads or threads,
                                  cfg.decode_threads or dec, cfg.scaling_images, device)
        with con.stage("measure"):
            res = benchmark.measure(runner, data.manifest, transform, timing)
        with con.stage("fixed costs"):
            fixed = fixed_costs(runner, data.manifest, transform, cfg.ray)
    res |= {"crop": transform.crop, "resize": transform.resize, "files": len(data.manifest),
            "data": "demo" if data.demo else ("synthetic" if cfg.synthetic else "files"),
            "cpus": cpus, "setup_seconds": round(setup, 3)}
    return res | projection(res, fixed, workers, Plan(workers, {}, threads).shards(IMAGES_50K))


def run_actmax(cfg: Config) -> dict[str, Any]:
    """jobs.actmax's task on every channel of `--actmax` (`bench_actmax`: model build, first call,
    the Adam steps, the whole chunk) with the job's fixed costs measured here (Ray's start and a
    worker process in subprocesses, the table write): where an end-to-end run's seconds go."""
    from jobs.runtime.device import Device
    from pipeline.actmax.optimize import Settings, chunk_table
    from pipeline.data.decode import default_cpus
    from pipeline.data.preprocess import IMAGENET
    from pipeline.models.layers import resolve_layers
    from pipeline.models.zoo import build_model, width_for
    from pipeline.results import catalog
    from pipeline.results.png import png_bytes
    from pipeline.results.tables import write
    from pipeline.stats.benchmark import bench_actmax

    cpus = cfg.cpus or default_cpus()
    plan = Device("cpu", "bench", 0, cpus, node_cpus=cpus).plan(None, cpus_per_worker=8)
    size, width = cfg.crop or 224, cfg.width or 64
    with bad_input(first_line=True):
        res = bench_actmax(cfg.model, width, cfg.actmax, 10 ** 6, size,
                           threads=cfg.threads or plan.threads)
    fixed = {"ray_start": None}
    if cfg.ray:
        fixed["ray_start"] = _subprocess_seconds(
            "import ray; ray.init(address='local', num_cpus=1, include_dashboard=False, "
            "logging_level='ERROR'); ray.shutdown()")
    fixed["worker_process"] = _subprocess_seconds("import jobs.actmax, pipeline.actmax.optimize")
    net = build_model(cfg.model, width=width_for(cfg.model, width))
    lay = resolve_layers(net, cfg.actmax)[0]
    # the job's table of these channels (one step: only its size matters for the write)
    table = chunk_table(net, cfg.model, IMAGENET, lay, list(range(res["channels"])), size,
                        Settings(steps=1), encode=png_bytes)
    with tempfile.TemporaryDirectory(prefix="bench-actmax-") as tmp:
        _, fixed["write"] = _timed(write, catalog.ACTMAX, table, tmp)
    fixed = {k: None if v is None else round(v, 3) for k, v in fixed.items()}
    steps = res["batched_s"]
    total = (sum(v or 0.0 for v in fixed.values()) + res["model_build_s"] + res["first_call_s"]
             + res["chunk_s"])
    return {**{k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()},
            "fixed_seconds": fixed, "projected_job_seconds": round(total, 2),
            "steps_fraction": round(steps / total, 3)}


def actmax_lines(r: dict[str, Any]) -> list[str]:
    """The human-readable lines of `run_actmax`."""
    f = r["fixed_seconds"]
    return [f"actmax    {r['channels']} channels of {r['layer']} ({r['model']} width {r['width']}, "
            f"{r['size']} px, {r['steps']} steps, {r['threads']} threads)",
            f"steps     {r['batched_s']:8.2f} s  (one channel through the whole network: "
            f"{r['one_channel_full_s']:.2f} s, x{r['batched_over_one_channel_full']:.2f})",
            f"start-up  ray {f['ray_start'] or 0:.2f} s, worker process {f['worker_process']:.2f} s, "
            f"model {r['model_build_s']:.2f} s, first call {r['first_call_s']:.2f} s, rest of "
            f"the task {r['chunk_s'] - r['batched_s']:.2f} s, write {f['write']:.2f} s",
            f"end to end {r['projected_job_seconds']:.1f} s projected, "
            f"{100 * r['steps_fraction']:.0f} % in the steps"]


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

        if cfg.actmax:
            res = run_actmax(cfg)
            print("\n".join(actmax_lines(res)))
            if cfg.json:
                print(json.dumps(res, sort_keys=True))
            return
        res = run(cfg)
        print("\n".join(compare_summary(res) if cfg.compare else summary_lines(res)))
        if cfg.json:
            print(json.dumps(res, sort_keys=True))
    return run_cli(PROG, __doc__, Config, body, argv)


if __name__ == "__main__":
    sys.exit(main())
