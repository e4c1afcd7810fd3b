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
forward per network. A shard's accumulator state goes to `<out>/_partials/<fingerprint>/`, then
its marker; a rerun resumes. The merged tables go directly under --out: `cka.parquet`,
`matches.parquet`, `selectivity.parquet` (docs/compare.md defines them), with `manifest.parquet`
and `run.json`.
"""
from __future__ import annotations

import hashlib
import math
import sys
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from jobs.runtime import engine
from jobs.runtime.console import Console, init_ray
from jobs.runtime.inputs import (check_writable, default_model_shape, eval_transform,
                                 load_job_model, resolve_data)
from jobs.runtime.options import BadInput, Options, at_least, bad_input, opt, run_cli

PROG = "python -m jobs.compare"
PARTIAL_FORMAT = 1          # bump when the partial state layout changes: old partials are ignored
PAIR = ("resnet34", "plainnet34")
TABLES = ("cka", "matches", "selectivity")


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
        "each checkpoint's own, else resnet34,plainnet34", parse=_two("--models"), metavar="A,B")
    checkpoints: tuple[str, ...] | None = opt(
        None, "PATH_A,PATH_B: this project's checkpoints or torchvision state_dicts (local or "
        "s3://); the same path twice compares a network with itself; default: untrained models "
        "with a fixed seed", parse=_two("--checkpoints"), metavar="PATH_A,PATH_B")
    names: tuple[str, ...] | None = opt(
        None, "NA,NB: the networks' labels in the tables (default: the model names; when equal, "
        "<name>_a and <name>_b)", parse=_two("--names"), metavar="NA,NB")
    layers: str | None = opt(None, "comma-separated layers present in both networks: paper names "
                             "(pool1, conv2 ... convN) for the ResNet family, module paths "
                             "(layer2.1, features.10) for any model; default for two ResNet-"
                             "family networks: pool1 and conv2 ... convN")
    data: str | None = opt(None, "image source: folder or s3:// URL (ImageNet val layouts, class "
                           "folders) or a .parquet manifest; default: the embedded demo data")
    out: str = opt("./results/compare", "output folder (local or s3://)",
                   parse=lambda v: v.rstrip("/") or v,
                   check=lambda v: None if v else "is empty; give a local folder or an s3:// URL")
    batch_size: int = opt(256, "images per CKA minibatch (and per forward pass): minibatch k is "
                          "image_index k*B ... (k+1)*B-1", check=at_least(4))
    shards: int | None = opt(None, "number of shards (default: ~2000 images each, at least 2 per "
                             "worker; whole minibatches)", check=at_least(1))
    workers: int | None = opt(None, "Ray actors (default: one per GPU, else one per 4 CPUs)",
                              check=at_least(1))
    limit: int | None = opt(None, "compare on the first N images only", check=at_least(1))
    device: str = opt("auto", "auto, cpu or cuda (auto: cuda when the Ray cluster has GPUs)",
                      choices=("auto", "cpu", "cuda"))
    resize: int | None = opt(None, "shorter side before the centre crop (default: the "
                             "checkpoints' own, else 256; demo 72)", check=at_least(1))
    crop: int | None = opt(None, "centre crop side (default: the checkpoints' own, else 224; "
                           "demo 64)", check=at_least(1))
    precision: str = opt("float32", "Gram products of the CKA: float32 (centred features, "
                         "within 1e-6 of float64 on CKA) or float64; all sums are float64",
                         choices=("float32", "float64"))
    seed: int = opt(0, "seed of the untrained models")
    resume: bool = opt(True, "recompute every shard even if its partial result exists",
                       flag="--no-resume")

    def check(self) -> None:
        for flag, v in (("--models", self.models), ("--names", self.names)):
            if v is not None and not all(v):
                raise BadInput(f"{flag} has an empty item ({','.join(v)!r}); give A,B")
        if self.names is not None and self.names[0] == self.names[1]:
            raise BadInput(f"--names must differ, got {self.names[0]!r} twice")
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
    """Everything the driver resolves before any Ray work (all bad input surfaces here)."""

    cfg: Config
    models: tuple[str, str]      # architectures
    blobs: tuple[dict, dict]     # pipeline.stats.analysis.model_blob of A and B
    spec: Any                    # pipeline.compare.result.CompareSpec
    manifest: Any                # pipeline.data.listing.Manifest (after --limit)
    transform: Any               # pipeline.data.decode.EvalTransform
    demo_root: str | None
    untrained: tuple[bool, bool]
    warnings: list[str]


def _names(cfg: Config, models: tuple[str, str]) -> tuple[str, str]:
    if cfg.names is not None:
        return cfg.names[0], cfg.names[1]
    a, b = models
    return (f"{a}_a", f"{b}_b") if a == b else (a, b)


def _transform(cfg: Config, demo: bool, metas: tuple[dict, dict]):
    """One evaluation transform for both networks: the flags, else their checkpoints' own (which
    must agree), else the data's default."""
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


def _layers(spec: str, models: tuple[Any, Any], names: tuple[str, str]) -> tuple[list, list]:
    """Each network's Layer entries for the same names; BadInput names the network lacking one."""
    from pipeline.models.layers import resolve_layers

    resolved = []
    for model, name, ab in zip(models, names, "AB"):
        with bad_input(ValueError, prefix=f"--layers, network {ab} ({name}): ", first_line=True):
            resolved.append(resolve_layers(model, spec))
    got = [[x.name for x in r] for r in resolved]
    if got[0] != got[1]:       # the same names, resolved in each network's forward order
        raise BadInput(f"--layers: the layers run in another order in the two networks "
                       f"(A: {','.join(got[0])}; B: {','.join(got[1])})")
    return resolved[0], resolved[1]


def _shapes(model: Any, layers: list, preprocess: Any, crop: int) -> tuple[tuple[int, ...], ...]:
    """(C, H, W) of each layer's output for one crop ((C, 1, 1) for an (N, C) output)."""
    import torch

    from pipeline.models.hooks import capture

    with torch.no_grad():
        acts = capture(model.eval(), preprocess(torch.zeros((1, 3, crop, crop))), layers)
    out = []
    for x in layers:
        s = tuple(int(v) for v in acts[x.name].shape[1:])
        if len(s) not in (1, 3):
            raise BadInput(f"--layers: {x.name} gives a {len(s) + 1}-d output; allowed: "
                           "(N, C, H, W) maps or (N, C) vectors")
        out.append(s if len(s) == 3 else (s[0], 1, 1))
    return tuple(out)


def prepare(cfg: Config) -> Prepared:
    from pipeline.compare.result import CompareSpec
    from pipeline.stats.analysis import model_blob

    check_writable(cfg.out)
    with bad_input(ValueError, FileNotFoundError, PermissionError, first_line=True):
        data = resolve_data(cfg.data, limit=cfg.limit)
        classes, width = default_model_shape(data)
        if len(data.manifest) < 4:
            raise BadInput(f"{len(data.manifest)} image(s) in {data.url}; the unbiased CKA needs "
                           "at least 4")
        wanted = cfg.models or ((None, None) if cfg.checkpoints else PAIR)
        ckpts = cfg.checkpoints or (None, None)
        jms = tuple(load_job_model(c, m, num_classes=classes, width=width, seed=cfg.seed)
                    for c, m in zip(ckpts, wanted))
    models = (jms[0].name, jms[1].name)
    names = _names(cfg, models)
    transform = _transform(cfg, data.demo, (jms[0].meta, jms[1].meta))
    nets = (jms[0].model, jms[1].model)
    la, lb = _layers(cfg.layers or default_layers(nets), nets, names)
    labels = data.manifest.labels
    n_classes = max(len(data.manifest.classes), int(labels.max()) + 1 if len(labels) else 0, 1)
    spec = CompareSpec(names, tuple(x.name for x in la),
                       _shapes(nets[0], la, jms[0].preprocess, transform.crop),
                       _shapes(nets[1], lb, jms[1].preprocess, transform.crop),
                       n_classes, cfg.batch_size, cfg.precision)
    warnings = [f"network {ab}: {jm.warning}" for ab, jm in zip("AB", jms) if jm.warning]
    return Prepared(cfg, models, tuple(model_blob(j.model, j.name, j.preprocess) for j in jms),
                    spec, data.manifest, transform, data.demo_root,
                    (jms[0].untrained, jms[1].untrained), warnings)


def store(prep: Prepared, device: engine.Device) -> engine.Store:
    """The partial store, keyed by all that decides a shard's numbers (not shards, workers or
    --out): both networks' weights and preprocessing, the manifest paths, the spec (layers,
    shapes, classes, minibatch, precision), the transform, device and strict-fp32 setting."""
    from pipeline.models.precision import setting

    paths = hashlib.sha256("\n".join(prep.manifest.table.column("path").to_pylist()).encode())
    desc = {"format": PARTIAL_FORMAT, "models": list(prep.models),
            "preprocess": [b["preprocess"] for b in prep.blobs],
            "spec": {k: (v.tolist() if hasattr(v, "tolist") else v)
                     for k, v in prep.spec.state().items()},
            "transform": asdict(prep.transform),
            "root": "demo" if prep.demo_root else prep.manifest.root,
            "images": len(prep.manifest), "precision": setting()}
    fp = engine.fingerprint(desc, *(engine.digest(b["state_dict"]) for b in prep.blobs),
                            paths.digest(), device=device)
    return engine.Store(prep.cfg.out, fp)


class CompareWorker:
    """A Pool worker: pipeline.compare.runner.PairFeed (both models, one decode pipeline)."""

    def __init__(self, blobs: tuple[dict, dict], spec: Any) -> None:
        from pipeline.compare.runner import PairFeed

        self.feed_ = PairFeed(blobs, spec)

    def feed(self, start: int, stop: int) -> None:
        self.feed_.feed(start, stop)

    def run(self, start: int, stop: int) -> engine.Result:
        return engine.Result(*self.feed_.run(start, stop))


def units(prep: Prepared, workers: int) -> list[engine.Unit]:
    from pipeline.compare.result import shard_ranges

    n, b = len(prep.manifest), prep.spec.batch_size
    shards = prep.cfg.shards or max(2 * workers, math.ceil(n / 2000))
    return engine.range_units("shard-", shard_ranges(n, b, shards=shards))


def summary(tables: dict) -> str:
    """A few lines for a person: per layer, CKA of A and B at that layer, the median matched r
    and each network's median selectivity."""
    import numpy as np

    cka, m, s = (tables[k].to_pandas() for k in TABLES)
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
    from pipeline.compare.result import SCHEMAS, Comparison, merge_states
    from pipeline.compare.runner import PairFeedSpec
    from pipeline.data.listing import write_manifest
    from pipeline.results.tables import join, write_table

    con = Console("compare")
    with con.stage("setup", quiet=True):
        prep = prep or prepare(cfg)
        for w in prep.warnings:
            con.warn(w)
        init_ray(cfg.out)
        device = engine.resolve_device(cfg.device)
        pl, dec = device.decode_plan(cfg.workers)
        todo, st = units(prep, pl.workers), store(prep, device)
        pl = engine.Plan(min(pl.workers, len(todo)), pl.resources, pl.threads)
        write_manifest(prep.manifest, join(cfg.out, "manifest.parquet"))
    n, (na, nb) = len(prep.manifest), prep.spec.names
    con.info(f"{na} (A) x {nb} (B): {n} images in minibatches of {prep.spec.batch_size}, "
             f"{len(todo)} shards, {pl.workers} {device.kind} worker(s) ({pl.resources}, {dec} "
             f"decode threads), {len(prep.spec.layers)} layers")
    work = PairFeedSpec(prep.spec, (prep.spec.layers, prep.spec.layers), prep.manifest,
                        prep.transform, prep.demo_root, device.kind, pl.threads, dec)
    fresh: list[int] = []
    with con.stage("compare"):
        stats = engine.run_units(todo, engine.Pool(CompareWorker, prep.blobs, work, inflight=2),
                                 st, plan=pl, resume=cfg.resume,
                                 progress=con.progress(n, "images"),
                                 on_done=lambda u, i: fresh.append(i["images"]))
    with con.stage("merge"):
        # a few partials fold on the driver; many in a tree of Ray tasks
        state = engine.merge(st, stats.names, merge_states,
                             fan_in=4 if len(stats.names) > 8 else None)
        tables = Comparison.from_state(state).tables()
    with con.stage("write"):
        for name in TABLES:
            write_table(tables[name], join(cfg.out, f"{name}.parquet"), schema=SCHEMAS[name])
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
    from pipeline.stats.analysis import state_nbytes

    m = Markers.of(stats)
    read = sum(i["images"] for i in m.infos)
    cka = tables["cka"]
    return write_run(
        cfg.out, "compare", cfg.to_dict(), device=device.report(workers),
        fingerprint=st.fingerprint, skipped=m.skipped(),
        counts={**m.counts, "images_read": read, "images": len(prep.manifest),
                "shards": len(stats.names), "layers": len(prep.spec.layers),
                "minibatches": int(cka["n_batches"][0].as_py()) if cka.num_rows else 0,
                "minibatch_images": int(cka["n_images"][0].as_py()) if cka.num_rows else 0},
        seconds=con.seconds, total_seconds=con.wall, work=read, unit="images",
        stage_work={"setup": len(prep.manifest), "compare": fresh}, warnings=con.warnings,
        details={"names": list(prep.spec.names), "models": list(prep.models),
                 "checkpoints": list(cfg.checkpoints or (None, None)),
                 "untrained": list(prep.untrained), "same_network": same_network(*prep.blobs),
                 "layers": list(prep.spec.layers), "batch_size": prep.spec.batch_size,
                 "gram_precision": prep.spec.precision, "classes": prep.spec.classes,
                 "preprocess": [b["preprocess"] for b in prep.blobs],
                 "transform": asdict(prep.transform), "state_bytes": state_nbytes(state),
                 "precision": m.precision(),
                 "decode": {"threads": dec, "nvjpeg": device.kind == "cuda", "prefetch": 2}})


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, __doc__, Config, run, argv)


if __name__ == "__main__":
    sys.exit(main())
