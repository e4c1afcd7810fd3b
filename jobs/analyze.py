"""Distributed stimulus analysis: top-k stimuli, mean preferred stimuli and channel statistics.

    python -m jobs.analyze                                  # demo data, untrained resnet34
    python -m jobs.analyze --data s3://bucket/imagenet/val --checkpoint s3://bucket/r34.pt \\
        --layers pool1,conv3,conv7 --top-k 16 --out s3://bucket/results/analysis --shards 64
    python -m jobs.analyze --model vgg11_bn --layers features.10,features.17   # any torchvision CNN

Each shard of the manifest is one unit of jobs.runtime.engine on a pool of long-lived actors (one per GPU,
else one per 4 CPUs), each loading the model once and running ONE decode pipeline that reads on
into its next shard while the current one computes (two shards in flight per actor). A shard's
accumulator state goes to `<out>/_partials/<fingerprint>/`, then its marker; a rerun resumes.
Partials merge on the driver into one result; the images of the top-k rows are decoded there and
each distinct RF square cut once, the PNGs encoded by light Ray tasks; the tables of the
analysis's collection of accumulators (`stimuli/{topk,mean,channels,baseline}.parquet`,
pipeline.results.catalog) and `run.json` are written only when complete. Default shards are a
multiple of the workers (`jobs.runtime.device.Plan.shards`).
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from jobs.runtime import engine
from jobs.runtime.console import Console, init_ray
from jobs.runtime.inputs import check_writable, model_choices
from jobs.runtime.options import BadInput, Options, at_least, bad_input, opt, run_cli
from jobs.runtime.runinfo import Markers, write_run
from pipeline.stats.worker import ShardFeed

PROG = "python -m jobs.analyze"


@dataclass(frozen=True)
class Config(Options):
    data: str | None = opt(None, "image source: folder or s3:// URL (ImageNet val layouts, class "
                           "folders) or a .parquet manifest; default: the embedded demo data",
                           decides=True)
    model: str | None = opt(None, "architecture: any torchvision CNN by constructor name, or "
                            "plainnetN; default: the checkpoint's, else resnet34",
                            choices=model_choices, metavar="NAME", decides=True)
    checkpoint: str | None = opt(None, "this project's checkpoint or a torchvision state_dict "
                                 "(local or s3://); default: an untrained model with a fixed seed",
                                 decides=True)
    layers: str = opt("pool1,conv3,conv7", "comma-separated layers: paper names (conv1, pool1, "
                      "conv2 ... convN) for the ResNets, module paths for any model, or all",
                      decides=True)
    top_k: int = opt(16, "stimuli kept per channel and neuron", check=at_least(1), decides=True)
    out: str = opt("./results/analysis", "output folder (local or s3://)",
                   parse=lambda v: v.rstrip("/") or v,
                   check=lambda v: None if v else "is empty; give a local folder or an s3:// URL")
    shards: int | None = opt(None, "number of shards (default: a multiple of the workers, ~2000 "
                             "images each)", check=at_least(1))
    shard_size: int | None = opt(None, "images per shard instead", check=at_least(1))
    workers: int | None = opt(None, "Ray actors (default: one per GPU, else one per 4 CPUs)",
                              check=at_least(1))
    batch_size: int | None = opt(None, "images per forward pass (default: 256 on CUDA up to 224 "
                                 "px; on the CPU 64 at 224 px, up to 256 for smaller crops; "
                                 "never more than the images)", check=at_least(1),
                                 decides=True)
    limit: int | None = opt(None, "analyse only the first N images", check=at_least(1),
                            decides=True)
    device: str = opt("auto", "auto, cpu or cuda (auto: cuda when the Ray cluster has GPUs)",
                      choices=("auto", "cpu", "cuda"))
    resize: int | None = opt(None, "shorter side before the centre crop (default 256; demo 72)",
                             check=at_least(1), decides=True)
    crop: int | None = opt(None, "centre crop side analysed (default 224; demo data 64)",
                           check=at_least(1), decides=True)
    mean_all: bool = opt(False, "also the channel-wide mean stimulus over every positive "
                         "position (neuron 'all'; costs more than the forward pass)",
                         decides=True)
    seed: int = opt(0, "seed of the untrained model", decides=True)
    resume: bool = opt(True, "recompute every shard even if its partial result exists",
                       flag="--no-resume")

    def check(self) -> None:
        if self.shards is not None and self.shard_size is not None:
            raise BadInput("give --shards or --shard-size, not both")


@dataclass
class Prepared:
    """Everything the driver resolves before any Ray work or write (all bad input surfaces here)."""

    cfg: Config
    study: Any                   # pipeline.models.study.Study: source, model, transform, layers
    blob: dict                   # pipeline.stats.worker.model_blob: what workers rebuild it from
    specs: list                  # pipeline.stats.analysis.LayerSpec
    options: Any                 # pipeline.stats.analysis.AnalysisOptions
    rf_table: Any
    batch_size: int              # --batch-size, else pipeline.stats.analysis.default_batch_size
                                 # (the CPU's here; run() takes the device's)
    compiled: bool | None = None  # torch.compile'd scans: run() decides (compile_by_default)

    @property
    def manifest(self) -> Any:
        return self.study.source.manifest

    @property
    def transform(self) -> Any:
        return self.study.transform

    @property
    def demo_root(self) -> str | None:
        return self.study.source.demo_root

    @property
    def model_name(self) -> str:
        return self.study.model.name


def prepare(cfg: Config) -> Prepared:
    """Source, model, layers and their geometry in one pass; nothing is written."""
    from pipeline.models.layers import rf_layers
    from pipeline.models.rf_catalogue import rf_table
    from pipeline.models.study import resolve
    from pipeline.stats.analysis import AnalysisOptions, default_batch_size, layer_specs
    from pipeline.stats.worker import model_blob

    # the pipeline's ValueError or missing file: bad input (exit 2)
    with bad_input(ValueError, FileNotFoundError, PermissionError, first_line=True):
        s = resolve(cfg.data, cfg.checkpoint, cfg.model, cfg.layers, resize=cfg.resize,
                    crop=cfg.crop, limit=cfg.limit, seed=cfg.seed)
        specs = layer_specs(s.model.model, s.layers, s.transform.crop)
        cat = rf_layers(s.model.model)
        rf = rf_table(s.model.model, s.model.name, s.transform.crop,
                      [*cat.values(), *(la for la in s.layers if la.name not in cat)])
    options = AnalysisOptions(top_k=cfg.top_k,
                              mean_neurons=("center", "all") if cfg.mean_all else ("center",))
    return Prepared(cfg, s, model_blob(s.model.model, s.model.name, s.model.preprocess), specs,
                    options, rf, cfg.batch_size or default_batch_size(
                        s.transform.crop, images=len(s.source.manifest)))


def store(prep: Prepared, device: engine.Device, precision: dict | None = None) -> engine.Store:
    """The partial store, keyed by the options that decide a shard's numbers and what they
    resolved to (weights, image paths, preprocessing, transform, batch size) plus the strict-fp32
    setting the workers run under (`precision`: default, pipeline.models.precision's)."""
    from pipeline.models.precision import setting
    from pipeline.stats.accumulators import use_compile

    resolved = {"preprocess": prep.blob["preprocess"], "transform": asdict(prep.transform),
                "batch_size": prep.batch_size,
                "collection": prep.options.collection().describe(),   # the accumulators run
                "precision": setting() if precision is None else precision,
                # eager and compiled scans differ in the last bits of the float sums
                "compiled_scan": use_compile() if prep.compiled is None else prep.compiled}
    return engine.Store(prep.cfg.out, engine.fingerprint(
        prep.cfg, resolved, engine.digest(prep.blob["state_dict"]), prep.study.source.digest(),
        device=device))


class ShardWorker(ShardFeed):
    """A Pool worker: ShardFeed (one decode pipeline across its shards), results as Result."""

    def run(self, start: int, stop: int) -> engine.Result:
        from pipeline.stats.analysis import state_nbytes

        state, info = super().run(start, stop)
        # the state's size in the marker: the driver reports it without another copy
        return engine.Result(state, {**info, "state_bytes": state_nbytes(state)})


def _as_result(value: Any, coll: Any) -> Any:
    """A partial as loaded (a state) or a result being folded: the result."""
    from pipeline.stats.analysis import AnalysisResult

    return value if isinstance(value, AnalysisResult) else AnalysisResult.from_state(value, coll)


def _fold(coll: Any, a: Any, b: Any) -> Any:
    """engine.merge's combine: partials fold into one AnalysisResult of the collection `coll`
    (no state round trips)."""
    return _as_result(a, coll).merge(_as_result(b, coll))


def render_patches(prep: Prepared, topk: Any, cpus: int) -> dict[int, bytes]:
    """PNG of every top-k row: images decoded and squares cut here (pipeline.stats.stimuli),
    the PNG groups encoded by Ray tasks in light workers (numpy and Pillow: no torch import),
    or here when there is only one group's work."""
    import ray

    from pipeline.stats.patches import encode
    from pipeline.stats.stimuli import patch_pngs

    task = ray.remote(encode).options(num_cpus=1)

    def fan_out(groups: list) -> list:
        if len(groups) == 1:
            return [encode(groups[0])]
        return ray.get([task.remote(g) for g in groups])

    return patch_pngs(prep.manifest, prep.transform, topk, max_groups=2 * max(1, cpus),
                      encode_groups=fan_out)


def units(prep: Prepared, plan: engine.Plan) -> list[engine.Unit]:
    """The shards: --shard-size or --shards, else `Plan.shards` (a multiple of the workers)."""
    from pipeline.data.shards import shard_ranges

    n, cfg = len(prep.manifest), prep.cfg
    ranges = (shard_ranges(n, shard_size=cfg.shard_size) if cfg.shard_size else
              shard_ranges(n, shards=cfg.shards or plan.shards(n)))
    return engine.range_units("shard-", ranges)


def _for_device(cfg: Config, prep: Prepared, device: str, workers: int) -> None:
    """The choices that wait for the device: its default batch (prepare() assumed the CPU's)
    and compiled scans where a worker analyses enough images to pay the compile back."""
    from pipeline.stats.accumulators import compile_by_default
    from pipeline.stats.analysis import default_batch_size

    n, crop = len(prep.manifest), prep.transform.crop
    if cfg.batch_size is None:
        prep.batch_size = default_batch_size(crop, device, n)
    prep.compiled = compile_by_default(-(-n // workers), crop, device)


def _tables(con: Console, prep: Prepared, coll: Any, st: engine.Store, names: list[str],
            cpus: int) -> tuple[dict, dict[int, bytes]]:
    """The merge (on the driver, into one result: a partial is a few MiB and merging it
    milliseconds, less than a worker process's start, which a tree of Ray tasks paid per leaf),
    then the top-k patches: every table of the collection, and the PNGs."""
    from functools import partial

    from pipeline.results import catalog
    from pipeline.stats.stimuli import with_patches

    with con.stage("merge"):
        merged = _as_result(engine.merge(st, names, partial(_fold, coll)), coll)
        tables = merged.tables(prep.model_name)
    with con.stage("patches"):
        topk = tables[catalog.TOPK.name]
        pngs = render_patches(prep, topk, cpus)
        tables[catalog.TOPK.name] = with_patches(topk, pngs)
    return tables, pngs


def run(cfg: Config, prep: Prepared | None = None) -> dict:
    """The whole job after argument parsing (Ray is started if needed); returns run.json."""
    from pipeline.data.listing import write_manifest
    from pipeline.results import catalog
    from pipeline.results.tables import write
    from pipeline.stats.worker import FeedSpec

    con = Console("analyze")
    with con.stage("setup", quiet=True):
        prep = prep or prepare(cfg)              # every bad input surfaces here, nothing written
        check_writable(cfg.out, device=cfg.device)
        if prep.study.model.warning:
            con.warn(prep.study.model.warning)
        init_ray(cfg.out)
        device = engine.resolve_device(cfg.device)
        pl, dec = device.decode_plan(cfg.workers)
        _for_device(cfg, prep, device.kind, pl.workers)
        todo, st = units(prep, pl), store(prep, device)
        pl = engine.Plan(min(pl.workers, len(todo)), pl.resources, pl.threads)
        write_manifest(prep.manifest, catalog.MANIFEST.at(cfg.out))
        write(catalog.RECEPTIVE_FIELDS, prep.rf_table, cfg.out)
    n = len(prep.manifest)
    con.info(f"{n} images, {len(todo)} shards, {pl.workers} {device.kind} worker(s) "
             f"({pl.resources}, {dec} decode threads), layers "
             f"{','.join(s.name for s in prep.specs)}")
    coll = prep.options.collection()          # the accumulators: their tables are the outputs
    work = FeedSpec(prep.specs, coll, prep.manifest, prep.transform, prep.demo_root,
                    device.kind, prep.batch_size, pl.threads, dec, compile=prep.compiled)
    fresh: list[int] = []                       # images of the shards computed by this run
    with con.stage("analyze"):
        stats = engine.run_units(todo, engine.Pool(ShardWorker, prep.blob, work, inflight=2), st,
                                 plan=pl, resume=cfg.resume, progress=con.progress(n, "images"),
                                 on_done=lambda u, i: fresh.append(i["images"]))
    tables, pngs = _tables(con, prep, coll, st, stats.names, device.cpus)
    with con.stage("write"):
        for table in coll.tables:
            write(table, tables[table.name], cfg.out)
    info = _report(cfg, prep, con, device, pl.workers, dec, st, stats, {
        "images": n, "fresh": sum(fresh), "patches": sum(1 for v in pngs.values() if v),
        "rows": sum(t.num_rows for t in tables.values())})
    con.info(f"done: {info['counts']['images_read']} images ({len(info['skipped'])} skipped) in "
             f"{con.wall:.1f} s -> {cfg.out}")
    return info


def _report(cfg: Config, prep: Prepared, con: Console, device: engine.Device, workers: int,
            dec: int, st: engine.Store, stats: engine.RunStats, n: dict) -> dict:
    """run.json (jobs.runtime.runinfo): counts from the markers, the workers' precision flags,
    a shard state's size (every shard's is the same: it does not grow with the images)."""
    m = Markers.of(stats)
    read = sum(i["images"] for i in m.infos)
    return write_run(
        cfg.out, "analyze", cfg.to_dict(), device=device.report(workers),
        fingerprint=st.fingerprint, skipped=m.skipped(),
        counts={**m.counts, "images_read": read, "images": n["images"],
                "shards": len(stats.names), "layers": len(prep.specs), "patches": n["patches"]},
        seconds=con.seconds, total_seconds=con.wall, work=read, unit="images",
        stage_work={"setup": n["images"], "analyze": n["fresh"],
                    "merge": (len(stats.names), "partials"), "patches": (n["patches"], "patches"),
                    "write": (n["rows"], "rows")}, warnings=con.warnings,
        details={"model": prep.model_name, "untrained": prep.study.model.untrained,
                 "preprocess": prep.blob["preprocess"], "transform": asdict(prep.transform),
                 "layers": [asdict(s) for s in prep.specs],
                 "worker_state_bytes": max((i.get("state_bytes", 0) for i in m.infos), default=0),
                 "precision": m.precision(),
                 "decode": {"threads": dec, "nvjpeg": device.kind == "cuda", "prefetch": 2},
                 "compiled_scan": bool(prep.compiled)})


def chained(ctx: Any, model: str, seed: int) -> tuple[Config, str]:
    """jobs.reproduce's analysis of `model` at training seed `seed`: its layers, its
    checkpoint's transform; and the table that says it is complete."""
    from pipeline.results import layout

    resize, crop = ctx.transform(model, seed)
    cfg = Config(data=ctx.data()[0], model=model, checkpoint=ctx.checkpoint(model, seed),
                 layers=ctx.layers[model].analysis, out=layout.analysis_dir(ctx.out, model, seed),
                 limit=ctx.o.limit, resize=resize, crop=crop)
    return cfg, layout.stimuli(ctx.out, model, "channels", seed)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, __doc__, Config, run, argv)


if __name__ == "__main__":
    sys.exit(main())
