"""Two networks compared on the same images: CKA grids, matched channels, class selectivity.

    python -m jobs.compare                                  # demo data, untrained resnet34 x plainnet34
    python -m jobs.compare --checkpoints r34.pt,p34.pt --data s3://b/imagenet/val \\
        --out s3://b/compare                                # the paper's pair on ImageNet
    python -m jobs.compare --checkpoints r34.pt,r34.pt      # one checkpoint against itself
    python -m jobs.compare --models resnet50,resnet50 --checkpoints run1.pt,run2.pt \\
        --layers layer1,layer2,layer3,layer4 --data ./my_labelled_folders

Networks A and B (`--models`, `--checkpoints`: one value per network, with jobs.analyze's
meaning) see the same images: each shard of the manifest (cut at multiples of --batch-size, so
that the CKA minibatches never depend on shards) is one unit of jobs.runtime.engine on a pool of
long-lived actors holding both models; every image is decoded once and runs through one truncated
forward per network. The accumulators are one `pipeline.stats.collection.Collection`
(`pipeline.compare.collection.ComparePlan`) run by the analysis's `AnalysisResult`; a shard's
state (plain arrays, `.npz`) goes to `<out>/_partials/<fingerprint>/`, then its marker; a rerun
resumes. The merged tables go directly under --out (declared in `pipeline.results.catalog`):
`matches.parquet`, `selectivity.parquet`, `cka.parquet` (docs/compare.md defines them), with
`manifest.parquet` and `run.json`. In `jobs.reproduce` (`chained`): the first two models of the
ResNet family, A×B, A×A and B×B, under `<out>/compare/`.
"""
from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from jobs.runtime import engine
from jobs.runtime.console import Console, init_ray
from jobs.runtime.inputs import check_writable, model_choices
from jobs.runtime.options import BadInput, Options, at_least, bad_input, opt, run_cli
from pipeline.compare.runner import PairFeed

PROG = "python -m jobs.compare"
PAIR = ("resnet34", "plainnet34")
MIN_IMAGES = 4              # the unbiased HSIC needs 4 images (pipeline.compare.cka.MIN_IMAGES)
DEMO_BATCH = 64             # the chain's demo comparison: the demo's 400 images in 7 minibatches


def _two(flag: str):
    """Parse 'A,B' into a pair (an empty item: not given for that network)."""
    def parse(v: str) -> tuple[str, ...]:
        items = tuple(s.strip() for s in v.split(","))
        if len(items) != 2:
            raise BadInput(f"{flag} takes one value per network, A,B; got {len(items)} "
                           f"({v!r})")
        return items
    return parse


@dataclass(frozen=True)
class Config(Options):
    models: tuple[str, ...] | None = opt(
        None, "A,B: the two architectures (torchvision constructor names or plainnetN); default: "
        "each checkpoint's own, else resnet34,plainnet34", parse=_two("--models"), metavar="A,B",
        decides=True)
    checkpoints: tuple[str, ...] | None = opt(
        None, "PATH_A,PATH_B: this project's checkpoints or torchvision state_dicts (local or "
        "s3://); the same path twice compares a network with itself; default: untrained models "
        "with a fixed seed", parse=_two("--checkpoints"), metavar="PATH_A,PATH_B", decides=True)
    names: tuple[str, ...] | None = opt(
        None, "NA,NB: the networks' labels in the tables (default: the model names; when equal, "
        "<name>_a and <name>_b)", parse=_two("--names"), metavar="NA,NB", decides=True)
    layers: str | None = opt(None, "comma-separated layers present in both networks: paper names "
                             "(pool1, conv2 ... convN) for the ResNet family, module paths "
                             "(layer2.1, features.10) for any model; default for two ResNet-"
                             "family networks: pool1 and conv2 ... convN", decides=True)
    data: str | None = opt(None, "image source: folder or s3:// URL (ImageNet val layouts, class "
                           "folders) or a .parquet manifest; default: the embedded demo data",
                           decides=True)
    out: str = opt("./results/compare", "output folder (local or s3://)",
                   parse=lambda v: v.rstrip("/") or v,
                   check=lambda v: None if v else "is empty; give a local folder or an s3:// URL")
    batch_size: int = opt(256, "images per CKA minibatch (and per forward pass): minibatch k is "
                          "image_index k*B ... (k+1)*B-1", check=at_least(MIN_IMAGES),
                          decides=True)
    shards: int | None = opt(None, "number of shards (default: ~2000 images each, at least 2 per "
                             "worker; whole minibatches)", check=at_least(1))
    workers: int | None = opt(None, "Ray actors (default: one per GPU, else one per 4 CPUs)",
                              check=at_least(1))
    limit: int | None = opt(None, "compare on the first N images only", check=at_least(1),
                            decides=True)
    device: str = opt("auto", "auto, cpu or cuda (auto: cuda when the Ray cluster has GPUs)",
                      choices=("auto", "cpu", "cuda"))
    resize: int | None = opt(None, "shorter side before the centre crop (default: the "
                             "checkpoints' own, else 256; demo 72)", check=at_least(1),
                             decides=True)
    crop: int | None = opt(None, "centre crop side (default: the checkpoints' own, else 224; "
                           "demo 64)", check=at_least(1), decides=True)
    precision: str = opt("float32", "Gram products of the CKA: float32 (centred features, "
                         "within 1e-6 of float64 on CKA) or float64; all sums are float64",
                         choices=("float32", "float64"), decides=True)
    seed: int = opt(0, "seed of the untrained models", decides=True)
    resume: bool = opt(True, "recompute every shard even if its partial result exists",
                       flag="--no-resume")

    def check(self) -> None:
        for flag, v in (("--models", self.models), ("--names", self.names)):
            if v is not None and not all(v):
                raise BadInput(f"{flag} has an empty item ({','.join(v)!r}); give A,B")
        if self.models is not None:
            unknown = [m for m in self.models if m not in model_choices()]
            if unknown:
                raise BadInput(f"invalid --models {unknown[0]!r}; allowed: "
                               f"{', '.join(model_choices())}")
        if self.names is not None and self.names[0] == self.names[1]:
            raise BadInput(f"--names must differ, got {self.names[0]!r} twice")
        if self.names is not None and any("/" in n for n in self.names):
            raise BadInput(f"--names may not contain '/', got {','.join(self.names)!r}")
        if self.checkpoints is not None and not all(self.checkpoints):
            raise BadInput(f"--checkpoints has an empty item ({','.join(self.checkpoints)!r}); "
                           "give PATH_A,PATH_B")
        if (self.checkpoints and self.models and self.checkpoints[0] == self.checkpoints[1]
                and self.models[0] != self.models[1]):
            raise BadInput(f"one checkpoint ({self.checkpoints[0]}) for two models "
                           f"({self.models[0]}, {self.models[1]}); a self-comparison names "
                           "one model twice")


@dataclass
class Prepared:
    """Everything the driver resolves before any Ray work or write (all bad input surfaces here)."""

    cfg: Config
    source: Any                  # pipeline.models.study.Source (manifest cut to --limit)
    models: tuple[Any, Any]      # pipeline.models.study.StudyModel of A and B
    transform: Any               # pipeline.data.decode.EvalTransform, one for both
    plan: Any                    # pipeline.compare.collection.ComparePlan
    blobs: tuple[dict, dict]     # pipeline.stats.worker.model_blob of A and B

    @property
    def manifest(self) -> Any:
        return self.source.manifest

    @property
    def warnings(self) -> list[str]:
        return [f"network {ab}: {m.warning}" for ab, m in zip("AB", self.models) if m.warning]


def _names(cfg: Config, models: tuple[str, str]) -> tuple[str, str]:
    if cfg.names is not None:
        return cfg.names[0], cfg.names[1]
    a, b = models
    return (f"{a}_a", f"{b}_b") if a == b else (a, b)


def _transform(cfg: Config, demo: bool, metas: tuple[dict, dict]) -> Any:
    """One evaluation transform for both networks: the flags, else their checkpoints' own (which
    must agree), else the data's default."""
    from pipeline.models.study import eval_transform

    a, b = (eval_transform(cfg.resize, cfg.crop, demo=demo, meta=m) for m in metas)
    if a != b:
        raise BadInput(f"the two checkpoints were evaluated at different sizes (A: resize "
                       f"{a.resize} crop {a.crop}; B: resize {b.resize} crop {b.crop}); give "
                       "--resize and --crop")
    return a


def default_layers(models: Sequence[Any]) -> str:
    """pool1 and conv2 ... convN of the shallower of two ResNet-family networks (the paper's
    pair: pool1, conv2 ... conv33); BadInput for other models (no common default)."""
    from pipeline.models.layers import catalogue, has_paper_names

    if not all(has_paper_names(m) for m in models):
        raise BadInput("--layers is required unless both networks are of the ResNet family: give "
                       "module paths present in both (python -m jobs.receptive_fields --model M "
                       "--list prints them)")
    convs = min(sum(1 for n in catalogue(m) if n.startswith("conv")) for m in models)
    return ",".join(["pool1"] + [f"conv{i}" for i in range(2, convs + 1)])


def _specs(spec: str, models: tuple[Any, Any], names: tuple[str, str], crop: int
           ) -> tuple[tuple, tuple]:
    """Each network's LayerSpecs (geometry at `crop`) for the same layer names; BadInput names
    the network lacking one or whose layer has no square map."""
    from pipeline.models.layers import resolve_layers
    from pipeline.stats.analysis import layer_specs

    specs = []
    for model, name, ab in zip(models, names, "AB"):
        with bad_input(ValueError, KeyError, prefix=f"--layers, network {ab} ({name}): ",
                       first_line=True):
            specs.append(tuple(layer_specs(model, resolve_layers(model, spec), crop)))
    got = [[x.name for x in s] for s in specs]
    if got[0] != got[1]:       # the same names, resolved in each network's forward order
        raise BadInput(f"--layers: the layers run in another order in the two networks "
                       f"(A: {','.join(got[0])}; B: {','.join(got[1])})")
    return specs[0], specs[1]


def prepare(cfg: Config) -> Prepared:
    """The source, both models, their transform and the comparison's plan in one pass (the
    one-pass set-up of pipeline.models.study, for two networks); nothing is written."""
    from pipeline.compare.collection import ComparePlan
    from pipeline.models.study import load_model, read_source
    from pipeline.stats.worker import model_blob

    with bad_input(ValueError, FileNotFoundError, PermissionError, first_line=True):
        source = read_source(cfg.data, limit=cfg.limit)
        if len(source.manifest) < MIN_IMAGES:
            raise BadInput(f"{len(source.manifest)} image(s) in {source.url}; the unbiased CKA "
                           f"needs at least {MIN_IMAGES}")
        classes, width = source.stand_in()
        wanted = cfg.models or ((None, None) if cfg.checkpoints else PAIR)
        models = tuple(load_model(c, m, num_classes=classes, width=width, seed=cfg.seed)
                       for c, m in zip(cfg.checkpoints or (None, None), wanted))
        transform = _transform(cfg, source.demo, (models[0].meta, models[1].meta))
    names = _names(cfg, (models[0].name, models[1].name))
    nets = (models[0].model, models[1].model)
    a, b = _specs(cfg.layers or default_layers(nets), nets, names, transform.crop)
    labels = source.manifest.labels
    n_classes = max(len(source.manifest.classes), int(labels.max()) + 1 if len(labels) else 0, 1)
    # in_place: the worker's activations are its own, the CKA may centre them without a copy
    plan = ComparePlan(names, a, b, n_classes, cfg.batch_size, cfg.precision, in_place=True)
    return Prepared(cfg, source, models, transform, plan,
                    tuple(model_blob(m.model, m.name, m.preprocess) for m in models))


def store(prep: Prepared, device: engine.Device) -> engine.Store:
    """The partial store, keyed by the options that decide a shard's numbers (`decides=True`)
    and what they resolved to: both networks' weights and preprocessing, the image paths, the
    plan (layers, geometry, classes, minibatch, the collection), the transform, the strict-fp32
    setting; not --shards, --workers or --out."""
    from pipeline.models.precision import setting

    resolved = {"models": [m.name for m in prep.models],
                "preprocess": [b["preprocess"] for b in prep.blobs],
                "plan": prep.plan.describe(), "transform": asdict(prep.transform),
                "precision": setting()}
    return engine.Store(prep.cfg.out, engine.fingerprint(
        prep.cfg, resolved, *(engine.digest(b["state_dict"]) for b in prep.blobs),
        prep.source.digest(), device=device))


class CompareWorker(PairFeed):
    """A Pool worker: PairFeed (both models, one decode pipeline across its shards), results as
    Result."""

    def run(self, start: int, stop: int) -> engine.Result:
        return engine.Result(*super().run(start, stop))


def units(prep: Prepared, workers: int) -> list[engine.Unit]:
    from pipeline.compare.collection import shard_ranges

    n, b = len(prep.manifest), prep.plan.batch_size
    shards = prep.cfg.shards or max(2 * workers, math.ceil(n / 2000))
    return engine.range_units("shard-", shard_ranges(n, b, shards=shards))


def summary(tables: dict) -> str:
    """A few lines for a person: per layer, CKA of A and B at that layer, the median matched r
    and each network's median selectivity."""
    import numpy as np

    from pipeline.results import catalog

    cka, m, s = (tables[t.name].to_pandas()
                 for t in (catalog.CKA, catalog.MATCHES, catalog.SELECTIVITY))
    na, nb = m["net_a"].iloc[0], m["net_b"].iloc[0]
    lines = [f"{'layer':<12} {'CKA(A,B)':>9} {'matched r':>10} {'sel. ' + na:>16} "
             f"{'sel. ' + nb:>16}"]
    same = cka[(cka.net_a == na) & (cka.net_b == nb) & (cka.layer_a == cka.layer_b)]
    for layer in dict.fromkeys(m["layer"]):
        c = same[same.layer_a == layer]["cka"]
        r = m[m.layer == layer]["matched_r"].to_numpy()
        sel = [s[(s.net == n) & (s.layer == layer)]["selectivity"].to_numpy() for n in (na, nb)]
        med = [f"{np.nanmedian(v):.3f}" if np.isfinite(v).any() else "—" for v in (r, *sel)]
        lines.append(f"{layer:<12} {c.iloc[0]:>9.3f} {med[0]:>10} {med[1]:>16} {med[2]:>16}")
    lines.append(f"A = {na}, B = {nb}; CKA over {int(cka['n_batches'].iloc[0])} minibatches "
                 f"({int(cka['n_images'].iloc[0])} images), matches and selectivity over every "
                 "image")
    return "\n".join(lines)


def run(cfg: Config, prep: Prepared | None = None) -> dict:
    """The whole job after argument parsing (Ray is started if needed); returns run.json."""
    from functools import partial

    from pipeline.compare.runner import PairFeedSpec
    from pipeline.data.listing import write_manifest
    from pipeline.results import catalog
    from pipeline.results.tables import write
    from pipeline.stats.analysis import AnalysisResult, merge_states

    con = Console("compare")
    with con.stage("setup", quiet=True):
        prep = prep or prepare(cfg)              # every bad input surfaces here, nothing written
        check_writable(cfg.out, device=cfg.device)
        for w in prep.warnings:
            con.warn(w)
        init_ray(cfg.out)
        device = engine.resolve_device(cfg.device)
        pl, dec = device.decode_plan(cfg.workers)
        todo, st = units(prep, pl.workers), store(prep, device)
        pl = engine.Plan(min(pl.workers, len(todo)), pl.resources, pl.threads)
        write_manifest(prep.manifest, catalog.MANIFEST.at(cfg.out))
    n, plan = len(prep.manifest), prep.plan
    con.info(f"{plan.names[0]} (A) x {plan.names[1]} (B): {n} images in minibatches of "
             f"{plan.batch_size}, {len(todo)} shards, {pl.workers} {device.kind} worker(s) "
             f"({pl.resources}, {dec} decode threads), {len(plan.layers)} layers")
    coll = plan.collection()               # the accumulators: their tables are the outputs
    work = PairFeedSpec(plan, prep.manifest, prep.transform, prep.source.demo_root, device.kind,
                        pl.threads, dec)
    fresh: list[int] = []
    with con.stage("compare"):
        stats = engine.run_units(todo, engine.Pool(CompareWorker, prep.blobs, work, inflight=2),
                                 st, plan=pl, resume=cfg.resume,
                                 progress=con.progress(n, "images"),
                                 on_done=lambda u, i: fresh.append(i["images"]))
    with con.stage("merge"):
        # a few partials fold on the driver; many in a tree of Ray tasks
        state = engine.merge(st, stats.names, partial(merge_states, collection=coll),
                             fan_in=4 if len(stats.names) > 8 else None)
        tables = AnalysisResult.from_state(state, coll).tables("")
    with con.stage("write"):
        for table in coll.tables:          # cka last: its file says the job is complete
            write(table, tables[table.name], cfg.out)
    info = _report(cfg, prep, con, device, pl.workers, dec, st, stats, state, tables, sum(fresh))
    con.result(summary(tables))
    con.info(f"done: {info['counts']['images_read']} images ({len(info['skipped'])} skipped) in "
             f"{con.wall:.1f} s -> {cfg.out}")
    return info


def _report(cfg: Config, prep: Prepared, con: Console, device: engine.Device, workers: int,
            dec: int, st: engine.Store, stats: engine.RunStats, state: dict, tables: dict,
            fresh: int) -> dict:
    """run.json (jobs.runtime.runinfo): counts from the markers, the workers' precision flags."""
    from jobs.runtime.runinfo import Markers, write_run
    from pipeline.compare.runner import same_network
    from pipeline.results import catalog
    from pipeline.stats.analysis import state_nbytes

    m = Markers.of(stats)
    read = sum(i["images"] for i in m.infos)
    cka, plan = tables[catalog.CKA.name], prep.plan
    return write_run(
        cfg.out, "compare", cfg.to_dict(), device=device.report(workers),
        fingerprint=st.fingerprint, skipped=m.skipped(),
        counts={**m.counts, "images_read": read, "images": len(prep.manifest),
                "shards": len(stats.names), "layers": len(plan.layers),
                "minibatches": int(cka["n_batches"][0].as_py()) if cka.num_rows else 0,
                "minibatch_images": int(cka["n_images"][0].as_py()) if cka.num_rows else 0},
        seconds=con.seconds, total_seconds=con.wall, work=read, unit="images",
        stage_work={"setup": len(prep.manifest), "compare": fresh}, warnings=con.warnings,
        details={"names": list(plan.names), "models": [x.name for x in prep.models],
                 "checkpoints": list(cfg.checkpoints or (None, None)),
                 "untrained": [x.untrained for x in prep.models],
                 "same_network": same_network(*prep.blobs), "layers": list(plan.layers),
                 "batch_size": plan.batch_size, "gram_precision": plan.precision,
                 "classes": plan.classes, "collection": plan.collection().describe(),
                 "preprocess": [b["preprocess"] for b in prep.blobs],
                 "transform": asdict(prep.transform), "state_bytes": state_nbytes(state),
                 "precision": m.precision(),
                 "decode": {"threads": dec, "nvjpeg": device.kind == "cuda", "prefetch": 2}})


def chained(ctx: Any, model: str | None, seed: int) -> tuple[Config, str] | None:
    """jobs.reproduce's comparison (once, training seed 0): the first two models when both are
    of the ResNet family (A×B, A×A and B×B in one run), at their checkpoints' transform; None
    (the stage is skipped) for other models or when only one of the two has a checkpoint. The
    paper preset compares pool1 and every numbered conv; the demo keeps it light: the layers
    both networks analysed plus the stage outputs, minibatches of 64 (a quarter of --limit when
    that is smaller, at least 4)."""
    from pipeline.models.zoo import is_resnet
    from pipeline.results import layout

    o = ctx.o
    if len(o.models) < 2 or not all(is_resnet(m) for m in o.models[:2]):
        return None
    a, b = o.models[:2]
    ckpts = (ctx.checkpoint(a, 0), ctx.checkpoint(b, 0))
    if any(ckpts) and not all(ckpts):
        return None
    layers, batch = None, 256
    if o.preset == "demo":
        common = [x for x in ctx.layers[a].analysis.split(",")
                  if x in ctx.layers[b].analysis.split(",")]
        layers = ",".join(dict.fromkeys([*common, "layer2", "layer3", "layer4"]))
        batch = DEMO_BATCH if o.limit is None else max(MIN_IMAGES, min(DEMO_BATCH, o.limit // 4))
    resize, crop = ctx.transform(a, 0)
    cfg = Config(models=(a, b), checkpoints=ckpts if all(ckpts) else None, layers=layers,
                 data=ctx.data()[0], out=layout.compare_dir(ctx.out), batch_size=batch,
                 limit=o.limit, resize=resize, crop=crop)
    return cfg, layout.compare_table(ctx.out, "cka")


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, __doc__, Config, run, argv)


if __name__ == "__main__":
    sys.exit(main())
