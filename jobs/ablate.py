"""Inactive channels of a layer and the noise ablation (the paper's Table 1), on jobs.runtime.engine.

    python -m jobs.ablate --out ./results/ablation                       # demo data, untrained
    python -m jobs.ablate --data s3://b/imagenet/val --checkpoint s3://b/ckpt/resnet34.pt \\
        --seeds 3 --shards 64 --out s3://b/results/ablation/resnet34
    python -m jobs.ablate --checkpoint vgg.pt --model vgg11_bn --layer features.3 --out ...

Census: the channels of --layer that output 0 on every image (--from's channels.parquet, or a
unit per shard). Evaluation: a unit per (plan, shard), or per shard with --task-per shard, adds
ReLU(N(0,1)) noise to the plan's channels: clean, inactive-all, inactive-random (per --fraction
size), control-active. Strict fp32; numbers never depend on --shards or workers; a rerun
resumes from <out>/_partials/ (docs/ablation.md).
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from jobs.runtime import engine
from jobs.runtime.inputs import check_writable, model_choices
from jobs.runtime.console import Console, init_ray
from jobs.runtime.options import BadInput, Options, at_least, bad_input, opt, run_cli
from jobs.runtime.runinfo import Markers, write_run
from pipeline.ablation import noise as ablation
from pipeline.ablation.noise import DEFAULT_SUBSETS, Subset, parse_subsets
from pipeline.ablation.setup import AblationSetup as Setup, check_labels, read_census
from pipeline.data.listing import write_manifest
from pipeline.ablation.table1 import (ablation_table, census_table, format_table1, inactive_channels,
                             no_inactive_note, table1)
from pipeline.results import catalog
from pipeline.results.tables import exists, join, read_json, write

PROG = "python -m jobs.ablate"


def _fractions(text: str) -> tuple[Subset, ...]:
    with bad_input():
        return parse_subsets(text)


@dataclass(frozen=True)
class AblateConfig(Options):
    out: str = opt(help="output folder (local path or s3://...)",
                   check=lambda v: None if v.strip() else "must name a folder or s3:// URL")
    data: str | None = opt(None, "labelled validation images (folder, s3:// URL or .parquet "
                           "manifest); default: the embedded demo data's val/", decides=True)
    checkpoint: str | None = opt(None, "checkpoint URL (ours or a torchvision state_dict); "
                                 "default: a randomly initialised --model (UNTRAINED)",
                                 decides=True)
    model: str | None = opt(None, "any supported CNN (resnet34, plainnet34, vgg11_bn ...); "
                            "default: the checkpoint's, else resnet34", choices=model_choices,
                            metavar="NAME", decides=True)
    layer: str | None = opt(None, "the layer counted and noised: paper name (pool1, conv3) or "
                            "module path (features.3); default: pool1 (ResNet family), else "
                            "the first max-pooling module", decides=True)
    seeds: int = opt(3, "noise seeds 0 .. N-1", check=at_least(1))
    fraction: tuple[Subset, ...] = opt(
        parse_subsets(DEFAULT_SUBSETS), f"inactive-random subset sizes (default "
        f"{DEFAULT_SUBSETS}), a row each: a fraction p in (0, 1] keeps each inactive channel "
        "with probability p (0.25 or 25%%), Nch noises exactly N; drawn anew per minibatch",
        parse=_fractions, show=lambda v: ",".join(s.label for s in v))
    train_seed: int | None = opt(None, "training seed of the weights (train_seed column); "
                                 "default: the checkpoint recipe's, else 0", check=at_least(0))
    shards: int = opt(8, "shards (cut on --eval-batch boundaries)", check=at_least(1))
    eval_batch: int = opt(256, "minibatch of the global image order (inactive-random redraws "
                          "per minibatch; also the forward batch)", check=at_least(1),
                          decides=True)
    from_analysis: str | None = opt(None, "jobs.analyze output whose stimuli/channels.parquet is "
                                    "the census; default: a census pass", flag="--from",
                                    metavar="ANALYSIS_OUT")
    limit: int | None = opt(None, "only the first N images of the manifest", check=at_least(1),
                            decides=True)
    resize: int | None = opt(None, "shorter side (default 256; demo 72)", check=at_least(1),
                             decides=True)
    crop: int | None = opt(None, "centre crop (default 224; demo 64)", check=at_least(1),
                           decides=True)
    device: str = opt("auto", "auto: cuda if the cluster has GPUs", choices=("auto", "cpu", "cuda"))
    gpus_per_task: float | None = opt(None, "GPUs per Ray task (default: 1 on a cluster with "
                                      "GPUs unless --device cpu)", check=at_least(0))
    cpus_per_task: float = opt(1.0, "CPUs per Ray task (default 1)", check=at_least(0.01))
    task_per: str = opt("plan", "plan: a unit per (condition, seed, shard); shard: per shard, "
                        "each batch decoded once for every plan (same numbers)",
                        choices=("plan", "shard"))


def prepare(cfg: AblateConfig) -> tuple[Setup, list[str]]:
    """Data, model, layer and (with --from) the census in one pass, and the warnings to show;
    every bad input surfaces here and nothing is written."""
    from pipeline.models.study import resolve

    with bad_input(ValueError, FileNotFoundError, first_line=True):
        st = resolve(cfg.data, cfg.checkpoint, cfg.model, None, resize=cfg.resize, crop=cfg.crop,
                     limit=cfg.limit, require_labels=True)
    with bad_input():   # an unknown layer, no max-pooling layer to default to, labels past fc
        layer = ablation.ablation_layer(st.model.model, cfg.layer)
        check_labels(st.source.manifest.labels, st.model.model, st.source.url, st.model.name)
    seed = int((st.model.meta.get("recipe") or {}).get("seed") or 0)
    s = Setup(st.model.model, st.model.name, st.model.preprocess, st.model.untrained, layer,
              st.source.url, st.source.manifest, st.transform,
              seed if cfg.train_seed is None else cfg.train_seed,
              engine.digest(st.model.model.state_dict()))
    s.census = _census_from(cfg, s) if cfg.from_analysis else None
    return s, [w for w in (st.model.warning, *_from_warnings(cfg)) if w]


def _census_from(cfg: AblateConfig, s: Setup) -> Any:
    """--from's channels.parquet as a census."""
    with bad_input(prefix=f"--from {cfg.from_analysis}: "):
        return read_census(cfg.from_analysis, s.model_name, s.layer, s.train_seed)


def _from_warnings(cfg: AblateConfig) -> list[str]:
    """A warning when --from's run.json names another checkpoint or data set (channel counts
    alone cannot tell other weights apart)."""
    if not cfg.from_analysis:
        return []
    run = join(cfg.from_analysis, "run.json")
    theirs = read_json(run).get("config", {}) if exists(run) else {}
    return [f"--from {cfg.from_analysis} analysed {k} {theirs.get(k) or 'default'}, this run "
            f"uses {getattr(cfg, k) or 'default'}: make sure they are the same"
            for k in ("checkpoint", "data") if theirs and theirs.get(k) != getattr(cfg, k)]


def fingerprint(cfg: AblateConfig, s: Setup, device: engine.Device,
                inactive: Sequence[int] | None = None, precision: dict | None = None) -> str:
    """The partials' folder: the options that decide the numbers, the weights, what the
    options resolved to (preprocessing, layer, transform, images), the units' precision
    (default pipeline.models.precision.setting(): strict fp32) and, for the evaluation, the
    inactive set. Not shards, seeds or subsets: unit names hold ranges and plans."""
    from pipeline.models.precision import setting

    resolved = {"model": s.model_name, "preprocess": s.preprocess.state(),
                "layer": s.layer.name, "images": len(s.manifest),
                "transform": asdict(s.transform), "precision": precision or setting(),
                "inactive": None if inactive is None else list(inactive)}
    return engine.fingerprint(cfg, resolved, s.weights, device=device)


def _resources(cfg: AblateConfig) -> tuple[engine.Device, engine.Plan]:
    """The device and each Ray task's share; --gpus-per-task 0 means CPU tasks."""
    device = engine.resolve_device(cfg.device)
    gpus = float(device.kind == "cuda") if cfg.gpus_per_task is None else cfg.gpus_per_task
    if device.kind == "cuda" and not gpus:
        device = engine.resolve_device("cpu")
    return device, device.task_plan(gpus, cfg.cpus_per_task)


def _shard(model: Any, preprocess: Any, layer: Any, manifest: Any, transform: Any, batch: int,
           device: str, cpus: int | None, plans: list | None, start: int,
           stop: int) -> engine.Result:
    """One unit: the census (plans None) or the plans' evaluation sums of images [start, stop),
    decoded with `cpus` threads (the CPUs the task reserved; None: all it sees, on a GPU)."""
    from pipeline.data.decode import Decoder, iter_batches

    with Decoder(transform, cpus=cpus) as dec:
        batches = iter_batches(manifest, start, stop, batch, transform, decoder=dec)
        value, skipped, flags = (
            ablation.census_shard(model, preprocess, layer, batches, device) if plans is None
            else ablation.eval_shard(model, preprocess, layer, plans, batches, batch, device))
    return engine.Result(_state(value),
                         {"skipped": [list(k) for k in skipped], "precision": flags})


def _state(value: Any) -> dict:
    """A unit's value as a partial state: the census's ChannelStats, or each plan's EvalSums
    with its rows as one float64 array (counts below 2**53 and the float loss sums round-trip
    exactly)."""
    if not isinstance(value, dict):
        return value.state()
    return {label: {"eval_batch": v.eval_batch,
                    "rows": np.asarray(v.state()["rows"], dtype=np.float64).reshape(-1, 6)}
            for label, v in value.items()}


def _sums(state: dict) -> dict[str, Any]:
    """{plan label: EvalSums} of an evaluation state."""
    return {label: ablation.EvalSums.from_state({"eval_batch": v["eval_batch"],
                                                 "rows": v["rows"].tolist()})
            for label, v in state.items()}


def _merge_census(a: dict, b: dict) -> dict:
    from pipeline.stats.accumulators import ChannelStats

    return ChannelStats.from_state(a).merge(ChannelStats.from_state(b)).state()


def _merge_evaluation(a: dict, b: dict) -> dict:
    return _state(ablation.merge_sums(_sums(a), _sums(b)))


def _stage(con: Console, name: str, groups: list, ranges: list, work: engine.Task,
           store: engine.Store, plan: engine.Plan) -> tuple[Any, engine.RunStats]:
    """A unit per (group of plans, shard), group None being the census; returns the merged
    partials (ChannelStats, or {plan label: EvalSums}) and the stage's unit counts."""
    def tag(g: list | None) -> str:
        return "" if g is None else f"{g[0].label}-" if len(g) == 1 else "all-"

    units = [u for g in groups
             for u in engine.range_units(f"{name}-{tag(g)}", ranges, g, weight=len(g or [0]))]
    with con.stage(name):
        stats = engine.run_units(units, work, store, plan=plan, progress=con.progress(
            sum(u.size for u in units), "images" if name == "census" else "images evaluated"))
    if stats.resumed:
        con.info(f"{name}: {stats.resumed} of {len(units)} units resumed")
    if name == "census":
        from pipeline.stats.accumulators import ChannelStats

        return ChannelStats.from_state(engine.merge(store, stats.names, _merge_census)), stats
    return _sums(engine.merge(store, stats.names, _merge_evaluation)), stats


def run(cfg: AblateConfig) -> dict[str, Any]:
    """The whole job after argument parsing (Ray started if needed); returns run.json."""
    con = Console("ablate")
    with con.stage("setup", quiet=True):
        s, warnings = prepare(cfg)           # every bad input surfaces here, nothing written
        check_writable(cfg.out, device=cfg.device)
        for w in warnings:
            con.warn(w)
        init_ray(cfg.out)
        device, plan = _resources(cfg)
    name, n = s.layer.name, len(s.manifest)
    ranges = ablation.minibatch_shards(n, cfg.eval_batch, cfg.shards)
    con.info(f"{s.model_name} {name}: {n} images from {s.data}, {len(ranges)} "
             f"shard(s) of {cfg.eval_batch}-image minibatches, {device.kind} x{plan.workers}")
    work = engine.Task(_shard, s.model, s.preprocess, s.layer, s.manifest, s.transform,
                       cfg.eval_batch, device.kind,
                       max(1, int(cfg.cpus_per_task)) if device.kind == "cpu" else None)
    census, runs = s.census, []
    if census is None:
        stats, st = _stage(con, "census", [None], ranges, work,
                           engine.Store(cfg.out, fingerprint(cfg, s, device)), plan)
        census, runs = census_table(stats.to_table(s.model_name, name), s.model_name, name,
                                    s.layer.channels, s.train_seed), [st]
    inactive = inactive_channels(census)
    con.tick(f"{name}: {len(inactive)} of {s.layer.channels} channels inactive "   # the chain too
             f"({'census' if s.census is None else '--from'}): "
             f"{inactive if inactive else no_inactive_note(name)}")
    plans = ablation.make_plans(inactive, s.layer.channels, range(cfg.seeds), cfg.fraction,
                                cfg.eval_batch)
    store = engine.Store(cfg.out, fingerprint(cfg, s, device, inactive))
    groups = [plans] if cfg.task_per == "shard" else [[p] for p in plans]
    sums, st = _stage(con, "evaluate", groups, ranges, work, store, plan)
    results = [(p, sums[p.label].totals()) for p in plans]
    text = _write(cfg, s, con, census, inactive, results)
    info = _report(cfg, s, con, device.report(plan.workers), store, [*runs, st], results,
                   {"shards": len(ranges), "inactive_channels": inactive})
    con.result(text)
    return info


def _write(cfg: AblateConfig, s: Setup, con: Console, census: Any, inactive: list[int],
           results: list) -> str:
    """manifest, census, ablation and table1.parquet; returns Table 1 as text."""
    if results[0][1]["images"] == 0:
        raise BadInput(f"none of the {len(s.manifest)} images of {s.data} could be read")
    with con.stage("write"):
        rows = ablation_table(s.model_name, s.layer.name, inactive, cfg.fraction, results,
                              list(range(cfg.seeds)), s.train_seed)
        t1 = table1(rows, census)
        write_manifest(s.manifest, catalog.MANIFEST.at(cfg.out))
        for table, decl in ((census, catalog.CENSUS), (rows, catalog.ABLATION),
                            (t1, catalog.TABLE1)):
            write(decl, table, cfg.out)
    return format_table1(t1, census)


def _report(cfg: AblateConfig, s: Setup, con: Console, device: dict, store: engine.Store,
            runs: list[engine.RunStats], results: list, extra: dict) -> dict[str, Any]:
    """run.json: unit counts of both stages, skipped images, the precision each unit saw."""
    m = Markers.of(*runs)
    skipped = m.skipped()
    info = write_run(
        cfg.out, "ablate", cfg.to_dict(), device=device, fingerprint=store.fingerprint,
        counts=m.counts | s.counts(len(skipped), cfg.eval_batch, extra["shards"], len(results)),
        skipped=skipped[:1000], seconds=con.seconds, total_seconds=con.wall,
        work=len(s.manifest), unit="images",
        stage_work={"evaluate": sum(t["images"] for _, t in results)}, warnings=con.warnings,
        details=s.details(extra["inactive_channels"], m.precision()))
    con.info(f"wrote census, ablation and table1.parquet and run.json to {cfg.out}")
    return info


def chained(ctx: Any, model: str, seed: int) -> tuple[AblateConfig, str]:
    """jobs.reproduce's ablation of `model` at training seed `seed`: the census from its
    analysis, every noise seed and fraction, each batch decoded once for every plan."""
    from pipeline.results import layout

    o, (resize, crop) = ctx.o, ctx.transform(model, seed)
    demo = {"shards": 2, "eval_batch": 64} if o.preset == "demo" else {}
    fraction = {"fraction": _fractions(o.fractions)} if o.fractions else {}
    cfg = AblateConfig(out=layout.ablation_dir(o.out, model, seed), data=ctx.data()[0],
                       checkpoint=ctx.checkpoint(model, seed), model=model,
                       layer=ctx.layers[model].ablate, seeds=o.noise_seeds, train_seed=seed,
                       from_analysis=layout.analysis_dir(o.out, model, seed), limit=o.limit,
                       resize=resize, crop=crop, task_per="shard", **demo, **fraction)
    return cfg, layout.ablation_table(o.out, model, "table1", seed)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, __doc__, AblateConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
