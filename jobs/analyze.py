"""Distributed stimulus analysis: top-k stimuli, mean preferred stimuli and channel statistics.

    python -m jobs.analyze                                  # demo data, untrained resnet34
    python -m jobs.analyze --data s3://bucket/imagenet/val --checkpoint s3://bucket/r34.pt \\
        --layers pool1,conv3,conv7 --top-k 16 --out s3://bucket/results/analysis --shards 64

The driver builds the manifest (manifest.parquet), the RF table (receptive_fields.parquet) and
the shards, then runs one Ray actor per GPU (CPU actors without GPUs), each loading the model
once. A shard's partial state is written to `<out>/_partials/<fingerprint>/` followed by a
`.done` marker; a rerun with the same configuration skips shards that have their marker. A
shard whose actor or node dies is handed to another actor. Partials merge in a tree of Ray
tasks, the top-k RF patches are cut per image in parallel Ray tasks, and the final tables
(`stimuli/topk.parquet`, `stimuli/mean.parquet`, `stimuli/channels.parquet`, DESIGN.md) and
`run.json` are written atomically only once everything is complete.

Reused by other jobs: `run_shards` (driver loop with retries), `tree_merge`, `fingerprint`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import pickle
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from jobs.common import (BadInput, Stopwatch, bad_input_exits, check_writable,
                         default_model_shape, eval_transform, fail, init_ray, job_parser,
                         load_job_model, log, package_versions, resolve_data)

PROG = "python -m jobs.analyze"
PARTIAL_FORMAT = 1          # bump when the partial state layout changes: old partials are ignored
MAX_ATTEMPTS = 4            # tries per shard before the job gives up


@dataclass(frozen=True)
class Config:
    data: str | None = None                   # source URL; None = embedded demo data (val split)
    model: str | None = None                  # architecture; None = checkpoint's, else resnet34
    checkpoint: str | None = None             # project checkpoint or torchvision state_dict URL
    layers: str = "pool1,conv3,conv7"         # comma-separated layer names, or "all"
    top_k: int = 16                           # stimuli kept per (layer, channel, neuron)
    out: str = "./results/analysis"           # output folder (local path or s3://)
    shards: int | None = None                 # number of shards (default: from images/workers)
    shard_size: int | None = None             # or images per shard
    workers: int | None = None                # actors (default: one per GPU, else per CPU)
    batch_size: int = 64                      # images per forward pass
    limit: int | None = None                  # analyse only the first N images of the manifest
    device: str = "auto"                      # auto | cpu | cuda
    resize: int | None = None                 # shorter side before the crop (default 256; demo 72)
    crop: int | None = None                   # centre crop side (default 224; demo 64)
    mean_all: bool = False                    # also the channel-wide mean over all positions
    seed: int = 0                             # seed of the untrained model (no --checkpoint)
    resume: bool = True                       # reuse finished shards under _partials/
    test_sleep: float = 0.0                   # testing only: seconds slept per batch (fault tests)

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> "Config":
        for name in ("top_k", "batch_size"):
            if getattr(a, name) < 1:
                raise BadInput(f"--{name.replace('_', '-')} must be a positive integer, "
                               f"got {getattr(a, name)}")
        for name in ("shards", "shard_size", "workers", "limit", "resize", "crop"):
            v = getattr(a, name)
            if v is not None and v < 1:
                raise BadInput(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
        if a.shards is not None and a.shard_size is not None:
            raise BadInput("give --shards or --shard-size, not both")
        if a.device not in ("auto", "cpu", "cuda"):
            raise BadInput(f"invalid device {a.device!r}; allowed: auto, cpu, cuda")
        if not a.out:
            raise BadInput("--out is empty; give a local folder or an s3:// URL")
        if a.test_sleep < 0:
            raise BadInput(f"--test-sleep must be >= 0, got {a.test_sleep}")
        return cls(data=a.data or None, model=a.model, checkpoint=a.checkpoint or None,
                   layers=a.layers, top_k=a.top_k, out=a.out.rstrip("/") or a.out,
                   shards=a.shards, shard_size=a.shard_size, workers=a.workers,
                   batch_size=a.batch_size, limit=a.limit, device=a.device, resize=a.resize,
                   crop=a.crop, mean_all=a.mean_all, seed=a.seed, resume=not a.no_resume,
                   test_sleep=a.test_sleep)


def build_parser() -> argparse.ArgumentParser:
    p = job_parser("analyze", __doc__)
    p.add_argument("--data", default=None,
                   help="image source: folder or s3:// URL (ImageNet val layouts, class folders) "
                        "or a .parquet manifest; default: the embedded demo data (val split)")
    p.add_argument("--model", default=None,
                   help="architecture (resnet18, resnet34, plainnet18, plainnet34); default: the "
                        "checkpoint's, else resnet34")
    p.add_argument("--checkpoint", default=None,
                   help="this project's checkpoint or a torchvision state_dict (local or s3://); "
                        "default: an untrained model with a fixed seed (a warning is logged)")
    p.add_argument("--layers", default="pool1,conv3,conv7",
                   help="comma-separated layers (conv1, pool1, conv2 ... convN) or 'all'")
    p.add_argument("--top-k", type=int, default=16, help="stimuli kept per channel and neuron")
    p.add_argument("--out", default="./results/analysis", help="output folder (local or s3://)")
    p.add_argument("--shards", type=int, default=None,
                   help="number of shards (default: ~2000 images each, at least 2 per worker)")
    p.add_argument("--shard-size", type=int, default=None, help="images per shard instead")
    p.add_argument("--workers", type=int, default=None,
                   help="Ray actors (default: one per GPU with cuda, else one per CPU)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--limit", type=int, default=None, help="analyse only the first N images")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (auto: cuda when the "
                                                      "Ray cluster has GPUs)")
    p.add_argument("--resize", type=int, default=None,
                   help="shorter side before the centre crop (default 256; demo data 72)")
    p.add_argument("--crop", type=int, default=None,
                   help="centre crop side analysed (default 224; demo data 64)")
    p.add_argument("--mean-all", action="store_true",
                   help="also compute the channel-wide mean stimulus over every positive "
                        "position (neuron 'all'; costs more than the forward pass)")
    p.add_argument("--seed", type=int, default=0, help="seed of the untrained model")
    p.add_argument("--no-resume", action="store_true",
                   help="recompute every shard even if its partial result exists")
    p.add_argument("--test-sleep", type=float, default=0.0,
                   help="testing only: sleep this many seconds per batch (fault-injection tests)")
    return p


# --------------------------------------------------------------------------------- set-up

@dataclass
class Prepared:
    """Everything the driver resolves before any Ray work."""

    cfg: Config
    model_name: str
    model_blob: dict[str, Any]        # what actors rebuild the model from
    layer_names: list[str]
    specs: list                       # pipeline.analysis.LayerSpec
    options: Any                      # pipeline.analysis.AnalysisOptions
    manifest: Any                     # pipeline.sources.Manifest (after --limit)
    transform: Any                    # pipeline.sources.EvalTransform
    demo_root: str | None
    rf_table: Any
    warnings: list[str] = field(default_factory=list)


def prepare(cfg: Config) -> Prepared:
    """Validate everything that can be validated without Ray. Raises BadInput / ValueError."""
    from pipeline.analysis import AnalysisOptions, layer_specs
    from pipeline.geometry import rf_table
    from pipeline.layers import resolve_layers

    check_writable(cfg.out)
    data = resolve_data(cfg.data, limit=cfg.limit)
    num_classes, width = default_model_shape(data)
    jm = load_job_model(cfg.checkpoint, cfg.model, num_classes=num_classes, width=width,
                        seed=cfg.seed)
    model, name, preprocess = jm.model, jm.name, jm.preprocess
    warnings = [jm.warning] if jm.warning else []
    manifest = data.manifest
    demo_root = data.demo_root
    transform = eval_transform(cfg.resize, cfg.crop, demo=data.demo, meta=jm.meta)
    layers = resolve_layers(model, cfg.layers)
    if any(layer.name == "fc" for layer in layers):
        raise BadInput("layer fc has no receptive field map to analyse; allowed: conv1, pool1, "
                       "conv2 ... convN or all")
    specs = layer_specs(model, layers, transform.crop)
    options = AnalysisOptions(top_k=cfg.top_k,
                              mean_neurons=("center", "all") if cfg.mean_all else ("center",))
    blob = {"model": name, "width": model.width, "num_classes": model.fc.out_features,
            "preprocess": preprocess.state(),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    return Prepared(cfg, name, blob, [s.name for s in specs], specs, options, manifest,
                    transform, demo_root, rf_table(model, name, transform.crop), warnings)


def fingerprint(prep: Prepared, device: str, precision: dict | None = None) -> str:
    """Hash of everything that changes a shard's partial result (not shards/workers/out);
    `precision`: what the workers run under (default: pipeline.precision.setting())."""
    import numpy as np

    from pipeline.precision import setting

    h = hashlib.sha256()
    for k in sorted(prep.model_blob["state_dict"]):
        h.update(k.encode())
        h.update(prep.model_blob["state_dict"][k].numpy().tobytes())
    man = prep.manifest.table
    h.update(man.column("path").to_pylist().__repr__().encode())
    desc = {
        "format": PARTIAL_FORMAT, "model": prep.model_name,
        "preprocess": prep.model_blob["preprocess"], "layers": [s.__dict__ for s in prep.specs],
        "options": asdict(prep.options), "transform": asdict(prep.transform),
        "root": "demo" if prep.demo_root else prep.manifest.root, "images": len(prep.manifest),
        # the batch shape and the device decide the float rounding of the activations
        "batch_size": prep.cfg.batch_size, "device": device,
        "precision": setting() if precision is None else precision,   # TF32 off (strict fp32)
    }
    h.update(json.dumps(desc, sort_keys=True, default=str).encode())
    h.update(np.int64(len(man)).tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------- Ray parts

def shard_name(start: int, stop: int) -> str:
    return f"shard-{start:09d}-{stop:09d}"


def _worker_class():
    import ray

    class ShardWorker:
        """Loads the model once; analyses shards and persists each one's partial state."""

        def __init__(self, blob: dict, specs: list, options, manifest, transform, demo_root,
                     device: str, batch_size: int, threads: int, partial_dir: str,
                     test_sleep: float):
            import torch

            from pipeline.analysis import ShardRunner
            from pipeline.checkpoint import model_from_state_dict
            from pipeline.precision import set_strict_fp32
            from pipeline.preprocess import preprocess_from_state

            set_strict_fp32()   # the census's max == 0 is exact: no TF32 in this actor
            if device == "cpu":
                torch.set_num_threads(max(1, threads))
            if demo_root is not None:  # each node holds (or deterministically makes) its copy
                from pipeline.demo import ensure_demo_data

                ensure_demo_data(demo_root)
            model = model_from_state_dict(blob["state_dict"], blob["model"])
            self.runner = ShardRunner(model, preprocess_from_state(blob["preprocess"]), specs,
                                      options, device=device, batch_size=batch_size)
            self.manifest, self.transform = manifest, transform
            self.partial_dir, self.test_sleep = partial_dir, test_sleep
            self.batch_size = batch_size

        def ready(self) -> str:
            import ray as _ray

            return _ray.get_runtime_context().get_node_id()

        def run(self, start: int, stop: int) -> dict:
            from pipeline.precision import current
            from pipeline.sources import iter_batches
            from pipeline.tables import join, write_bytes, write_json

            t0 = time.perf_counter()
            result = self.runner.new_result()
            skipped: list = []
            decode_wait = 0.0
            it = iter_batches(self.manifest, start, stop, self.batch_size, self.transform,
                              prefetch=1)
            while True:
                tw = time.perf_counter()
                batch = next(it, None)
                decode_wait += time.perf_counter() - tw
                if batch is None:
                    break
                skipped += [list(s) for s in batch.skipped]
                self.runner.step(result, batch.images, batch.indices)
                if self.test_sleep:
                    time.sleep(self.test_sleep)
            seconds = time.perf_counter() - t0
            info = {"start": start, "stop": stop, "images": result.images, "skipped": skipped,
                    "seconds": seconds, "decode_wait_seconds": decode_wait,
                    "precision": current()}
            name = shard_name(start, stop)
            payload = pickle.dumps({"info": info, "state": result.state()},
                                   protocol=pickle.HIGHEST_PROTOCOL)
            write_bytes(join(self.partial_dir, name + ".pkl"), payload)
            # the marker comes last: a partial without it is never trusted
            write_json(join(self.partial_dir, name + ".done"), info)
            return info

    return ray.remote(ShardWorker)


def run_shards(make_actor: Callable[[], Any], ranges: list[tuple[int, int]], workers: int,
               on_done: Callable[[tuple[int, int], dict], None]) -> int:
    """Driver loop: shards to idle actors, `ray.wait`, and retries on actor/node death.

    An actor is used only once its `ready()` answered (a replacement that cannot be placed
    never receives work, the shards go to the survivors). A shard that failed because its actor
    or node died goes back to the queue (up to MAX_ATTEMPTS tries); an exception raised by the
    shard's own code fails the job at once. Returns the number of retries.
    """
    import ray
    from ray.exceptions import RayError, RayTaskError

    pending = deque(ranges)
    attempts: dict[tuple[int, int], int] = {}
    starting: dict[Any, Any] = {}      # ready ref -> actor
    idle: list[Any] = []
    running: dict[Any, tuple[Any, tuple[int, int]]] = {}
    actors: list[Any] = []
    retries = 0

    def spawn() -> None:
        a = make_actor()
        actors.append(a)
        starting[a.ready.remote()] = a

    for _ in range(min(workers, len(ranges))):
        spawn()
    try:
        while pending or running:
            while pending and idle:
                a, shard = idle.pop(), pending.popleft()
                running[a.run.remote(*shard)] = (a, shard)
            refs = list(running) + list(starting)
            done, _ = ray.wait(refs, num_returns=1, timeout=30.0)
            if not done and not running:
                log(f"waiting for {len(starting)} actor(s) to be placed: does the cluster have "
                    f"the CPUs/GPUs they ask for?")
            for ref in done:
                if ref in starting:
                    a = starting.pop(ref)
                    try:
                        ray.get(ref)
                        idle.append(a)
                    except RayTaskError:
                        raise
                    except RayError as e:
                        log(f"an actor failed to start ({type(e).__name__}); starting another")
                        spawn()
                    continue
                a, shard = running.pop(ref)
                try:
                    info = ray.get(ref)
                except RayTaskError:
                    raise
                except RayError as e:
                    attempts[shard] = attempts.get(shard, 0) + 1
                    retries += 1
                    if attempts[shard] >= MAX_ATTEMPTS:
                        raise RuntimeError(f"shard {shard} failed {MAX_ATTEMPTS} times; last: "
                                           f"{type(e).__name__}") from e
                    log(f"{shard_name(*shard)} lost ({type(e).__name__}: worker or node died); "
                        f"retrying on another worker")
                    pending.appendleft(shard)
                    with_kill(a)
                    spawn()
                    continue
                idle.append(a)
                on_done(shard, info)
    finally:
        for a in actors:
            with_kill(a)
    return retries


def with_kill(actor: Any) -> None:
    import ray

    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001 - already dead is fine
        pass


def _merge_partials(urls: list[str]) -> dict:
    """Ray task body: read partial files, merge them, return the merged state."""
    from pipeline.analysis import AnalysisResult
    from pipeline.tables import read_bytes

    total = None
    for u in urls:
        part = AnalysisResult.from_state(pickle.loads(read_bytes(u))["state"])
        total = part if total is None else total.merge(part)
    return total.state()


def _merge_states(*states: dict) -> dict:
    from pipeline.analysis import AnalysisResult

    total = AnalysisResult.from_state(states[0])
    for s in states[1:]:
        total.merge(AnalysisResult.from_state(s))
    return total.state()


def tree_merge(urls: list[str], fan_in: int = 4) -> dict:
    """Merge partial files in a tree of Ray tasks (leaves read `fan_in` files each)."""
    import ray

    leaf = ray.remote(_merge_partials).options(num_cpus=1)
    node = ray.remote(_merge_states).options(num_cpus=1)
    level = [leaf.remote(urls[i:i + fan_in]) for i in range(0, len(urls), fan_in)]
    while len(level) > 1:
        level = [node.remote(*level[i:i + fan_in]) for i in range(0, len(level), fan_in)]
    return ray.get(level[0])


def _render_group(manifest, transform, rows, demo_root: str | None = None) -> dict:
    """Ray task body: decode one group of images once, cut and PNG-encode their patches."""
    from pipeline.sources import load_batch
    from pipeline.stimuli import render_rows

    if demo_root is not None:  # this node may not hold the demo data yet
        from pipeline.demo import ensure_demo_data

        ensure_demo_data(demo_root)

    ids = sorted(set(rows.column("image_index").to_pylist()))
    batch = load_batch(manifest, ids, transform)
    return render_rows(rows, batch.images, batch.indices)


def render_patches(topk, manifest, transform, parts: int,
                   demo_root: str | None = None) -> dict[int, bytes]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray

    from pipeline.stimuli import image_groups

    rows = topk.select(["image_index", "top", "left", "size"]).append_column(
        "row", pa.array(range(topk.num_rows), pa.int64()))
    task = ray.remote(_render_group).options(num_cpus=1)
    man_ref = ray.put(manifest)
    refs = [task.remote(man_ref, transform, rows.filter(pc.is_in(rows["image_index"],
                                                                  pa.array(g))), demo_root)
            for g in image_groups(topk, parts)]
    out: dict[int, bytes] = {}
    for d in ray.get(refs):
        out.update(d)
    return out


# --------------------------------------------------------------------------------- driver

def _resolve_cluster_device(spec: str) -> tuple[str, float]:
    import ray

    res = ray.cluster_resources()
    gpus = float(res.get("GPU", 0))
    if spec == "cuda" and gpus < 1:
        raise BadInput("--device cuda asked for, but the Ray cluster has no GPU; use auto or cpu")
    device = "cuda" if spec == "cuda" or (spec == "auto" and gpus >= 1) else "cpu"
    return device, float(res.get("CPU", 1))


def run(cfg: Config, prep: Prepared | None = None) -> dict:
    """The whole job (after validation); returns the run.json content."""
    import ray

    from pipeline.analysis import AnalysisResult, state_nbytes
    from pipeline.precision import setting as precision_setting
    from pipeline.sources import shard_ranges, write_manifest
    from pipeline.stimuli import TOPK_TABLE_SCHEMA, with_patches
    from pipeline.tables import exists, join, read_json, write_json, write_table

    t_start = time.time()
    sw = Stopwatch()
    with sw("setup"):
        prep = prep or prepare(cfg)
        for w in prep.warnings:
            log("WARNING: " + w)
        init_ray()
        device, cpus = _resolve_cluster_device(cfg.device)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        workers = cfg.workers or (gpus if device == "cuda" else max(1, int(cpus)))
        n = len(prep.manifest)
        if cfg.shard_size:
            ranges = shard_ranges(n, shard_size=cfg.shard_size)
        else:
            shards = cfg.shards or max(2 * workers, math.ceil(n / 2000))
            ranges = shard_ranges(n, shards=shards)
        workers = min(workers, len(ranges))
        fp = fingerprint(prep, device)
        partial_dir = join(cfg.out, "_partials", fp)
        write_manifest(prep.manifest, join(cfg.out, "manifest.parquet"))
        write_table(prep.rf_table, join(cfg.out, "receptive_fields.parquet"))
    log(f"{n} images, {len(ranges)} shards, {workers} {device} worker(s), layers "
        f"{','.join(prep.layer_names)}, partials {partial_dir}")

    infos: dict[tuple[int, int], dict] = {}
    todo = []
    for r in ranges:
        marker = join(partial_dir, shard_name(*r) + ".done")
        if cfg.resume and exists(marker):
            infos[r] = read_json(marker)
        else:
            todo.append(r)
    resumed = len(infos)
    if resumed:
        log(f"resuming: {resumed} of {len(ranges)} shards already done")

    retries = 0
    with sw("analyze"):
        if todo:
            worker_cls = _worker_class()
            opts: dict[str, Any] = {"max_restarts": 0, "max_task_retries": 0}
            if device == "cuda":
                opts.update(num_gpus=1, num_cpus=1)
                threads = 1
            else:
                threads = max(1, int(cpus // workers))
                opts.update(num_cpus=threads)
            blob_ref = ray.put(prep.model_blob)
            man_ref = ray.put(prep.manifest)
            t0 = time.perf_counter()
            done_images = [0]

            def make_actor():
                return worker_cls.options(**opts).remote(
                    blob_ref, prep.specs, prep.options, man_ref, prep.transform, prep.demo_root,
                    device, cfg.batch_size, threads, partial_dir, cfg.test_sleep)

            def on_done(shard, info):
                infos[shard] = info
                done_images[0] += info["images"]
                rate = done_images[0] / max(time.perf_counter() - t0, 1e-9)
                log(f"{shard_name(*shard)} done: {info['images']} images in "
                    f"{info['seconds']:.1f}s; {len(infos)}/{len(ranges)} shards, {rate:.1f} img/s")

            retries = run_shards(make_actor, todo, workers, on_done)
    with sw("merge"):
        urls = [join(partial_dir, shard_name(*r) + ".pkl") for r in ranges]
        state = tree_merge(urls)
        result = AnalysisResult.from_state(state)
        tables = result.tables(prep.model_name)
    with sw("patches"):
        pngs = render_patches(tables["topk"], prep.manifest, prep.transform,
                              parts=max(1, int(cpus)) * 2, demo_root=prep.demo_root)
        topk = with_patches(tables["topk"], pngs)
    skipped = sorted((tuple(s) for i in infos.values() for s in i["skipped"]), key=lambda s: s[0])
    flags = [i["precision"] for i in infos.values() if "precision" in i]
    images_read = sum(i["images"] for i in infos.values())
    summary = {
        "job": "analyze",
        "config": asdict(cfg),
        "model": prep.model_name,
        "untrained": cfg.checkpoint is None,
        "warnings": prep.warnings,
        "versions": package_versions(),
        "device": device,
        "workers": workers,
        "fingerprint": fp,
        "precision": {**precision_setting(), "workers": [
            f for i, f in enumerate(flags) if f not in flags[:i]]},   # as each worker saw it
        "layers": [s.__dict__ for s in prep.specs],
        "transform": asdict(prep.transform),
        "counts": {"images": n, "images_read": images_read, "images_skipped": len(skipped),
                   "shards": len(ranges), "shards_resumed": resumed,
                   "shards_computed": len(todo), "retries": retries,
                   "patches": sum(1 for v in pngs.values() if v)},
        "skipped": [{"image_index": s[0], "path": s[1], "reason": s[2]} for s in skipped],
        "worker_state_bytes": state_nbytes(state),
    }
    with sw("write"):
        write_table(tables["mean"], join(cfg.out, "stimuli", "mean.parquet"))
        write_table(tables["channels"], join(cfg.out, "stimuli", "channels.parquet"))
        write_table(topk, join(cfg.out, "stimuli", "topk.parquet"), schema=TOPK_TABLE_SCHEMA)
    wall = time.time() - t_start
    summary["seconds"] = {**{k: round(v, 3) for k, v in sw.seconds.items()}, "total": round(wall, 3)}
    computed = sum(infos[r]["images"] for r in todo)
    # per stage: images that stage handled per second of its wall time
    handled = {"setup": n, "analyze": computed, "merge": images_read, "patches": images_read,
               "write": images_read}
    summary["images_per_second"] = {
        **{k: round(handled[k] / max(v, 1e-9), 2) for k, v in sw.seconds.items()},
        "total": round(images_read / max(wall, 1e-9), 2)}
    write_json(join(cfg.out, "run.json"), summary)
    log(f"done: {images_read} images ({len(skipped)} skipped) in {wall:.1f}s -> {cfg.out}")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with bad_input_exits(PROG):
        cfg = Config.from_args(args)
        prep = prepare(cfg)
    try:
        run(cfg, prep)
    except BadInput as e:   # found only once Ray is up (e.g. --device cuda on a CPU cluster)
        fail(PROG, str(e))
    except KeyboardInterrupt:
        fail(PROG, "interrupted; rerun the same command to resume from the finished shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
