"""Train the ResNet/PlainNet family or VGG with Ray Train: the paper's recipe or a demo recipe.

    python -m jobs.train --out ./results/train/resnet34                     # demo data and preset
    python -m jobs.train --model vgg11_bn --out ./results/train/vgg11_bn      # VGG: full width
    python -m jobs.train --preset paper --data s3://b/imagenet/train --val s3://b/imagenet/val \\
        --workers 8 --use-gpu --seed 0 --out s3://b/runs/resnet34-seed0

Stages: (1) zca: the 3x3 ZCA colour whitening from a seeded sample of training images, one
runtime.engine unit per slice (float64 sums, merged exactly); (2) train: a TorchTrainer runs DDP over
--workers; each epoch rank 0 reports a checkpoint and rewrites metrics.parquet, and the console
shows one line; (3) model.pt (a pipeline.checkpoint file) and run.json. Rerunning into the same
--out resumes from the last checkpoint; more --epochs continue the schedule. A failed worker is
replaced and training resumes from the last checkpoint (--max-failures times). Ray's and the
workers' own output goes to <out>/_logs/. See docs/training.md.
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
from dataclasses import dataclass, replace
from typing import Any, Sequence

from runtime import engine
from runtime.inputs import check_writable
from runtime.console import Console, init_ray, relay, worker_log
from runtime.options import BadInput, JobFailed, Options, at_least, opt, run_cli
from runtime.runinfo import write_run
from pipeline import tables
from pipeline.augment import AUGMENTS
from pipeline.train import PRECISIONS, PRESETS, Recipe, preset, train_models

PROG = "python -m jobs.train"
CHECKPOINT_FILE = "checkpoint.pt"
RUN_NAME = "checkpoints"            # Ray Train's run folder under --out
STATE_FILE = "_partials/train.json"
RAY_LOG = "_logs/ray-train.log"     # all output Ray forwards from the training processes
_DEFAULT = "(default: the preset's"


@dataclass(frozen=True)
class TrainConfig(Options):
    out: str = opt(help="run folder, local path or s3://...: checkpoints, metrics.parquet, "
                   "model.pt, run.json; rerun with the same --out to resume",
                   check=lambda v: None if v.strip() else "is empty; give a folder or s3:// URL")
    preset: str = opt("demo", "recipe: 'paper' (ImageNet, 90 epochs) or 'demo' (embedded data, "
                      "~1 min)", choices=tuple(sorted(PRESETS)))
    data: str | None = opt(None, "training source (class folders or .parquet manifest, local or "
                           "s3://); default: the embedded demo data")
    val: str | None = opt(None, "validation source; required with --data")
    model: str | None = opt(None, "architecture: resnet18..152, plainnet18..152 (and the "
                            "ResNeXt/wide ResNets), vgg11..19[_bn] (default: resnet34)",
                            choices=train_models, metavar="MODEL")
    width: int | None = opt(None, f"base width of the ResNet family {_DEFAULT}; paper 64, demo "
                            "16); VGG has torchvision's 64", check=at_least(1))
    input_size: int | None = opt(None, f"side of the random-resized training crop {_DEFAULT}; "
                                 "paper 224, demo 64)", check=at_least(1))
    epochs: int | None = opt(None, f"total epochs {_DEFAULT}; paper 90, demo 4)",
                             check=at_least(1))
    batch_size: int | None = opt(None, "global batch over all workers, any worker count "
                                 f"{_DEFAULT}; paper 256, demo 64)", check=at_least(1))
    workers: int = opt(2, "Ray Train workers (DDP ranks)", check=at_least(1))
    use_gpu: bool = opt(False, "one GPU per worker, channels_last (bf16 only with --precision "
                        "bf16)")
    lr: float | None = opt(None, f"initial learning rate {_DEFAULT}; paper 0.01, demo 0.05)")
    momentum: float | None = opt(None, "SGD momentum (default: 0.9)")
    weight_decay: float | None = opt(None, "SGD weight decay (default: 1e-4)")
    step_epochs: int | None = opt(None, f"divide lr by 10 every this many epochs {_DEFAULT}; "
                                  "paper 30, demo 3)")
    zca_images: int | None = opt(None, "training images sampled to fit the ZCA matrix "
                                 f"{_DEFAULT}; paper 10000, demo 512)")
    zca_shard: int | None = opt(None, "images per parallel ZCA unit (default: two units per "
                                "cluster CPU, 64..1024 images each)", check=at_least(1))
    seed: int | None = opt(None, "training seed: initialisation, data order, augmentation, ZCA "
                           "sample (default 0); recorded in model.pt, metrics.parquet, run.json")
    precision: str | None = opt(None, "training arithmetic: fp32 (TF32 off, the paper's; both "
                                "presets' default) or bf16 autocast", choices=PRECISIONS)
    sync_bn: bool | None = opt(None, "BatchNorm statistics over the whole global batch, "
                               "synchronised across workers (default: paper on with --workers "
                               "> 1, demo off)")
    augment: str | None = opt(None, "training augmentation: inception (crop, flip, photometric; "
                              "paper), crop-flip, crop-flip-hue-gray (demo)", choices=AUGMENTS)
    init: str | None = opt(None, "torchvision:PATH: start from a torchvision state_dict file",
                           check=lambda v: None if v is None or (
                               v.startswith("torchvision:") and len(v) > 12) else
                           "not understood; allowed: torchvision:PATH")
    loader_workers: int | None = opt(None, "DataLoader processes per training worker (each "
                                     "reserves one more CPU; default: demo 0, paper the "
                                     "worker's CPU share minus one, 1..16)", check=at_least(0))
    max_failures: int = opt(3, "worker failures survived by restarting from the last "
                            "checkpoint (-1: unlimited)", check=at_least(-1))
    keep_checkpoints: int = opt(2, "newest checkpoints kept under --out", check=at_least(1))

    def check(self) -> None:
        if self.data is None and self.val is not None:
            raise BadInput("--val given without --data; give both, or neither for the demo data")
        if self.data is not None and self.val is None:
            raise BadInput("--data needs --val (the validation source for the per-epoch metrics)")
        try:
            self.recipe
        except ValueError as e:
            raise BadInput(str(e)) from None

    @property
    def recipe(self) -> Recipe:
        return preset(self.preset, model=self.model, width=self.width, epochs=self.epochs,
                      batch_size=self.batch_size, lr=self.lr, momentum=self.momentum,
                      weight_decay=self.weight_decay, step_epochs=self.step_epochs,
                      input_size=self.input_size, zca_images=self.zca_images, seed=self.seed,
                      precision=self.precision, augment=self.augment, sync_bn=self.sync_bn)

    @property
    def sync_bn_on(self) -> bool:
        """BatchNorm synchronised: the recipe asks for it and there are several workers."""
        return self.recipe.sync_bn and self.workers > 1

    def identity(self) -> dict[str, Any]:
        """What defines a run: a rerun into the same --out must agree (only --epochs may grow)."""
        r = {k: list(v) if isinstance(v, tuple) else v for k, v in self.recipe.as_dict().items()
             if k not in ("name", "epochs")}
        return {"preset": self.preset, "data": self.data, "val": self.val, "init": self.init, **r}

def _sources(cfg: TrainConfig) -> tuple[Any, Any, list[str]]:
    """(training manifest, validation manifest, classes): --data/--val or the demo data."""
    from pipeline.demo import ensure_demo_data
    from pipeline.train import training_sources

    root = ensure_demo_data() if cfg.data is None else None
    try:
        return training_sources(cfg.data or f"{root}/train", cfg.val or f"{root}/val")
    except (ValueError, FileNotFoundError) as e:      # one line naming the source
        raise BadInput(str(e)) from None


def _load_init(cfg: TrainConfig, num_classes: int) -> tuple[dict | None, TrainConfig]:
    """The --init state_dict, checked against the model and the data's classes; its width wins."""
    if cfg.init is None:
        return None, cfg
    from pipeline.checkpoint import CheckpointError, load_checkpoint
    from pipeline.models import n_classes

    path = cfg.init.removeprefix("torchvision:")
    try:
        model = load_checkpoint(path, cfg.recipe.model).model
    except CheckpointError as e:
        raise BadInput(f"--init {path}: {e}") from None
    if n_classes(model) != num_classes:
        raise BadInput(f"--init {path} has {n_classes(model)} classes but the data has "
                       f"{num_classes}")
    return model.state_dict(), replace(cfg, width=model.width)


def _prior_state(cfg: TrainConfig) -> dict | None:
    """The saved state of an earlier run into --out (settings, ZCA); other settings: refused."""
    url = tables.join(cfg.out, STATE_FILE)
    if not tables.exists(url):
        return None
    state = tables.read_json(url)
    before, now = state["identity"], cfg.identity()
    for k in now:
        if before.get(k) != now[k]:
            raise BadInput(f"{cfg.out} holds a run with {k}={before.get(k)!r}, not {now[k]!r}; "
                           f"rerun with the same settings (only --epochs may change) or another "
                           f"--out")
    return state


def _model_epochs(out: str) -> int:
    from pipeline.checkpoint import load_checkpoint

    url = tables.join(out, "model.pt")
    return int(load_checkpoint(url).meta.get("epoch", 0)) if tables.exists(url) else 0


def _zca_unit(resize: int, crop: int, urls: list[str]) -> engine.Result:
    import torch

    from pipeline.train import zca_moments

    torch.set_num_threads(1)
    stats, images, skipped = zca_moments(urls, resize, crop, tables.read_bytes)
    return engine.Result(stats, {"images": images, "skipped": skipped})


def _fit_zca(cfg: TrainConfig, train: Any, device: engine.Device,
             con: Console) -> tuple[dict, engine.RunStats]:
    """The ZCA fit on a seeded sample: one engine unit per slice, partials merged in order."""
    import numpy as np

    r = cfg.recipe
    rng = np.random.default_rng(r.seed)
    urls = train.urls(np.sort(rng.choice(len(train), min(len(train), r.zca_images), False)))
    # Each unit pays a worker start-up (importing torch): few large units beat many small.
    shard = cfg.zca_shard or min(1024, max(64, math.ceil(len(urls) / (2 * device.cpus))))
    units = [engine.Unit(f"zca-{a:09d}", (urls[a:a + shard],), len(urls[a:a + shard]))
             for a in range(0, len(urls), shard)]
    store = engine.Store(cfg.out, engine.fingerprint(
        {"zca": urls, "resize": r.eval_resize, "crop": r.eval_crop}, device=device))
    stats = engine.run_units(units, engine.Task(_zca_unit, r.eval_resize, r.eval_crop), store,
                             plan=engine.Plan(device.cpus, {"num_cpus": 1}, 1),
                             progress=con.progress(len(urls), "images"))
    total = engine.merge(store, stats.names, lambda a, b: a.merge(b))
    if total.n < 2:
        raise BadInput("no readable training image for the ZCA fit")
    infos = stats.infos.values()
    info = {"images": sum(i["images"] for i in infos), "skipped": sum(i["skipped"] for i in infos),
            "shards": len(units), "pixels": total.n, "stats": total.state(),
            "fingerprint": store.fingerprint}
    store.clear()
    return {"preprocess": total.fit(eps=r.zca_eps).state(), "zca": info}, stats


def _epoch_line(row: dict, epochs: int) -> str:
    return (f"epoch {row['epoch']}/{epochs} train_loss {row['train_loss']:.4f} val_loss "
            f"{row['val_loss']:.4f} top1 {row['top1']:.3f} top5 {row['top5']:.3f} lr "
            f"{row['lr']:.4g} {row['seconds']:.1f}s {row['images_per_s']:.0f} img/s")


def train_loop(lc: dict[str, Any]) -> None:
    """Per-worker function of TorchTrainer: wiring only; pipeline.train.Training does the work."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from pipeline.preprocess import preprocess_from_state
    from pipeline.train import METRICS_SCHEMA, Training, configure_torch, make_loaders, metrics_table

    cfg: TrainConfig = lc["cfg"]
    r, ctx, hook = cfg.recipe, ray.train.get_context(), lc["hook"]
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    configure_torch(device, r.precision, lc["threads"])
    restored = None
    if (ckpt := ray.train.get_checkpoint()) is not None:
        with ckpt.as_directory() as d:
            restored = torch.load(os.path.join(d, CHECKPOINT_FILE), map_location="cpu",
                                  weights_only=True)
    t = Training.start(r, lc["classes"], preprocess_from_state(lc["preprocess"]), device,
                       init=ray.get(lc["init"]) if lc["init"] is not None else None,
                       restored=restored, sync_bn=cfg.sync_bn_on)
    t.model = ray.train.torch.prepare_model(t.model)        # DDP
    data = make_loaders(ray.get(lc["train"]), ray.get(lc["val"]), r, tables.read_bytes, world,
                        rank, lc["loader_workers"], pin_memory=device.type == "cuda")
    metrics_url = tables.join(cfg.out, "metrics.parquet")
    if rank == 0 and restored is not None:
        lc["echo"].put_nowait(f"resuming after epoch {t.epoch}")
        tables.write_table(metrics_table(t.history), metrics_url, METRICS_SCHEMA)
    for epoch in range(t.epoch + 1, r.epochs + 1):
        faults = (lambda i, e=epoch: hook(engine.Unit(f"rank{rank}-epoch{e}-batch{i}"))
                  ) if hook else None                        # tests only (engine.set_test_hook)
        row = t.run_epoch(epoch, data, world, rank, on_batch=faults)
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                t.save(os.path.join(tmp, CHECKPOINT_FILE))
            ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(tmp)
                             if rank == 0 else None)
        if rank == 0:
            tables.write_table(metrics_table(t.history), metrics_url, METRICS_SCHEMA)
            lc["echo"].put_nowait(_epoch_line(row, r.epochs))


def _fit(cfg: TrainConfig, train: Any, val: Any, state: dict, init: dict | None,
         con: Console) -> tuple[dict, int]:
    """The TorchTrainer run; returns (the last checkpoint's contents, loader processes)."""
    import ray
    import ray.train
    import torch
    from ray.train.torch import TorchTrainer

    from pipeline.train import arrow_storage, default_loader_workers

    r, have = cfg.recipe, ray.cluster_resources()
    loaders = cfg.loader_workers
    if loaders is None:
        loaders = default_loader_workers(r, cfg.workers, have.get("CPU", 1))
    con.info(f"{r.model} ({r.name} preset): {cfg.workers} workers x {loaders} loader processes, "
             f"global batch {r.batch_size}, {r.precision}, augment {r.augment}, BatchNorm "
             f"{'synchronised' if cfg.sync_bn_on else 'per worker'}, seed {r.seed}")
    per_worker = {"CPU": 1 + loaders, **({"GPU": 1} if cfg.use_gpu else {})}
    short = [f"{n * cfg.workers:g} {k}s (cluster has {have.get(k, 0):g})"
             for k, n in per_worker.items() if have.get(k, 0) < n * cfg.workers]
    if short:   # not an error: an autoscaling cluster adds nodes (a fixed one waits forever)
        con.warn(f"training needs {', '.join(short)}; it waits until the cluster has them")
    # Ray Train's Prometheus metrics want the dashboard's agent, which init_ray does not start.
    os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
    storage, fs = arrow_storage(cfg.out, dict(os.environ))
    with relay(con) as echo:
        trainer = TorchTrainer(train_loop, train_loop_config={
            "cfg": cfg, "train": ray.put(train), "val": ray.put(val), "classes": state["classes"],
            "preprocess": state["preprocess"], "threads": 1 + loaders, "loader_workers": loaders,
            "init": ray.put(init) if init is not None else None, "echo": echo,
            "hook": engine.current_test_hook()},
            scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                                   resources_per_worker=per_worker),
            run_config=ray.train.RunConfig(
                name=RUN_NAME, storage_path=storage, storage_filesystem=fs,
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures)))
        result = trainer.fit()
    if result.checkpoint is None:
        raise JobFailed("training ended without a checkpoint")
    with result.checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, CHECKPOINT_FILE), map_location="cpu",
                          weights_only=True), loaders


def _finish(cfg: TrainConfig, con: Console, device: engine.Device, state: dict, last: dict,
            loaders: int, sizes: tuple[int, int], zca: engine.RunStats | None,
            before: int) -> dict:
    """model.pt, metrics.parquet and run.json from the last checkpoint."""
    from pipeline.preprocess import preprocess_from_state
    from pipeline.train import METRICS_SCHEMA, history_counts, metrics_table, write_model

    r, history = cfg.recipe, list(last["history"])
    write_model(tables.join(cfg.out, "model.pt"), last, preprocess_from_state(state["preprocess"]))
    tables.write_table(metrics_table(history), tables.join(cfg.out, "metrics.parquet"),
                       METRICS_SCHEMA)
    h, z = history_counts(history, before), state["zca"]
    counts = {**(zca.counts() if zca else {}), "train_images": sizes[0], "val_images": sizes[1],
              "classes": len(state["classes"]), "epochs": last["epoch"], "zca_images": z["images"],
              "zca_skipped": z["skipped"], "zca_shards": z["shards"],
              **{k: h[k] for k in ("images_read", "images_skipped", "epochs_trained",
                                   "skipped_per_epoch")}}
    config = {**cfg.to_dict(), "recipe": r.as_dict(), "width": r.width, "loader_workers": loaders,
              "sync_bn": cfg.sync_bn_on, "seed": r.seed, "precision": r.precision,
              "augment": r.augment}
    return write_run(
        cfg.out, "train", config, device=device.report(cfg.workers),
        fingerprint=z.get("fingerprint", ""), counts=counts, seconds=con.seconds,
        total_seconds=con.wall, work=h["images_trained"], unit="images",
        stage_work={"zca": z["images"] if zca else 0}, warnings=con.warnings,
        details={"model": r.model, "final": history[-1] if history else {},
                 "train_images_per_s_mean": h["images_per_s_mean"]})


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Fit the ZCA (or reuse it), train with TorchTrainer, write model.pt and run.json."""
    con = Console("train")
    with con.stage("setup", quiet=True):
        train, val, classes = _sources(cfg)           # every bad input surfaces before a write
        init, cfg = _load_init(cfg, len(classes))
        state, before = _prior_state(cfg), _model_epochs(cfg.out)
        check_writable(cfg.out)
        if state is not None and before >= cfg.recipe.epochs and \
                tables.exists(tables.join(cfg.out, "run.json")):
            con.info(f"{cfg.out} already holds a model trained for {before} epochs (>= "
                     f"{cfg.recipe.epochs}); nothing to do (ask for more --epochs to continue)")
            return tables.read_json(tables.join(cfg.out, "run.json"))
        init_ray(cfg.out, log_to_driver=True)         # worker output: worker_log's file
        device = engine.resolve_device("auto" if cfg.use_gpu else "cpu")
    zca = None
    with worker_log(tables.join(cfg.out, RAY_LOG)):
        if state is None:
            with con.stage("zca"):
                state, zca = _fit_zca(cfg, train, device, con)
            state |= {"identity": cfg.identity(), "classes": classes}
            tables.write_json(tables.join(cfg.out, STATE_FILE), state)
        else:
            con.info(f"resuming the run in {cfg.out}: ZCA and settings from {STATE_FILE}")
        with con.stage("train"):
            last, loaders = _fit(cfg, train, val, state, init, con)
    info = _finish(cfg, con, device, state, last, loaders, (len(train), len(val)), zca, before)
    final = info["details"]["final"]
    con.info(f"done: {last['epoch']} epochs, top1 {final.get('top1', float('nan')):.3f}, "
             f"{con.wall:.1f} s; model at {tables.join(cfg.out, 'model.pt')}")
    return info


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, __doc__, TrainConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
