"""Train the ResNet/PlainNet family or VGG with Ray Train: the paper's recipe or a demo recipe.

    python -m jobs.train --out ./results/train/resnet34                     # demo data and preset
    python -m jobs.train --model vgg11_bn --out ./results/train/vgg11_bn      # VGG: full width
    python -m jobs.train --preset paper --data s3://b/imagenet/train --val s3://b/imagenet/val \\
        --workers 8 --use-gpu --seed 0 --out s3://b/runs/resnet34-seed0

Stages: (1) zca: the 3x3 ZCA colour whitening from a seeded sample of training images, one
jobs.runtime.engine unit per slice (float64 sums, merged exactly); (2) train: TorchTrainer runs DDP
over --workers, and each epoch rank 0 reports a checkpoint, rewrites metrics.parquet and prints a
line; (3) model.pt (a pipeline.models.checkpoint file) and run.json. The same --out resumes from the
last checkpoint (more --epochs continue the schedule), as does a replaced failed worker
(--max-failures times). Ray Train wiring: jobs/trainer.py. Ray's driver log: <out>/_logs/ray.log;
the training workers' output stays in Ray's session logs. See docs/training.md.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, fields, replace
from typing import Any, Sequence

import torch

from jobs.runtime import engine
from jobs.runtime.inputs import check_writable
from jobs.trainer import fit
from jobs.runtime.console import Console, init_ray
from jobs.runtime.options import BadInput, Options, at_least, bad_input, opt, run_cli
from jobs.runtime.runinfo import write_run
from pipeline.results import catalog, tables
from pipeline.train import run as trainrun
from pipeline.data.augment import AUGMENTS
from pipeline.data.demo import ensure_demo_data
from pipeline.data.preprocess import WhiteningStats, preprocess_from_state
from pipeline.train.recipe import (PRECISIONS, PRESETS, Recipe, metrics_table, preset, train_models,
                                   training_sources, write_model, zca_moments)

PROG = "python -m jobs.train"
STATE_FILE = "_partials/train.json"


@dataclass(frozen=True)
class TrainConfig(Options):
    out: str = opt(help="run folder (local or s3://); rerun with the same --out to resume",
                   check=lambda v: None if v.strip() else "is empty; give a folder or s3:// URL")
    preset: str = opt("demo", "recipe: paper (ImageNet, 90 epochs) or demo (embedded data, "
                      "~1 min)", choices=tuple(sorted(PRESETS)), decides=True)
    data: str | None = opt(None, "training source: class folders or .parquet manifest, local or "
                           "s3:// (default: the embedded demo data)", decides=True)
    val: str | None = opt(None, "validation source; required with --data", decides=True)
    model: str | None = opt(None, "resnet18..152, plainnet18..152, ResNeXt/wide ResNets, "
                            "vgg11..19[_bn] (default: resnet34)", choices=train_models,
                            metavar="MODEL", decides=True)
    width: int | None = opt(None, "base width of the ResNet family (default: paper 64, demo 16); "
                            "VGG has torchvision's 64", check=at_least(1), decides=True)
    input_size: int | None = opt(None, "side of the random-resized training crop (default: paper "
                                 "224, demo 64)", check=at_least(1), decides=True)
    epochs: int | None = opt(None, "total epochs (default: paper 90, demo 4)", check=at_least(1))
    batch_size: int | None = opt(None, "global batch over all workers, any worker count (default: "
                                 "paper 256, demo 64)", check=at_least(1), decides=True)
    workers: int = opt(2, "Ray Train workers (DDP ranks)", check=at_least(1))
    use_gpu: bool = opt(False, "one GPU per worker, channels_last; fp32 unless --precision bf16")
    lr: float | None = opt(None, "initial learning rate (default: paper 0.01, demo 0.05)",
    decides=True)
    momentum: float | None = opt(None, "SGD momentum (default: 0.9)", decides=True)
    weight_decay: float | None = opt(None, "SGD weight decay (default: 1e-4)", decides=True)
    step_epochs: int | None = opt(None, "divide lr by 10 every this many epochs (default: paper "
                                  "30, demo 3)", decides=True)
    zca_images: int | None = opt(None, "training images sampled to fit the ZCA matrix (default: "
                                 "paper 10000, demo 512)", decides=True)
    zca_shard: int | None = opt(None, "images per parallel ZCA unit (default: two units per "
                                "cluster CPU, 64..1024 images each)", check=at_least(1))
    seed: int | None = opt(None, "seed of initialisation, data order, augmentation, ZCA sample "
                           "(default 0); recorded in model.pt, metrics.parquet, run.json",
                           decides=True)
    precision: str | None = opt(None, "fp32 (TF32 off; the paper's and both presets' default) or "
                                "bf16 autocast", choices=PRECISIONS, decides=True)
    sync_bn: bool | None = opt(None, "BatchNorm statistics over the whole global batch, across "
                               "workers (default: on for paper with --workers > 1, off for demo)",
                               decides=True)
    augment: str | None = opt(None, "inception (crop, flip, photometric; paper), crop-flip, "
                              "crop-flip-hue-gray (demo)", choices=AUGMENTS, decides=True)
    init: str | None = opt(None, "torchvision:PATH: start from a torchvision state_dict file",
                           check=lambda v: None if v is None or v.startswith("torchvision:") and
                           len(v) > 12 else "not understood; allowed: torchvision:PATH",
                           decides=True)
    loader_workers: int | None = opt(None, "DataLoader processes per training worker, a CPU each "
                                     "(default: demo 0, paper the worker's CPUs - 1, 1..16)",
                                     check=at_least(0))
    max_failures: int = opt(3, "worker failures survived by restarting from the last "
                            "checkpoint (-1: unlimited)", check=at_least(-1))
    keep_checkpoints: int = opt(2, "newest checkpoints kept under --out", check=at_least(1))

    def check(self) -> None:
        if self.data is None and self.val is not None:
            raise BadInput("--val given without --data; give both, or neither for the demo data")
        if self.data is not None and self.val is None:
            raise BadInput("--data needs --val (the validation source for the per-epoch metrics)")
        with bad_input():
            self.recipe

    @property
    def recipe(self) -> Recipe:
        """The preset, each flag named after a Recipe field overriding that field."""
        names = {f.name for f in fields(Recipe)}
        return preset(self.preset, **{f.name: getattr(self, f.name) for f in fields(self)
                                      if f.name in names})

    @property
    def sync_bn_on(self) -> bool:
        """BatchNorm synchronised: the recipe asks for it and there are several workers."""
        return self.recipe.sync_bn and self.workers > 1

    def identity(self) -> dict[str, Any]:
        """What defines a run: the options declared `decides=True`, as the recipe resolved them
        (a flag given at its preset's value is the same run); a rerun into the same --out must
        agree (only --epochs may grow)."""
        resolved = self.recipe.as_dict()
        return {k: resolved.get(k, v) for k, v in self.decisive().items()}


def _inputs(cfg: TrainConfig) -> tuple[TrainConfig, tuple[Any, Any, list[str]], dict | None,
                                       dict | None]:
    """(cfg, (train, val, classes), --init weights, an earlier run's state), read before any
    write. The pipeline refuses bad input with ValueError: it becomes BadInput here, only here."""
    root = ensure_demo_data() if cfg.data is None else None
    init = None
    with bad_input(ValueError, FileNotFoundError):    # one line naming the source or setting
        sources = training_sources(cfg.data or f"{root}/train", cfg.val or f"{root}/val")
        if cfg.init is not None:                      # the weights fix the width
            init, width = trainrun.load_init(cfg.init, cfg.recipe.model, len(sources[2]))
            cfg = replace(cfg, width=width)
        state = trainrun.prior_state(tables.join(cfg.out, STATE_FILE), cfg.identity(), cfg.out)
    return cfg, sources, init, state


def _zca_unit(resize: int, crop: int, urls: list[str]) -> engine.Result:
    torch.set_num_threads(1)
    stats, images, skipped = zca_moments(urls, resize, crop, tables.read_bytes)
    return engine.Result(_moments(stats), {"images": images, "skipped": skipped})


def _moments(stats: WhiteningStats) -> dict:
    """The colour moments as a partial state: float64 arrays, exact."""
    return {"n": stats.n, "sum": stats.sum, "sum_outer": stats.sum_outer}


def _merge_moments(a: dict, b: dict) -> dict:
    return _moments(WhiteningStats.from_state(a).merge(WhiteningStats.from_state(b)))


def _fit_zca(cfg: TrainConfig, train: Any, device: engine.Device,
             con: Console) -> tuple[dict, engine.RunStats]:
    """The ZCA fit on a seeded sample: one engine unit per slice, partials merged in order."""
    r = cfg.recipe
    urls = trainrun.zca_sample(train, r.zca_images, r.seed)
    shard = cfg.zca_shard or trainrun.zca_shard(len(urls), device.cpus)
    units = [engine.Unit(f"zca-{a:09d}", (urls[a:a + shard],), len(urls[a:a + shard]))
             for a in range(0, len(urls), shard)]
    store = engine.Store(cfg.out, engine.fingerprint(cfg.identity(), device=device))
    stats = engine.run_units(units, engine.Task(_zca_unit, r.eval_resize, r.eval_crop), store,
                             plan=engine.Plan(device.cpus, {"num_cpus": 1}, 1),
                             progress=con.progress(len(urls), "images"))
    total = WhiteningStats.from_state(engine.merge(store, stats.names, _merge_moments))
    if total.n < 2:
        raise BadInput("no readable training image for the ZCA fit")
    state = trainrun.zca_state(total, stats.infos.values(), len(units), store.fingerprint,
                               r.zca_eps)
    store.clear()
    return state, stats


def _finish(cfg: TrainConfig, con: Console, device: engine.Device, state: dict, last: dict,
            loaders: int, sizes: tuple[int, int], zca: engine.RunStats | None,
            before: int) -> dict:
    """model.pt, metrics.parquet and run.json from the last checkpoint."""
    write_model(tables.join(cfg.out, "model.pt"), last, preprocess_from_state(state["preprocess"]))
    tables.write(catalog.METRICS, metrics_table(last["history"]), cfg.out)
    config = trainrun.run_config(cfg.to_dict(), cfg.recipe, loaders, cfg.sync_bn_on)
    return write_run(cfg.out, "train", config, device=device.report(cfg.workers),
                     seconds=con.seconds, total_seconds=con.wall, warnings=con.warnings,
                     **trainrun.run_report(last, state, before, sizes,
                                           zca.counts() if zca else None))


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Fit the ZCA (or reuse it), train with TorchTrainer, write model.pt and run.json."""
    con = Console("train")
    with con.stage("setup", quiet=True):
        cfg, (train, val, classes), init, state = _inputs(cfg)   # bad input: before a write
        before = trainrun.model_epochs(tables.join(cfg.out, "model.pt"))
        check_writable(cfg.out)
        run_json = tables.join(cfg.out, "run.json")
        if state is not None and before >= cfg.recipe.epochs and tables.exists(run_json):
            con.info(f"{cfg.out} already holds a model trained for {before} epochs (>= "
                     f"{cfg.recipe.epochs}); nothing to do (ask for more --epochs to continue)")
            return tables.read_json(run_json)
        init_ray(cfg.out)         # the workers' output (Ray Train's reports) stays in Ray's logs
        device = engine.resolve_device("auto" if cfg.use_gpu else "cpu")
    zca = None
    if state is None:
        with con.stage("zca"):
            state, zca = _fit_zca(cfg, train, device, con)
        state |= {"identity": cfg.identity(), "classes": classes}
        tables.write_json(tables.join(cfg.out, STATE_FILE), state)
    else:
        con.info(f"resuming the run in {cfg.out}: ZCA and settings from {STATE_FILE}")
    with con.stage("train"):
        last, loaders = fit(cfg, train, val, state, init, con)
    info = _finish(cfg, con, device, state, last, loaders, (len(train), len(val)), zca, before)
    final = info["details"]["final"]
    con.info(f"done: {last['epoch']} epochs, top1 {final.get('top1', float('nan')):.3f}, "
             f"{con.wall:.1f} s; model at {tables.join(cfg.out, 'model.pt')}")
    return info


def chained(ctx: Any, model: str, seed: int) -> tuple[TrainConfig, str] | None:
    """jobs.reproduce's training of `model` at training seed `seed` (2 CPU workers, or one per
    GPU) and the checkpoint it leaves; None when a checkpoint was given instead."""
    from pipeline.results import layout

    if model in ctx.given:
        return None
    o, (data, val) = ctx.o, ctx.data(training=True)
    cfg = TrainConfig(out=layout.train_dir(o.out, model, seed), preset=o.preset, data=data,
                      val=val, model=model, epochs=o.epochs, workers=o.workers or ctx.gpus or 2,
                      use_gpu=bool(ctx.gpus), seed=seed or None,
                      loader_workers=o.loader_workers)
    return cfg, layout.checkpoint(o.out, model, seed)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, __doc__, TrainConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
