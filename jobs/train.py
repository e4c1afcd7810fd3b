"""Train ResNet34 / PlainNet34 with Ray Train: the paper's recipe or a one-minute demo recipe.

    python -m jobs.train --out ./results/train-resnet34                       # demo data, demo preset
    python -m jobs.train --model plainnet34 --out ./results/train-plainnet34
    python -m jobs.train --preset paper --data s3://b/imagenet/train --val s3://b/imagenet/val \
        --workers 8 --use-gpu --out s3://b/runs/resnet34

Stages: (1) the 3x3 ZCA colour-whitening matrix is fitted by parallel Ray tasks over a sample of
the training images (mergeable `WhiteningStats` sums); (2) a `TorchTrainer` runs DDP over
--workers, one checkpoint (model, optimizer, scheduler, epoch, preprocessing, model name) and one
`metrics.parquet` row per epoch; (3) `model.pt` (a `pipeline.checkpoint` file: model name, width,
classes, ZCA) and `run.json` land under --out. Rerunning with the same --out resumes from the
last checkpoint; asking for more epochs continues the schedule. A failed worker is replaced and
training resumes from the last checkpoint (--max-failures times).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from jobs.common import (BadInput, Stopwatch, bad_input_exits, check_writable, init_ray,
                         job_parser, log, package_versions)
from pipeline import tables
from pipeline.models import model_names
from pipeline.train import AUGMENTS, PRECISIONS, PRESETS, Recipe, preset

PROG = "python -m jobs.train"
# Test-only fault injection, read in main() (never at import): "rank:epoch:batch:marker_url".
# The worker of that rank exits hard at that batch of that epoch, once (the marker records it).
FAULT_ENV = "PREFERRED_STIMULI_TRAIN_FAULT"
CHECKPOINT_FILE = "checkpoint.pt"
RUN_NAME = "checkpoints"          # Ray Train run folder under --out
STATE_FILE = "_partials/train.json"
RAY_LOG = "logs/ray-train.log"    # Ray Train's own chatter, kept out of the console

METRICS_SCHEMA = pa.schema([
    pa.field("epoch", pa.int64()),
    pa.field("train_loss", pa.float64()),
    pa.field("val_loss", pa.float64()),
    pa.field("top1", pa.float64()),
    pa.field("top5", pa.float64()),
    pa.field("lr", pa.float64()),
    pa.field("seconds", pa.float64()),
    pa.field("images_per_s", pa.float64()),
    pa.field("train_images", pa.int64()),
    pa.field("val_images", pa.int64()),
    pa.field("skipped", pa.int64()),
    pa.field("workers", pa.int64()),
    pa.field("seed", pa.int64()),            # training seed (init, data order, augmentation)
    pa.field("precision", pa.string()),      # fp32 | bf16
    pa.field("augment", pa.string()),        # pipeline.train.AUGMENTS
    pa.field("sync_bn", pa.bool_()),         # BatchNorm statistics over the whole global batch
])

# Fields that define a run: a rerun into the same --out must agree on them (only --epochs may grow).
_IDENTITY = ("preset", "data", "val", "init", "model", "width", "input_size", "eval_resize",
             "eval_crop", "batch_size", "lr", "momentum", "weight_decay", "step_epochs", "gamma",
             "crop_scale", "crop_ratio", "zca_images", "zca_eps", "seed", "precision", "augment",
             "sync_bn")


@dataclass(frozen=True)
class TrainConfig:
    out: str                              # run folder (local or s3://): checkpoints, metrics, model.pt
    recipe: Recipe = field(default_factory=lambda: PRESETS["demo"])
    data: str | None = None               # training source; None = embedded demo data
    val: str | None = None                # validation source; None = demo val (only with demo data)
    workers: int = 2                      # Ray Train workers (DDP ranks)
    use_gpu: bool = False                 # one GPU per worker, bf16 autocast, channels_last
    loader_workers: int | None = None     # DataLoader processes per worker (each takes a CPU);
                                          # None: demo 0, paper from the worker's CPUs
    max_failures: int = 3                 # worker failures survived (restart from last checkpoint)
    keep_checkpoints: int = 2             # newest Ray Train checkpoints kept under --out
    init: str | None = None               # torchvision:PATH, a state_dict to start from
    zca_shard: int | None = None          # images per ZCA task; None: two tasks per cluster CPU
    fault: str | None = None              # test-only fault injection (see FAULT_ENV)

    def __post_init__(self) -> None:
        r = self.recipe
        if r.model not in model_names():
            raise BadInput(f"unknown model {r.model!r}; allowed: {', '.join(model_names())}")
        if not self.out or not self.out.strip():
            raise BadInput("--out is empty; give a local folder or an s3:// URL")
        if self.workers < 1:
            raise BadInput(f"--workers must be >= 1, got {self.workers}")
        if self.loader_workers is not None and self.loader_workers < 0:
            raise BadInput(f"--loader-workers must be >= 0, got {self.loader_workers}")
        if self.max_failures < -1:
            raise BadInput(f"--max-failures must be >= -1 (-1 = unlimited), got {self.max_failures}")
        if self.keep_checkpoints < 1:
            raise BadInput(f"--keep-checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.init is not None and (not self.init.startswith("torchvision:")
                                      or not self.init[len("torchvision:"):]):
            raise BadInput(f"--init {self.init!r} not understood; allowed: torchvision:PATH")
        if self.data is None and self.val is not None:
            raise BadInput("--val given without --data; give both, or neither for the demo data")
        if self.data is not None and self.val is None:
            raise BadInput("--data needs --val (the validation source for the per-epoch metrics)")
        if self.zca_shard is not None and self.zca_shard < 1:
            raise BadInput(f"--zca-shard must be >= 1, got {self.zca_shard}")

    @property
    def sync_bn(self) -> bool:
        """BatchNorm synchronised across workers: the recipe asks for it and there are several."""
        return self.recipe.sync_bn and self.workers > 1

    @property
    def init_path(self) -> str | None:
        return self.init[len("torchvision:"):] if self.init else None

    def identity(self) -> dict[str, Any]:
        merged = {**self.recipe.as_dict(), "preset": self.recipe.name, "data": self.data,
                  "val": self.val, "init": self.init}
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in merged.items()
                if k in _IDENTITY}

    @classmethod
    def from_args(cls, args: argparse.Namespace, fault: str | None = None) -> "TrainConfig":
        try:
            recipe = preset(args.preset, model=args.model, width=args.width, epochs=args.epochs,
                            batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                            weight_decay=args.weight_decay, step_epochs=args.step_epochs,
                            input_size=args.input_size, zca_images=args.zca_images,
                            seed=args.seed, precision=args.precision, augment=args.augment,
                            sync_bn=args.sync_bn)
        except ValueError as e:
            raise BadInput(str(e)) from None
        return cls(out=args.out.rstrip("/"), recipe=recipe, data=args.data, val=args.val,
                   workers=args.workers, use_gpu=args.use_gpu, loader_workers=args.loader_workers,
                   max_failures=args.max_failures, keep_checkpoints=args.keep_checkpoints,
                   init=args.init, zca_shard=args.zca_shard, fault=fault)


def build_parser() -> argparse.ArgumentParser:
    p = job_parser("train", __doc__)
    p.add_argument("--out", required=True, help="run folder, local path or s3://...: checkpoints, "
                   "metrics.parquet, model.pt, run.json; rerun with the same --out to resume")
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS),
                   help="recipe: 'paper' (ImageNet, 90 epochs) or 'demo' (embedded data, ~1 min)")
    p.add_argument("--data", default=None, help="training source (class folders or .parquet "
                   "manifest, local or s3://); default: the embedded demo data")
    p.add_argument("--val", default=None, help="validation source; required with --data")
    p.add_argument("--model", default=None, help=f"architecture; one of {', '.join(model_names())} "
                   "(default: the preset's, resnet34)")
    p.add_argument("--width", type=int, default=None, help="base width (default: preset's; paper 64, demo 16)")
    p.add_argument("--input-size", type=int, default=None, help="side of the random-resized "
                   "training crop (default: preset's; paper 224, demo 64)")
    p.add_argument("--epochs", type=int, default=None, help="total epochs (default: preset's; paper 90, demo 4)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch over all workers, "
                   "any worker count (default: preset's; paper 256, demo 64)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (DDP ranks)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker, bf16 autocast, channels_last")
    p.add_argument("--lr", type=float, default=None, help="initial learning rate (default: preset's; paper 0.01, demo 0.05)")
    p.add_argument("--momentum", type=float, default=None, help="SGD momentum (default: 0.9)")
    p.add_argument("--weight-decay", type=float, default=None, help="SGD weight decay (default: 1e-4)")
    p.add_argument("--step-epochs", type=int, default=None, help="divide lr by 10 every this many "
                   "epochs (default: preset's; paper 30, demo 3)")
    p.add_argument("--zca-images", type=int, default=None, help="training images sampled to fit "
                   "the ZCA matrix (default: preset's; paper 10000, demo 512)")
    p.add_argument("--zca-shard", type=int, default=None, help="images per parallel ZCA task "
                   "(default: the sample split into two tasks per cluster CPU, at most 1024 each)")
    p.add_argument("--seed", type=int, default=None, help="training seed: initialisation, data "
                   "order, augmentation, ZCA sample (default 0); recorded in model.pt, "
                   "metrics.parquet and run.json")
    p.add_argument("--precision", default=None, choices=PRECISIONS, help="training arithmetic: "
                   "fp32 (TF32 off, the paper's; default of both presets) or bf16 autocast")
    p.add_argument("--sync-bn", default=None, action=argparse.BooleanOptionalAction,
                   help="BatchNorm statistics over the whole global batch, synchronised across "
                   "workers (default: on for the paper preset when --workers > 1, off for demo)")
    p.add_argument("--augment", default=None, choices=AUGMENTS, help="training augmentation: "
                   "inception (random-resized crop, flip, photometric distortions; paper "
                   "default), crop-flip, crop-flip-hue-gray (demo default: colour a weak cue)")
    p.add_argument("--init", default=None, help="torchvision:PATH: start from a torchvision state_dict file")
    p.add_argument("--loader-workers", type=int, default=None, help="DataLoader processes per "
                   "training worker (each reserves one more CPU); 0 decodes in the worker itself "
                   "(default: demo 0; paper the worker's share of the cluster's CPUs minus one, "
                   "1..16)")
    p.add_argument("--max-failures", type=int, default=3, help="worker failures to survive by "
                   "restarting from the last checkpoint (-1: unlimited)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept under --out")
    return p


# ---------------------------------------------------------------------------------------------
# Data and ZCA
# ---------------------------------------------------------------------------------------------

@dataclass
class Sources:
    train: Any                    # pipeline.sources.Manifest
    val: Any
    classes: list[str]
    train_url: str
    val_url: str


def resolve_sources(cfg: TrainConfig) -> Sources:
    """Manifests of the training and validation sources (labels required, same classes)."""
    from pipeline.sources import build_manifest

    if cfg.data is None:
        from pipeline.demo import ensure_demo_data

        root = ensure_demo_data()
        train_url, val_url = f"{root}/train", f"{root}/val"
    else:
        train_url, val_url = cfg.data, cfg.val
    train = build_manifest(train_url, require_labels=True)
    val = build_manifest(val_url, require_labels=True)
    classes = list(train.classes)
    if not classes:
        raise BadInput(f"training source {train_url} names no classes")
    if list(val.classes) != classes:
        # Labels are positions in the class list: the two sources must list the same classes.
        raise BadInput(f"validation source {val_url} has {len(val.classes)} classes that differ "
                       f"from the training source's {len(classes)}; both need the same class list")
    return Sources(train, val, classes, train_url, val_url)


def _zca_shard(urls: list[str], resize: int, crop: int) -> dict[str, Any]:
    """One ZCA task: the mergeable colour moments of some training images (eval crops, [0, 1])."""
    import torch

    from pipeline.preprocess import WhiteningStats
    from pipeline.train import EvalResizeCrop, ImageDataset, collate

    torch.set_num_threads(1)
    ds = ImageDataset(urls, [0] * len(urls), EvalResizeCrop(resize, crop), read=tables.read_bytes)
    images, _, skipped = collate([ds[i] for i in range(len(ds))])
    stats = WhiteningStats()
    if len(images):
        stats.update(images.float().div_(255.0))
    return {"stats": stats.state(), "images": int(len(images)), "skipped": int(skipped)}


def fit_zca(manifest: Any, recipe: Recipe, shard: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Fit the ZCA matrix on a seeded sample of the training set with parallel Ray tasks.

    The sums are float64 and merged in shard order, so the matrix does not depend on how many
    tasks ran (up to float64 rounding).
    """
    import ray

    from pipeline.preprocess import WhiteningStats

    n = len(manifest)
    rng = np.random.default_rng(recipe.seed)
    sample = np.sort(rng.choice(n, size=min(n, recipe.zca_images), replace=False))
    urls = manifest.urls(sample)
    if shard is None:
        # Each task pays a worker start-up (importing torch): few large tasks beat many small.
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        shard = min(1024, max(64, math.ceil(len(urls) / (2 * cpus))))
    task = ray.remote(num_cpus=1, max_retries=3)(_zca_shard)
    refs = [task.remote(urls[i:i + shard], recipe.eval_resize, recipe.eval_crop)
            for i in range(0, len(urls), shard)]
    total = WhiteningStats()
    images = skipped = 0
    for part in ray.get(refs):
        total.merge(WhiteningStats.from_state(part["stats"]))
        images += part["images"]
        skipped += part["skipped"]
    if total.n < 2:
        raise BadInput("no readable training image for the ZCA fit")
    zca = total.fit(eps=recipe.zca_eps)
    return zca, {"images": images, "skipped": skipped, "shards": len(refs),
                 "pixels": total.n, "stats": total.state()}


# ---------------------------------------------------------------------------------------------
# The Ray Train loop: wiring only; the steps are pipeline.train's plain functions
# ---------------------------------------------------------------------------------------------

def _fault_hook(spec: str | None, rank: int, epoch: int):
    """Test-only: exit this worker hard at the named batch, once (a marker file records it)."""
    if not spec:
        return None
    f_rank, f_epoch, f_batch, marker = spec.split(":", 3)
    if int(f_rank) != rank or int(f_epoch) != epoch:
        return None

    def hook(i: int) -> None:
        if i == int(f_batch) and not tables.exists(marker):
            tables.write_bytes(marker, f"killed rank {rank} epoch {epoch} batch {i}".encode())
            os._exit(1)
    return hook


def _say(msg: str) -> None:
    # Ray Train patches print() on its workers to log every line twice; write directly.
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] [train] {msg}\n")
    sys.stderr.flush()


def _all_reduce(values: list[float], device: Any) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def train_loop(loop_config: dict[str, Any]) -> None:
    """Per-worker training function run by TorchTrainer: wiring of pipeline.train's pieces."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from pipeline.checkpoint import save_checkpoint
    from pipeline.models import build_model
    from pipeline.preprocess import preprocess_from_state
    from pipeline.train import (EvalResizeCrop, ImageDataset, build_optimizer, build_scheduler,
                                build_train_loader, build_val_loader, convert_sync_batchnorm,
                                epoch_row, evaluate, restore_training_state, seed_everything,
                                train_epoch)

    cfg: TrainConfig = loop_config["cfg"]
    r = cfg.recipe
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(max(1, loop_config["threads"]))
    elif r.precision == "fp32":
        # fp32 means fp32: no TF32 in convolutions or matmuls (the paper's GPUs had none).
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    train_m, val_m = ray.get(loop_config["train"]), ray.get(loop_config["val"])
    preprocess = preprocess_from_state(loop_config["preprocess"])
    classes: list[str] = loop_config["classes"]
    loader_workers = int(loop_config["loader_workers"])

    seed_everything(r.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's)
    model = build_model(r.model, num_classes=len(classes), width=r.width)
    if loop_config["init"] is not None:
        model.load_state_dict(ray.get(loop_config["init"]))
    optimizer = build_optimizer(model, r)
    scheduler = build_scheduler(optimizer, r)
    start, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, CHECKPOINT_FILE), map_location="cpu",
                               weights_only=True)
        start, history = restore_training_state(state, model, optimizer, scheduler)
        if rank == 0:
            _say(f"resuming after epoch {start}")
    if cfg.sync_bn and world > 1:
        model = convert_sync_batchnorm(model, device)  # same parameters and state_dict keys
    raw = model
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)   # moves to the device, wraps in DDP
    for s in optimizer.state.values():             # resumed momentum buffers follow the model
        for k, v in s.items():
            if torch.is_tensor(v):
                s[k] = v.to(device)

    train_loader, sampler = build_train_loader(
        train_m.urls(range(len(train_m))), train_m.labels.tolist(), r, tables.read_bytes,
        world=world, rank=rank, loader_workers=loader_workers, pin_memory=cuda)
    per_worker = math.ceil(r.batch_size / world)
    # Validation: rank r takes images r, r+world, ...: no padding duplicates, exact sums.
    val_idx = list(range(rank, len(val_m), world))
    val_ds = ImageDataset(val_m.urls(val_idx), val_m.labels[val_idx].tolist(),
                          EvalResizeCrop(r.eval_resize, r.eval_crop), read=tables.read_bytes)
    val_loader = build_val_loader(val_ds, per_worker, loader_workers, pin_memory=cuda)

    metrics_url = tables.join(cfg.out, "metrics.parquet")
    if rank == 0 and history:
        tables.write_table(pa.Table.from_pylist(history, METRICS_SCHEMA), metrics_url, METRICS_SCHEMA)

    for epoch in range(start + 1, r.epochs + 1):
        t0 = time.perf_counter()
        seed_everything(r.seed, epoch, rank)
        sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        tr = train_epoch(model, train_loader, optimizer, preprocess, device,
                         precision=r.precision, channels_last=cuda, world=world,
                         step_sizes=sampler.step_sizes,
                         on_batch=_fault_hook(cfg.fault, rank, epoch))
        ev = evaluate(model, val_loader, preprocess, device, precision=r.precision,
                      channels_last=cuda)
        scheduler.step()
        sums = _all_reduce([tr.loss_sum, tr.images, tr.skipped, ev.loss_sum, ev.correct1,
                            ev.correct5, ev.images, ev.skipped], device)
        row = epoch_row(epoch, sums, lr, time.perf_counter() - t0, tr.seconds, world, r,
                        cfg.sync_bn)
        history.append(row)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_checkpoint(os.path.join(tmp, CHECKPOINT_FILE), raw, preprocess,
                                optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                                epoch=epoch, history=history, classes=classes,
                                recipe=r.as_dict(), sync_bn=cfg.sync_bn)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(row, checkpoint=ckpt)
        if rank == 0:
            tables.write_table(pa.Table.from_pylist(history, METRICS_SCHEMA), metrics_url,
                               METRICS_SCHEMA)
            _say(f"epoch {epoch}/{r.epochs} train_loss {row['train_loss']:.4f} "
                 f"val_loss {row['val_loss']:.4f} top1 {row['top1']:.3f} top5 {row['top5']:.3f} "
                 f"lr {lr:.4g} {row['seconds']:.1f}s {row['images_per_s']:.0f} img/s")


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def _storage(out: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for RunConfig: a custom S3 endpoint needs its own fs."""
    if not out.startswith("s3://"):
        return (os.path.abspath(out) if "://" not in out else out), None
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return out, None
    import pyarrow.fs as pafs

    scheme, _, host = endpoint.partition("://")
    fs = pafs.S3FileSystem(
        access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
        secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        session_token=os.environ.get("AWS_SESSION_TOKEN"),
        region=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
        endpoint_override=host or endpoint, scheme=scheme if host else "https")
    return out[len("s3://"):], fs


def _load_init(cfg: TrainConfig, num_classes: int) -> tuple[dict[str, Any] | None, TrainConfig]:
    """The --init state_dict, checked against the model and the data's classes."""
    if cfg.init_path is None:
        return None, cfg
    from dataclasses import replace

    from pipeline.checkpoint import load_checkpoint

    loaded = load_checkpoint(cfg.init_path, cfg.recipe.model)
    fc = loaded.model.fc.out_features
    if fc != num_classes:
        raise BadInput(f"--init {cfg.init_path} has {fc} classes but the data has {num_classes}")
    # The weights fix the width (torchvision's ResNet34: 64).
    cfg = replace(cfg, recipe=replace(cfg.recipe, width=loaded.model.width))
    return loaded.model.state_dict(), cfg


def _prepare_state(cfg: TrainConfig) -> dict[str, Any] | None:
    """The saved state of an earlier run into --out; a mismatching run is refused."""
    url = tables.join(cfg.out, STATE_FILE)
    if not tables.exists(url):
        return None
    state = tables.read_json(url)
    before, now = state["identity"], cfg.identity()
    diff = [k for k in _IDENTITY if before.get(k) != now.get(k)]
    if diff:
        k = diff[0]
        raise BadInput(f"{cfg.out} holds a run with {k}={before.get(k)!r}, not {now.get(k)!r}; "
                       f"rerun with the same settings (only --epochs may change) or another --out")
    return state


def write_model(url: str, last: dict[str, Any], preprocess: Any) -> None:
    """model.pt from a training checkpoint: weights, model name, preprocessing, classes, recipe.

    A `pipeline.checkpoint` file without optimizer state: `load_checkpoint(url)` restores model
    and preprocessing, and its `state_dict` loads into torchvision's ResNet of the same name.
    """
    from pipeline.checkpoint import model_from_state_dict, save_checkpoint

    model = model_from_state_dict(last["state_dict"], last["model"])
    final = last["history"][-1] if last.get("history") else {}
    save_checkpoint(url, model, preprocess, epoch=last["epoch"], classes=last["classes"],
                    recipe=last["recipe"], sync_bn=bool(last.get("sync_bn", False)),
                    metrics={k: final.get(k) for k in ("train_loss", "val_loss", "top1", "top5")})


def _finished_epochs(out: str) -> int:
    """Epochs of the model.pt already under --out (0 if none)."""
    from pipeline.checkpoint import load_checkpoint

    url = tables.join(out, "model.pt")
    if not tables.exists(url):
        return 0
    return int(load_checkpoint(url).meta.get("epoch", 0))


def resolve_loader_workers(cfg: TrainConfig, cluster_cpus: float) -> int:
    """--loader-workers, or its preset default: demo 0; paper the worker's CPU share minus one.

    The paper preset decodes and augments 256 JPEGs per step; one process per worker cannot feed
    a GPU, so each worker gets its share of the cluster's CPUs (minus the one it trains on) as
    DataLoader processes, at least 1 and at most 16.
    """
    if cfg.loader_workers is not None:
        return cfg.loader_workers
    if cfg.recipe.name != "paper":
        return 0
    return int(max(1, min(16, cluster_cpus // cfg.workers - 1)))


# Lines of Ray Train's own bookkeeping that say nothing to a person watching the epochs: each
# rank's full `TrainingReport(...)` per epoch, and the placement-group cleaner polling a State
# API that a Ray started without the dashboard does not serve. They go to --out/logs/ only.
# The controller's "Failed to send resource request ... safe to ignore" (with its traceback)
# appears when the CPUs are overloaded and says so itself.
_NOISE = re.compile(r"Reporting training result|TrainingReport\(|Failed to query Ray Train "
                    r"Controller|State API may be temporarily unavailable|has constructor "
                    r"arguments in the object store and max_restarts|Failed to send resource "
                    r"request for train-")
# The lines of a traceback that follows a noise line (muted with it).
_TRACEBACK = re.compile(r"(Traceback \(most recent call last\)|\s|During handling of the above|"
                        r"The above exception|[\w.]+(Error|Exception)\b.*:|$)")


def quiet_lines(lines: list[str], muted: bool = False) -> tuple[list[str], bool]:
    """(the lines a person should see, whether a muted traceback continues into the next batch).

    A line matching `_NOISE` is dropped together with the traceback that follows it; every other
    line is kept, tracebacks included.
    """
    keep = []
    for line in lines:
        if _NOISE.search(line):
            muted = True
        elif not (muted and _TRACEBACK.match(line)):
            muted = False
            keep.append(line)
    return keep, muted


@contextlib.contextmanager
def quiet_ray_train(log_url: str):
    """Route Ray Train's worker/controller noise to `log_url`; other lines reach the console.

    Ray forwards every worker's output to the driver through one handler (`ray_print_logs`);
    while training, a filtering handler replaces it: every line is written to the log file,
    lines matching `_NOISE` with their tracebacks (`quiet_lines`) and all of the placement-group
    cleaner's are kept off the console, the rest (epoch lines, warnings, errors) are printed as
    before.
    """
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:   # another Ray layout: leave its logging alone
        yield
        return
    found = [h for name, h in getattr(dispatcher, "handlers", []) if name == "ray_print_logs"]
    if len(found) != 1:   # log_to_driver off, or a layout we do not know: leave it alone
        yield
        return
    original = found[0]
    local = not log_url.startswith("s3://") and "://" not in log_url
    if local:
        os.makedirs(os.path.dirname(log_url), exist_ok=True)
        path = log_url
    else:
        fd, path = tempfile.mkstemp(suffix=".log")
        os.close(fd)
    sink = open(path, "a", encoding="utf-8")

    muted: dict[Any, bool] = {}   # per process: inside a muted traceback

    def handle(data: dict[str, Any]) -> None:
        who = str(data.get("actor_name") or data.get("task_name") or "")
        pid = data.get("pid")
        lines = list(data.get("lines", []))
        for line in lines:
            sink.write(f"({who} pid={pid}) {line}\n")
        sink.flush()
        if "PlacementGroupCleaner" in who:
            return
        keep, muted[pid] = quiet_lines(lines, muted.get(pid, False))
        if keep:
            original({**data, "lines": keep})

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", handle)
    try:
        yield
    finally:
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs", original)
        sink.close()
        if not local:
            with open(path, "rb") as f:
                tables.write_bytes(log_url, f.read())
            os.unlink(path)


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Fit ZCA (or reuse it), train with TorchTrainer, write model.pt and run.json."""
    import ray
    import ray.train
    import torch
    from ray.train.torch import TorchTrainer

    from pipeline.preprocess import preprocess_from_state

    t_start = time.perf_counter()
    sw = Stopwatch()
    with sw("manifest"):
        src = resolve_sources(cfg)
    init_state, cfg = _load_init(cfg, len(src.classes))
    state = _prepare_state(cfg)
    check_writable(cfg.out)
    done = _finished_epochs(cfg.out)
    if state is not None and done >= cfg.recipe.epochs and tables.exists(tables.join(cfg.out, "run.json")):
        log(f"{cfg.out} already holds a model trained for {done} epochs (>= {cfg.recipe.epochs}); "
            f"nothing to do (ask for more --epochs to continue)")
        return tables.read_json(tables.join(cfg.out, "run.json"))
    init_ray()
    if state is None:
        with sw("zca"):
            zca, zca_info = fit_zca(src.train, cfg.recipe, cfg.zca_shard)
        state = {"identity": cfg.identity(), "preprocess": zca.state(), "zca": zca_info,
                 "classes": src.classes}
        tables.write_json(tables.join(cfg.out, STATE_FILE), state)
        log(f"ZCA fitted on {zca_info['images']} images in {zca_info['shards']} tasks "
            f"({sw.seconds['zca']:.1f}s)")
    else:
        log(f"resuming the run in {cfg.out}: ZCA and settings from {STATE_FILE}")
    preprocess = preprocess_from_state(state["preprocess"])

    # Ray Train's Prometheus metrics want the dashboard's metrics agent, which jobs.common starts
    # Ray without; with them on, worker start-up was measured 10-30 s slower on 2 CPUs.
    os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
    storage_path, storage_fs = _storage(cfg.out)
    have = ray.cluster_resources()
    loader_workers = resolve_loader_workers(cfg, have.get("CPU", 1))
    cpus = 1 + loader_workers
    log(f"training {cfg.recipe.model} ({cfg.recipe.name} preset): {cfg.workers} workers x "
        f"{loader_workers} loader processes, global batch {cfg.recipe.batch_size}, "
        f"{cfg.recipe.precision}, augment {cfg.recipe.augment}, "
        f"BatchNorm {'synchronised' if cfg.sync_bn else 'per worker'}, seed {cfg.recipe.seed}")
    need = {"CPU": cfg.workers * cpus, **({"GPU": cfg.workers} if cfg.use_gpu else {})}
    short = [f"{need[k]:g} {k}s (cluster has {have.get(k, 0):g})" for k in need
             if have.get(k, 0) < need[k]]
    if short:
        # Not an error: an autoscaling cluster adds nodes; a fixed one would wait forever.
        log(f"warning: training needs {', '.join(short)}; it waits until the cluster has them")
    loop_config = {
        "cfg": cfg, "train": ray.put(src.train), "val": ray.put(src.val),
        "classes": src.classes, "preprocess": preprocess.state(), "threads": cpus,
        "loader_workers": loader_workers,
        "init": ray.put(init_state) if init_state is not None else None,
    }
    trainer = TorchTrainer(
        train_loop, train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cpus, **({"GPU": 1} if cfg.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=RUN_NAME, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            # Ray Train's per-report INFO lines repeat what rank 0 logs each epoch.
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),
    )
    with sw("train"), quiet_ray_train(tables.join(cfg.out, RAY_LOG)):
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("training ended without a checkpoint")
    with result.checkpoint.as_directory() as d:
        last = torch.load(os.path.join(d, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
    history = list(last["history"])
    final = history[-1] if history else {}
    write_model(tables.join(cfg.out, "model.pt"), last, preprocess)
    tables.write_table(pa.Table.from_pylist(history, METRICS_SCHEMA),
                       tables.join(cfg.out, "metrics.parquet"), METRICS_SCHEMA)
    trained = [h for h in history if h["epoch"] > 0]
    summary = {
        "job": "train",
        "config": {**asdict(cfg), "recipe": cfg.recipe.as_dict(), "fault": None,
                   "loader_workers": loader_workers, "sync_bn": cfg.sync_bn,
                   "seed": cfg.recipe.seed, "precision": cfg.recipe.precision,
                   "augment": cfg.recipe.augment},
        "versions": package_versions(),
        "counts": {"train_images": len(src.train), "val_images": len(src.val),
                   "classes": len(src.classes), "epochs": last["epoch"],
                   "zca_images": state["zca"]["images"], "zca_skipped": state["zca"]["skipped"],
                   "zca_shards": state["zca"]["shards"],
                   "skipped_per_epoch": [h["skipped"] for h in trained]},
        "seconds": {**sw.seconds, "total": time.perf_counter() - t_start},
        "throughput": {"train_images_per_s_mean": float(np.mean([h["images_per_s"] for h in trained]))
                       if trained else None},
        "final": final,
    }
    tables.write_json(tables.join(cfg.out, "run.json"), summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with bad_input_exits(PROG):
        cfg = TrainConfig.from_args(args, fault=os.environ.get(FAULT_ENV) or None)
        summary = run(cfg)
    f = summary["final"]
    log(f"done: {summary['counts']['epochs']} epochs, top1 {f.get('top1', float('nan')):.3f}, "
        f"{summary['seconds']['total']:.1f}s; model at {tables.join(cfg.out, 'model.pt')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
