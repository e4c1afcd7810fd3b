"""Inactive neurons and the noise ablation (the paper's Table 1) as parallel Ray tasks.

1. Census: the inactive channels of --layer (output 0 on every image) come from an analysis
   output's stimuli/channels.parquet (--from), or from a first parallel pass over the data.
2. Evaluation: one Ray task per (condition, seed, shard) runs its shard through the model with
   ReLU(N(0,1)) noise added to the chosen channels of --layer: clean (once), inactive-all,
   inactive-random (a subset per minibatch, one evaluation per --fraction size), control-active
   (as many active channels). Workers run in strict fp32 (TF32 off; pipeline.precision).
3. Merge as sums; write census.parquet, ablation.parquet, table1.parquet, run.json; print Table 1.

    python -m jobs.ablate --out ./results/ablation                       # demo data, untrained
    python -m jobs.ablate --data s3://b/imagenet/val --checkpoint s3://b/ckpt/resnet34.pt \\
        --seeds 3 --shards 64 --out s3://b/results/ablation/resnet34
    python -m jobs.ablate --fraction 1ch,0.1,0.5 --train-seed 2 ...   # subset sweep; seed label

Shards are cut on --eval-batch boundaries and noise is a function of (seed, image_index), so the
numbers do not depend on --shards or on the number of workers. Per-task partials under
<out>/_partials/ make a rerun resume.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.ablation import DEFAULT_SUBSETS, Subset, parse_subsets

from jobs.common import (BadInput, Stopwatch, bad_input_exits, check_writable,
                         default_model_shape, eval_transform, fail, init_ray, job_parser,
                         load_job_model, log, package_versions, resolve_data, resolve_device)

PROG = "python -m jobs.ablate"


@dataclass(frozen=True)
class AblateConfig:
    out: str                          # output folder (local or s3://)
    data: str | None = None           # validation source; None: the embedded demo data
    checkpoint: str | None = None     # None: randomly initialised --model (untrained)
    model: str | None = None          # architecture; None: the checkpoint's, else resnet34
    layer: str = "pool1"              # layer whose channels are counted and noised
    seeds: int = 3                    # noise seeds 0 .. seeds-1
    fraction: tuple[Subset, ...] = parse_subsets(DEFAULT_SUBSETS)  # inactive-random sizes
    shards: int = 8                   # evaluation shards (cut on --eval-batch boundaries)
    eval_batch: int = 256             # minibatch of the global image order (the paper's 256)
    from_analysis: str | None = None  # analysis output holding stimuli/channels.parquet
    limit: int | None = None          # only the first N images of the manifest
    resize: int | None = None         # None: 256, or the demo's 72 on demo data
    crop: int | None = None           # None: 224, or the demo's 64 on demo data
    device: str = "auto"              # auto | cpu | cuda, resolved on each worker
    gpus_per_task: float | None = None  # None: 1 when the cluster has GPUs and device != cpu
    cpus_per_task: float = 1.0        # Ray CPUs per task (decoding threads live inside)
    task_per: str = "plan"            # plan: a task per (condition, seed, shard); shard: per shard
    train_seed: int | None = None     # training seed of the weights (None: checkpoint's, else 0)

    def __post_init__(self) -> None:
        if not self.out.strip():
            raise BadInput("--out is empty; give a local folder or an s3:// URL")
        if self.seeds < 1:
            raise BadInput(f"--seeds must be >= 1, got {self.seeds}")
        if not self.fraction or not all(isinstance(f, Subset) for f in self.fraction):
            raise BadInput(f"--fraction must be a list of subset sizes such as {DEFAULT_SUBSETS}")
        if self.train_seed is not None and self.train_seed < 0:
            raise BadInput(f"--train-seed must be >= 0, got {self.train_seed}")
        if self.shards < 1:
            raise BadInput(f"--shards must be >= 1, got {self.shards}")
        if self.eval_batch < 1:
            raise BadInput(f"--eval-batch must be >= 1, got {self.eval_batch}")
        for name, v in (("--resize", self.resize), ("--crop", self.crop)):
            if v is not None and v < 1:
                raise BadInput(f"{name} must be a positive integer, got {v}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise BadInput(f"invalid --device {self.device!r}; allowed: auto, cpu, cuda")
        if self.gpus_per_task is not None and self.gpus_per_task < 0:
            raise BadInput(f"--gpus-per-task must be >= 0, got {self.gpus_per_task}")
        if self.task_per not in ("plan", "shard"):
            raise BadInput(f"invalid --task-per {self.task_per!r}; allowed: plan, shard")
        if self.limit is not None and self.limit < 1:
            raise BadInput(f"--limit must be >= 1, got {self.limit}")
        if self.cpus_per_task <= 0:
            raise BadInput(f"--cpus-per-task must be > 0, got {self.cpus_per_task}")
        if self.model is not None:
            from pipeline.models import model_names   # imports torch: after the cheap checks

            if self.model not in model_names():
                raise BadInput(f"unknown --model {self.model!r}; allowed: "
                               f"{', '.join(model_names())}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "AblateConfig":
        try:
            fraction = parse_subsets(args.fraction)
        except ValueError as e:
            raise BadInput(str(e)) from None
        return cls(out=args.out, data=args.data, checkpoint=args.checkpoint, model=args.model,
                   layer=args.layer, seeds=args.seeds, fraction=fraction,
                   shards=args.shards, eval_batch=args.eval_batch, from_analysis=args.from_,
                   limit=args.limit,
                   resize=args.resize, crop=args.crop, device=args.device,
                   gpus_per_task=args.gpus_per_task, cpus_per_task=args.cpus_per_task,
                   task_per=args.task_per, train_seed=args.train_seed)


def build_parser() -> argparse.ArgumentParser:
    p = job_parser("ablate", __doc__)
    p.add_argument("--out", required=True, help="output folder (local path or s3://...)")
    p.add_argument("--data", default=None,
                   help="validation images (folder, s3:// URL or .parquet manifest) with labels; "
                        "default: the embedded demo data's val/")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint URL (ours or a torchvision state_dict); default: a randomly "
                        "initialised --model at demo width (untrained: for trying things out)")
    p.add_argument("--model", default=None,
                   help="architecture (resnet18/34, plainnet18/34); default: the checkpoint's, "
                        "else resnet34")
    p.add_argument("--layer", default="pool1", help="layer whose inactive channels are noised")
    p.add_argument("--seeds", type=int, default=3, help="number of noise seeds (0 .. N-1)")
    p.add_argument("--fraction", default=DEFAULT_SUBSETS,
                   help="inactive-random subset sizes, comma list, one evaluation (and Table 1 "
                        "row) each: a fraction p in (0, 1] keeps each inactive channel with "
                        "probability p (0.25 or 25%%), Nch noises exactly N channels; drawn anew "
                        "per minibatch")
    p.add_argument("--train-seed", type=int, default=None,
                   help="training seed of the checkpoint, written to the train_seed column "
                        "(default: the seed in the checkpoint's recipe, else 0)")
    p.add_argument("--shards", type=int, default=8,
                   help="shards of the validation set (cut on --eval-batch boundaries)")
    p.add_argument("--eval-batch", type=int, default=256,
                   help="minibatch size of the global image order (inactive-random redraws its "
                        "subset per minibatch; also the forward batch)")
    p.add_argument("--from", dest="from_", default=None, metavar="ANALYSIS_OUT",
                   help="analysis output (jobs.analyze --out) whose stimuli/channels.parquet "
                        "gives the census; default: a census pass of this job")
    p.add_argument("--limit", type=int, default=None,
                   help="ablate only the first N images of the manifest (as jobs.analyze --limit)")
    p.add_argument("--resize", type=int, default=None,
                   help="shorter side resized to this (default 256; demo data: 72)")
    p.add_argument("--crop", type=int, default=None,
                   help="centre crop side (default 224; demo data: 64)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (resolved on each worker)")
    p.add_argument("--gpus-per-task", type=float, default=None,
                   help="GPUs per Ray task (default: 1 when the cluster has GPUs, else 0)")
    p.add_argument("--cpus-per-task", type=float, default=1.0, help="CPUs per Ray task")
    p.add_argument("--task-per", default="plan", choices=("plan", "shard"),
                   help="plan: one Ray task per (condition, seed, shard); shard: one task per "
                        "shard that decodes each batch once and runs every (condition, seed) "
                        "on it (same numbers, ~10x less decoding)")
    return p


# ---------------------------------------------------------------------------- model spec

def model_spec(model, preprocess) -> dict[str, Any]:
    """What a worker needs to rebuild the model: name, width, classes, weights, preprocessing."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    h = hashlib.sha256()
    for k in sorted(sd):   # a fingerprint of the weights: partials of other weights don't match
        h.update(k.encode())
        h.update(sd[k].contiguous().numpy().tobytes())
    return {"name": model.name, "width": model.width, "num_classes": model.fc.out_features,
            "preprocess": preprocess.state(), "state_dict": sd, "fingerprint": h.hexdigest()}


def _rebuild(spec: dict[str, Any], device: str):
    from pipeline.models import build_model
    from pipeline.preprocess import preprocess_from_state

    model = build_model(spec["name"], num_classes=spec["num_classes"], width=spec["width"])
    model.load_state_dict(spec["state_dict"])
    return model.eval().to(device), preprocess_from_state(spec["preprocess"])


# ---------------------------------------------------------------------------- Ray tasks

def census_task(spec: dict[str, Any], manifest, layer_name: str, start: int, stop: int,
                eval_batch: int, transform, device: str, partial_urls: list[str]) -> list[dict]:
    """ChannelStats of `layer_name` over images [start, stop); persisted to partial_urls[0]."""
    import torch

    from pipeline.accumulators import ChannelStats
    from pipeline.hooks import capture
    from pipeline.layers import catalogue
    from pipeline.precision import strict_fp32
    from pipeline.sources import iter_batches
    from pipeline.tables import write_bytes

    device = resolve_device(device)
    model, preprocess = _rebuild(spec, device)
    layer = catalogue(model)[layer_name]
    stats, skipped = ChannelStats(layer.channels), []
    # max == 0 is an exact test: no TF32 convolutions
    with torch.no_grad(), strict_fp32() as flags:
        for batch in iter_batches(manifest, start, stop, eval_batch, transform):
            skipped += batch.skipped
            if len(batch):
                stats.update(capture(model, preprocess(batch.as_float(device)), [layer])[layer.name])
    state = {"stats": _jsonable(stats.state()), "skipped": skipped, "range": [start, stop],
             "precision": flags}
    write_bytes(partial_urls[0], json.dumps(state).encode())
    return [state]


def eval_task(spec: dict[str, Any], manifest, layer_name: str, plans: list, start: int,
              stop: int, eval_batch: int, transform, device: str,
              partial_urls: list[str]) -> list[dict]:
    """EvalSums of each (condition, seed) plan over images [start, stop), every batch read
    and decoded once for all plans; plan k's state is persisted to partial_urls[k]."""
    import torch

    from pipeline.ablation import EvalSums, evaluate
    from pipeline.layers import catalogue
    from pipeline.precision import strict_fp32
    from pipeline.sources import iter_batches
    from pipeline.tables import write_bytes

    device = resolve_device(device)
    model, preprocess = _rebuild(spec, device)
    layer = catalogue(model)[layer_name]
    sums = [EvalSums(eval_batch) for _ in plans]
    skipped, t0 = [], time.perf_counter()
    with torch.no_grad(), strict_fp32() as flags:
        for batch in iter_batches(manifest, start, stop, eval_batch, transform):
            skipped += batch.skipped
            if not len(batch):
                continue
            x = preprocess(batch.as_float(device))
            cache: dict = {}   # this batch's noise per seed, shared by the plans of that seed
            for plan, acc in zip(plans, sums):
                logits = evaluate(model, layer, x, batch.indices, plan, cache)
                acc.update(logits, batch.labels, batch.indices,
                           plan.mask(batch.indices, layer.channels) if plan.noisy else None)
    seconds = time.perf_counter() - t0
    states = []
    for acc, url in zip(sums, partial_urls):
        state = {"sums": acc.state(), "skipped": skipped, "range": [start, stop],
                 "seconds": seconds / len(plans), "precision": flags}
        write_bytes(url, json.dumps(state).encode())
        states.append(state)
    return states


def _jsonable(state: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in state.items()}


def _run_tasks(tasks: list[tuple[list[str], Any, tuple]], what: str) -> dict[str, dict]:
    """Run `(partial_urls, remote_fn, args)` tasks, each returning one state per URL, and
    return {url: state}. A task whose partials all exist is not run again (resume); the
    per-task partial is the marker that its shard is done."""
    import ray

    from pipeline.tables import exists, read_json

    out: dict[str, dict] = {}
    pending: dict[Any, list[str]] = {}
    total = sum(len(urls) for urls, _, _ in tasks)
    for urls, fn, args in tasks:
        if all(exists(u) for u in urls):
            out.update({u: read_json(u) for u in urls})
        else:
            pending[fn.remote(*args, urls)] = urls
    if out:
        log(f"{what}: {len(out)} of {total} partials resumed")
    step = max(1, len(tasks) // 10)
    finished = 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            out.update(zip(pending.pop(ref), ray.get(ref)))
            finished += 1
            if finished % step == 0 or not pending:
                log(f"{what}: {len(out)}/{total} partials done")
    return out


# ---------------------------------------------------------------------------- driver

def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def partials_key(prep: "Prepared", spec: dict[str, Any], ranges: list[tuple[int, int]],
                 precision: dict[str, Any] | None = None) -> str:
    """The key of this run's partials: weights, data, layer, batch, shard cut, transform and the
    precision the workers run under (default: pipeline.precision.setting(), strict fp32)."""
    from pipeline import precision as prec

    return _key(spec["fingerprint"], prep.model_name, prep.data, len(prep.manifest),
                prep.layer.name, prep.cfg.eval_batch, ranges, asdict(prep.transform),
                prec.setting() if precision is None else precision)


def _distinct(items: list[dict]) -> list[dict]:
    out: list[dict] = []
    for d in items:
        if d not in out:
            out.append(d)
    return out


def _check_analysis(cfg: AblateConfig) -> None:
    """Warn when --from's run.json names another checkpoint or data set than this run: the
    census would then describe other weights (channel counts alone cannot tell)."""
    from pipeline.tables import exists, join, read_json

    url = join(cfg.from_analysis, "run.json")
    if not exists(url):
        return
    other = read_json(url).get("config", {})
    for what, theirs, ours in (("checkpoint", other.get("checkpoint"), cfg.checkpoint),
                               ("data", other.get("data"), cfg.data)):
        if theirs != ours:
            log(f"WARNING: --from {cfg.from_analysis} analysed {what} {theirs or 'default'}, "
                f"this run uses {ours or 'default'}: make sure they are the same")


@dataclass
class Prepared:
    """Everything checked and loaded before any Ray work starts."""

    cfg: AblateConfig
    model: Any
    model_name: str
    preprocess: Any
    untrained: bool
    layer: Any                 # pipeline.layers.Layer
    data: str
    transform: Any             # pipeline.sources.EvalTransform
    manifest: Any              # pipeline.sources.Manifest
    census: Any = None         # census table from --from, else None (computed by a pass)
    setup_seconds: float = 0.0
    train_seed: int = 0        # the training run the weights come from


def prepare(cfg: AblateConfig) -> Prepared:
    """Load model, data and (with --from) the census; BadInput/ValueError on bad input."""
    from pipeline import layout
    from pipeline.ablation import census_table
    from pipeline.layers import resolve_layers
    from pipeline.tables import exists, read_table

    t0 = time.perf_counter()
    check_writable(cfg.out)
    src = resolve_data(cfg.data, limit=cfg.limit, require_labels=True)
    data, manifest = src.url, src.manifest
    num_classes, width = default_model_shape(src)
    jm = load_job_model(cfg.checkpoint, cfg.model, num_classes=num_classes, width=width)
    model, model_name, preprocess, untrained = jm.model, jm.name, jm.preprocess, jm.untrained
    transform = eval_transform(cfg.resize, cfg.crop, demo=src.demo, meta=jm.meta)
    if jm.warning:
        log(f"WARNING: {jm.warning}")
    layers = resolve_layers(model, cfg.layer)
    if len(layers) != 1 or layers[0].name == "fc":
        raise BadInput(f"--layer must name one layer with channel maps (conv1, pool1, "
                       f"conv2 ...), got {cfg.layer!r}")
    layer = layers[0]
    labels = manifest.labels
    classes = model.fc.out_features
    if int(labels.max()) >= classes or int(labels.min()) < 0:
        raise BadInput(f"labels of {data} run 0..{int(labels.max())} but {model_name} has "
                       f"{classes} classes: the model does not cover this data set")
    train_seed = cfg.train_seed
    if train_seed is None:
        train_seed = int((jm.meta.get("recipe") or {}).get("seed") or 0)
    census = None
    if cfg.from_analysis:
        url = layout.stimuli_table(cfg.from_analysis, "channels")
        if not exists(url):
            raise BadInput(f"--from {cfg.from_analysis}: {url} does not exist (run "
                           f"jobs.analyze with --layers {layer.name} first)")
        census = census_table(read_table(url), model_name, layer.name, layer.channels,
                              train_seed)
        _check_analysis(cfg)
    return Prepared(cfg, model, model_name, preprocess, untrained, layer, data, transform,
                    manifest, census, time.perf_counter() - t0, train_seed)


def run(prep: Prepared) -> dict[str, Any]:
    """Census (unless given), evaluation tasks, merge, tables; returns run.json's content."""
    import ray

    from pipeline.ablation import (CONDITIONS, EvalSums, ablation_table, census_table,
                                   format_table1, inactive_channels, make_plan,
                                   no_inactive_note, table1)
    from pipeline import precision
    from pipeline.accumulators import ChannelStats
    from pipeline.sources import shard_ranges, write_manifest
    from pipeline.tables import exists, join, read_json, write_json, write_table

    cfg, model, model_name, layer = prep.cfg, prep.model, prep.model_name, prep.layer
    manifest, transform, data, census = prep.manifest, prep.transform, prep.data, prep.census
    sw, t_start = Stopwatch(), time.time()
    n, B = len(manifest), cfg.eval_batch
    minibatches = math.ceil(n / B)
    ranges = [(a * B, min(b * B, n)) for a, b in shard_ranges(minibatches, shards=cfg.shards)]
    spec = model_spec(model, prep.preprocess)
    key = partials_key(prep, spec, ranges)
    partials = join(cfg.out, "_partials", f"ablate-{key}")
    log(f"{model_name} {layer.name}: {n} images from {data}, {len(ranges)} shard(s) of "
        f"{B}-image minibatches, partials in {partials}")

    init_ray()
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.device == "cuda" and not cluster_gpus:
        fail(PROG, "--device cuda asked for, but the Ray cluster has no GPU; use auto or cpu")
    gpus = cfg.gpus_per_task
    if gpus is None:
        gpus = 1.0 if cfg.device != "cpu" and cluster_gpus > 0 else 0.0
    opts = dict(num_cpus=cfg.cpus_per_task, num_gpus=gpus, max_retries=2, retry_exceptions=True)
    spec_ref, manifest_ref = ray.put(spec), ray.put(manifest)
    skipped: dict[int, tuple] = {}
    census_flags: list[dict] = []

    with sw("census"):
        if census is None:
            fn = ray.remote(census_task).options(**opts)
            urls = [join(partials, "census", f"shard-{i:05d}.json") for i in range(len(ranges))]
            tasks = [([u], fn, (spec_ref, manifest_ref, layer.name, a, b, B, transform,
                                cfg.device)) for u, (a, b) in zip(urls, ranges)]
            states = _run_tasks(tasks, "census")
            census_flags = [s["precision"] for s in states.values() if "precision" in s]
            stats = ChannelStats(layer.channels)
            for u in urls:
                stats.merge(ChannelStats.from_state(states[u]["stats"]))
                skipped.update({s[0]: tuple(s) for s in states[u]["skipped"]})
            census = census_table(stats.to_table(model_name, layer.name), model_name,
                                  layer.name, layer.channels, prep.train_seed)
            census_source = "census pass"
        else:
            census_source = f"{cfg.from_analysis}/stimuli/channels.parquet"
    inactive = inactive_channels(census)
    log(f"{layer.name}: {len(inactive)} of {layer.channels} channels inactive "
        f"({census_source}): {inactive}")

    seeds = list(range(cfg.seeds))
    plans = [make_plan("clean", 0, inactive, layer.channels)]
    if inactive:
        for c in CONDITIONS[1:]:
            for sub in (cfg.fraction if c == "inactive-random" else (None,)):
                kw = {"fraction": sub.fraction or 0.0, "count": sub.count} if sub else {}
                plans += [make_plan(c, s, inactive, layer.channels, eval_batch=B, **kw)
                          for s in seeds]
    else:
        log(no_inactive_note(layer.name))
    with sw("evaluate"):
        fn = ray.remote(eval_task).options(**opts)
        ekey = _key(inactive)

        def url(plan, i: int) -> str:
            name = plan.condition + (f"-{plan.subset.label}" if plan.subset else "")
            return join(partials, f"eval-{ekey}", f"{name}_seed{plan.seed}", f"shard-{i:05d}.json")

        tasks = []
        for i, (a, b) in enumerate(ranges):
            args = (spec_ref, manifest_ref, layer.name)
            rest = (a, b, B, transform, cfg.device)
            if cfg.task_per == "shard":   # one task decodes the shard once for every plan
                todo = [p for p in plans if not exists(url(p, i))] or plans
                tasks.append(([url(p, i) for p in todo], fn, (*args, todo, *rest)))
            else:
                tasks += [([url(p, i)], fn, (*args, [p], *rest)) for p in plans]
        states = _run_tasks(tasks, "evaluate")
    merged = {plan: EvalSums(B) for plan in plans}
    seen_flags = [s["precision"] for s in states.values() if "precision" in s]
    for plan in plans:
        for i in range(len(ranges)):
            state = states.get(url(plan, i)) or read_json(url(plan, i))
            merged[plan].merge(EvalSums.from_state(state["sums"]))
            skipped.update({s[0]: tuple(s) for s in state["skipped"]})
    results = [(plan, merged[plan].totals()) for plan in plans]
    if results[0][1]["images"] == 0:
        fail(PROG, f"none of the {n} images of {data} could be read ({len(skipped)} skipped, "
                   f"first: {sorted(skipped.values())[0][1:] if skipped else '-'})")
    tasks_run = len(tasks) + (len(ranges) if census_source == "census pass" else 0)

    with sw("write"):
        ablation = ablation_table(model_name, layer.name, inactive, cfg.fraction, results, seeds,
                                  prep.train_seed)
        t1 = table1(ablation, census)
        write_manifest(manifest, join(cfg.out, "manifest.parquet"))
        write_table(census, join(cfg.out, "census.parquet"))
        write_table(ablation, join(cfg.out, "ablation.parquet"))
        write_table(t1, join(cfg.out, "table1.parquet"))
        evaluated = sum(t["images"] for _, t in results)
        eval_s = sw.seconds.get("evaluate", 0.0)
        run_info = {
            "job": "ablate", "config": asdict(cfg), "versions": package_versions(),
            "model": model_name, "untrained": prep.untrained, "data": data,
            "transform": asdict(transform), "layer": layer.name,
            "counts": {"images": n, "images_read": n - len(skipped),
                       "images_skipped": len(skipped), "shards": len(ranges),
                       "minibatches": minibatches, "evaluations": len(plans),
                       "tasks": tasks_run},
            "skipped": [list(s) for s in sorted(skipped.values())][:1000],
            "census_source": census_source, "inactive_channels": inactive,
            "train_seed": prep.train_seed,
            # what the workers ran under, as each of them saw it (strict fp32: TF32 off)
            "precision": {**precision.setting(), "workers": _distinct(census_flags + seen_flags)},
            "seconds": {"setup": prep.setup_seconds, **sw.seconds,
                        "total": prep.setup_seconds + time.time() - t_start},
            "throughput": {"evaluate_images_per_s": evaluated / eval_s if eval_s else None},
        }
        write_json(join(cfg.out, "run.json"), run_info)
    print(format_table1(t1, census), flush=True)
    log(f"wrote census.parquet, ablation.parquet, table1.parquet, run.json to {cfg.out}")
    return run_info


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with bad_input_exits(PROG):
        prep = prepare(AblateConfig.from_args(args))
    run(prep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
