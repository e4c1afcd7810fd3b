"""Inactive channels of a layer and the noise ablation (the paper's Table 1), on jobs.engine.

    python -m jobs.ablate --out ./results/ablation                       # demo data, untrained
    python -m jobs.ablate --data s3://b/imagenet/val --checkpoint s3://b/ckpt/resnet34.pt \\
        --seeds 3 --shards 64 --out s3://b/results/ablation/resnet34
    python -m jobs.ablate --model vgg11_bn --checkpoint vgg.pt --layer features.3 --out ...

1. Census: the inactive channels of --layer (output 0 on every image) come from an analysis
   output's stimuli/channels.parquet (--from), or from one engine unit per shard.
2. Evaluation: one unit per (plan, shard) (--task-per shard: per shard, all plans) adds
   ReLU(N(0,1)) noise to the plan's channels of --layer: clean (once), inactive-all,
   inactive-random (once per --fraction size), control-active (as many active channels).
3. Merge; write census/ablation/table1.parquet and run.json; print Table 1.
Units run in strict fp32 (pipeline.precision); noise is a function of (seed, image_index) and
shards are cut on --eval-batch boundaries, so numbers never depend on --shards or workers.
A rerun with the same settings resumes from <out>/_partials/ (see docs/ablation.md).
"""
from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from jobs import engine
from jobs.common import (JobModel, check_writable, default_model_shape, eval_transform,
                         load_job_model, resolve_data)
from jobs.console import Console, init_ray
from jobs.options import BadInput, Options, at_least, opt, run_cli
from jobs.runinfo import write_run
from pipeline.ablation import DEFAULT_SUBSETS, Subset, parse_subsets

PROG = "python -m jobs.ablate"


def _fractions(text: str) -> tuple[Subset, ...]:
    try:
        return parse_subsets(text)
    except ValueError as e:
        raise BadInput(str(e)) from None


def _models() -> list[str]:
    from pipeline.models import supported_models

    return supported_models()


@dataclass(frozen=True)
class AblateConfig(Options):
    out: str = opt(help="output folder (local path or s3://...)",
                   check=lambda v: None if v.strip() else "must name a local folder or s3:// URL")
    data: str | None = opt(None, "labelled validation images (folder, s3:// URL or .parquet "
                           "manifest); default: the embedded demo data's val/")
    checkpoint: str | None = opt(None, "checkpoint URL (ours or a torchvision state_dict); "
                                 "default: a randomly initialised --model (UNTRAINED)")
    model: str | None = opt(None, "any supported CNN (resnet34, plainnet34, vgg11_bn, ...); "
                            "default: the checkpoint's, else resnet34", choices=_models,
                            metavar="NAME")
    layer: str | None = opt(None, "layer whose inactive channels are counted and noised: a paper "
                            "name (pool1, conv3) or a module path (features.3); default: pool1 "
                            "(ResNet family), else the model's first max-pooling module")
    seeds: int = opt(3, "noise seeds 0 .. N-1", check=at_least(1))
    fraction: tuple[Subset, ...] = opt(
        parse_subsets(DEFAULT_SUBSETS), f"inactive-random subset sizes (default "
        f"{DEFAULT_SUBSETS}), one evaluation and Table 1 row each: a fraction p in (0, 1] keeps "
        "each inactive channel with probability p (0.25 or 25%%), Nch noises exactly N "
        "channels; drawn anew per minibatch", parse=_fractions)
    train_seed: int | None = opt(None, "training seed of the weights, for the train_seed column "
                                 "(default: the checkpoint recipe's, else 0)", check=at_least(0))
    shards: int = opt(8, "shards of the images (cut on --eval-batch boundaries)", check=at_least(1))
    eval_batch: int = opt(256, "minibatch of the global image order (inactive-random redraws "
                          "per minibatch; also the forward batch)", check=at_least(1))
    from_analysis: str | None = opt(None, "jobs.analyze output whose stimuli/channels.parquet "
                                    "gives the census; default: a census pass", flag="--from",
                                    metavar="ANALYSIS_OUT")
    limit: int | None = opt(None, "only the first N images of the manifest", check=at_least(1))
    resize: int | None = opt(None, "shorter side resized to this (default 256; demo 72)",
                             check=at_least(1))
    crop: int | None = opt(None, "centre crop side (default 224; demo 64)", check=at_least(1))
    device: str = opt("auto", "where units compute; auto: cuda when the cluster has GPUs",
                      choices=("auto", "cpu", "cuda"))
    gpus_per_task: float | None = opt(None, "GPUs per Ray task (default: 1 when the cluster has "
                                      "GPUs and --device is not cpu)", check=at_least(0))
    cpus_per_task: float = opt(1.0, "CPUs per Ray task",
                               check=lambda v: None if v > 0 else "must be > 0")
    task_per: str = opt("plan", "plan: a unit per (condition, seed, shard); shard: a unit per "
                        "shard that decodes each batch once for every plan (same numbers)",
                        choices=("plan", "shard"))


@dataclass
class Setup:
    """Everything checked and loaded before Ray starts."""

    jm: JobModel
    layer: Any                 # pipeline.layers.Layer
    src: Any                   # jobs.common.JobData: url, demo, manifest
    transform: Any             # pipeline.decode.EvalTransform
    train_seed: int
    weights: bytes             # engine.digest of the weights
    census: Any = None         # the census from --from, else None (a census pass computes it)


def _job_model(cfg: AblateConfig, src: Any) -> JobModel:
    """`load_job_model`; for models beyond its list (until jobs.common takes every supported
    CNN) the checkpoint, or an untrained torchvision build, is loaded here."""
    from pipeline.models import model_names

    classes, width = default_model_shape(src)
    if cfg.model is None or cfg.model in model_names():
        return load_job_model(cfg.checkpoint, cfg.model, num_classes=classes, width=width)
    import torch

    from pipeline.checkpoint import CheckpointError, load_checkpoint
    from pipeline.models import build_model
    from pipeline.preprocess import IMAGENET

    if cfg.checkpoint:
        try:
            c = load_checkpoint(cfg.checkpoint, cfg.model)
        except CheckpointError as e:
            raise BadInput(str(e)) from None
        return JobModel(c.model.eval(), c.model_name, c.preprocess, False, c.meta)
    torch.manual_seed(0)
    return JobModel(build_model(cfg.model, num_classes=classes).eval(), cfg.model, IMAGENET, True)


def prepare(cfg: AblateConfig, con: Console) -> Setup:
    """Data, model, layer and (with --from) the census; every bad input surfaces here."""
    from pipeline.ablation import default_layer
    from pipeline.layers import resolve_layers
    from pipeline.listing import SourceError
    from pipeline.models import n_classes

    check_writable(cfg.out)
    try:
        src = resolve_data(cfg.data, limit=cfg.limit, require_labels=True)
    except SourceError as e:
        raise BadInput(str(e)) from None
    jm = _job_model(cfg, src)
    try:
        layers = resolve_layers(jm.model, cfg.layer or default_layer(jm.model))
    except ValueError as e:
        raise BadInput(str(e)) from None
    if len(layers) != 1 or layers[0].name == "fc":
        raise BadInput(f"--layer must name one layer with channel maps (pool1, conv2 ... or a "
                       f"module path), got {cfg.layer!r}")
    labels, classes = src.manifest.labels, n_classes(jm.model)
    if int(labels.max()) >= classes or int(labels.min()) < 0:
        raise BadInput(f"labels of {src.url} run 0..{int(labels.max())} but {jm.name} has "
                       f"{classes} classes: the model does not cover this data set")
    seed = cfg.train_seed if cfg.train_seed is not None else \
        int((jm.meta.get("recipe") or {}).get("seed") or 0)
    s = Setup(jm, layers[0], src, eval_transform(cfg.resize, cfg.crop, demo=src.demo,
              meta=jm.meta), seed, engine.digest(jm.model.state_dict()))
    if cfg.from_analysis:
        s.census = _census_from(cfg, s, con)
    if jm.warning:
        con.warn(jm.warning)
    return s


def _census_from(cfg: AblateConfig, s: Setup, con: Console) -> Any:
    """The census from --from's channels.parquet; a warning when its run.json names another
    checkpoint or data set (channel counts alone cannot tell other weights apart)."""
    from pipeline import layout
    from pipeline.table1 import census_table
    from pipeline.tables import exists, join, read_json, read_table

    url = layout.stimuli_table(cfg.from_analysis, "channels")
    if not exists(url):
        raise BadInput(f"--from {cfg.from_analysis}: {url} does not exist (run jobs.analyze "
                       f"with --layers {s.layer.name} first)")
    try:
        census = census_table(read_table(url), s.jm.name, s.layer.name, s.layer.channels,
                              s.train_seed)
    except ValueError as e:
        raise BadInput(f"--from {cfg.from_analysis}: {e}") from None
    run = join(cfg.from_analysis, "run.json")
    other = read_json(run).get("config", {}) if exists(run) else {}
    for what in ("checkpoint", "data") if other else ():
        if other.get(what) != getattr(cfg, what):
            con.warn(f"--from {cfg.from_analysis} analysed {what} {other.get(what) or 'default'}"
                     f", this run uses {getattr(cfg, what) or 'default'}: make sure they match")
    return census


def fingerprint(cfg: AblateConfig, s: Setup, device: engine.Device, inactive: Sequence[int] |
                None = None, precision: dict | None = None) -> str:
    """The partials' folder: weights, preprocessing, data, layer, minibatch, transform and the
    workers' precision (pipeline.precision.setting(): strict fp32), plus the inactive set for
    the evaluation. Not --shards, --seeds or --fraction: unit names hold ranges and plans."""
    from pipeline.precision import setting

    d = {"model": s.jm.name, "preprocess": s.jm.preprocess.state(), "data": s.src.url,
         "images": len(s.src.manifest), "layer": s.layer.name, "eval_batch": cfg.eval_batch,
         "transform": asdict(s.transform), "precision": precision or setting(),
         "inactive": None if inactive is None else list(inactive)}
    return engine.fingerprint(d, s.weights, device=device)


def _resources(cfg: AblateConfig) -> tuple[engine.Device, engine.Plan]:
    """The device and each Ray task's share (--gpus-per-task, --cpus-per-task)."""
    device = engine.resolve_device(cfg.device)
    gpus = float(device.kind == "cuda") if cfg.gpus_per_task is None else cfg.gpus_per_task
    if device.kind == "cuda" and not gpus:
        if cfg.device == "cuda":
            raise BadInput("--device cuda needs --gpus-per-task > 0")
        device = engine.resolve_device("cpu")
    workers = device.gpus / gpus if gpus else device.cpus / cfg.cpus_per_task
    return device, engine.Plan(max(1, int(workers)), {"num_cpus": cfg.cpus_per_task,
                                                      "num_gpus": gpus}, 1)


def _shard(model: Any, preprocess: Any, layer: Any, manifest: Any, transform: Any, batch: int,
           device: str, plans: list | None, start: int, stop: int) -> engine.Result:
    """One unit: the census (plans None) or the plans' evaluation sums of images [start, stop)."""
    from pipeline import ablation
    from pipeline.decode import iter_batches

    batches = iter_batches(manifest, start, stop, batch, transform)
    if plans is None:
        value, skipped, flags = ablation.census_shard(model, preprocess, layer, batches, device)
    else:
        value, skipped, flags = ablation.eval_shard(model, preprocess, layer, plans, batches,
                                                    batch, device)
    return engine.Result(value, {"skipped": [list(k) for k in skipped], "precision": flags})


def _stage(con: Console, name: str, units: list, work: engine.Task, store: engine.Store,
           plan: engine.Plan, unit: str) -> engine.RunStats:
    with con.stage(name):
        stats = engine.run_units(units, work, store, plan=plan,
                                 progress=con.progress(sum(u.size for u in units), unit))
    if stats.resumed:
        con.info(f"{name}: {stats.resumed} of {len(units)} units resumed")
    return stats


def _eval_units(cfg: AblateConfig, plans: list, ranges: list) -> list[engine.Unit]:
    if cfg.task_per == "shard":
        return [engine.Unit(f"eval-shard-{a:09d}-{b:09d}", (plans, a, b), (b - a) * len(plans))
                for a, b in ranges]
    return [engine.Unit(f"eval-{p.label}-{a:09d}-{b:09d}", ([p], a, b), b - a)
            for p in plans for a, b in ranges]


def run(cfg: AblateConfig) -> dict[str, Any]:
    """The whole job after argument parsing (Ray started if needed); returns run.json."""
    from pipeline.ablation import make_plans, merge_sums
    from pipeline.listing import shard_ranges
    from pipeline.table1 import census_table, inactive_channels, no_inactive_note

    con = Console("ablate")
    with con.stage("setup", quiet=True):
        s = prepare(cfg, con)
        init_ray(cfg.out)
        device, plan = _resources(cfg)
    n, B, name = len(s.src.manifest), cfg.eval_batch, s.layer.name
    ranges = [(a * B, min(b * B, n)) for a, b in shard_ranges(math.ceil(n / B), shards=cfg.shards)]
    con.info(f"{s.jm.name} {name}: {n} images from {s.src.url}, {len(ranges)} shard(s) of "
             f"{B}-image minibatches, {device.kind} x{plan.workers}")
    work = engine.Task(_shard, s.jm.model, s.jm.preprocess, s.layer, s.src.manifest, s.transform,
                       B, device.kind)
    runs, census = [], s.census
    if census is None:
        store = engine.Store(cfg.out, fingerprint(cfg, s, device))
        units = [engine.Unit(f"census-{a:09d}-{b:09d}", (None, a, b), b - a) for a, b in ranges]
        runs.append(_stage(con, "census", units, work, store, plan, "images"))
        stats = engine.merge(store, runs[0].names, lambda a, b: a.merge(b))
        census = census_table(stats.to_table(s.jm.name, name), s.jm.name, name,
                              s.layer.channels, s.train_seed)
    inactive = inactive_channels(census)
    con.info(f"{name}: {len(inactive)} of {s.layer.channels} channels inactive "
             f"({'--from' if s.census is not None else 'census'}): {inactive}")
    if not inactive:
        con.info(no_inactive_note(name))
    plans = make_plans(inactive, s.layer.channels, range(cfg.seeds), cfg.fraction, B)
    store = engine.Store(cfg.out, fingerprint(cfg, s, device, inactive))
    runs.append(_stage(con, "evaluate", _eval_units(cfg, plans, ranges), work, store, plan,
                       "images evaluated"))
    sums = engine.merge(store, runs[-1].names, merge_sums)
    return _write(cfg, s, con, device.report(plan.workers), census, plans, sums, runs, store)


def _write(cfg: AblateConfig, s: Setup, con: Console, device: dict, census: Any, plans: list,
           sums: dict, runs: list, store: engine.Store) -> dict[str, Any]:
    """Tables, run.json and the printed Table 1."""
    from pipeline.listing import write_manifest
    from pipeline.precision import setting
    from pipeline.table1 import ablation_table, format_table1, inactive_channels, table1
    from pipeline.tables import join, write_table

    results = [(p, sums[p.label].totals()) for p in plans]
    infos = [i for r in runs for i in r.infos.values()]
    skipped = {k[0]: k for i in infos for k in i.get("skipped", [])}
    if results[0][1]["images"] == 0:
        raise BadInput(f"none of the {len(s.src.manifest)} images of {s.src.url} could be read "
                       f"(first: {sorted(skipped.values())[0][1:] if skipped else '-'})")
    inactive = inactive_channels(census)
    with con.stage("write"):
        ablation = ablation_table(s.jm.name, s.layer.name, inactive, cfg.fraction, results,
                                  list(range(cfg.seeds)), s.train_seed)
        t1 = table1(ablation, census)
        write_manifest(s.src.manifest, join(cfg.out, "manifest.parquet"))
        for t, f in ((census, "census"), (ablation, "ablation"), (t1, "table1")):
            write_table(t, join(cfg.out, f"{f}.parquet"))
    counts = {k: sum(r.counts()[k] for r in runs) for k in runs[0].counts()}
    n, evaluated = len(s.src.manifest), sum(t["images"] for _, t in results)
    workers = [dict(t) for t in {tuple(sorted(i["precision"].items())) for i in infos}]
    info = write_run(
        cfg.out, "ablate", cfg.to_dict(), device=device, fingerprint=store.fingerprint,
        counts={**counts, "images": n, "images_read": n - len(skipped),
                "images_skipped": len(skipped), "shards": len(runs[-1].names) // (
                    1 if cfg.task_per == "shard" else len(plans)),
                "minibatches": math.ceil(n / cfg.eval_batch), "evaluations": len(plans)},
        skipped=[dict(zip(("image_index", "path", "reason"), k))
                 for k in sorted(skipped.values())][:1000],
        seconds=con.seconds, total_seconds=con.wall, work=n, unit="images",
        stage_work={"evaluate": evaluated}, warnings=con.warnings,
        details={"model": s.jm.name, "untrained": s.jm.untrained, "data": s.src.url,
                 "transform": asdict(s.transform), "layer": s.layer.name,
                 "census_source": "census pass" if s.census is None else
                 f"{cfg.from_analysis}/stimuli/channels.parquet", "inactive_channels": inactive,
                 "train_seed": s.train_seed, "precision": {**setting(), "workers": workers}})
    print(format_table1(t1, census), flush=True)
    con.info(f"wrote census, ablation and table1.parquet and run.json to {cfg.out}")
    return info


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, __doc__, AblateConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
