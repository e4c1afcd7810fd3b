"""Training as plain functions: the recipe and its presets, one rank's training state, the
train/eval steps, the ZCA sums, the metrics rows and the final model file.

Everything here runs without Ray: the Ray Train job `jobs.train` only wires these pieces into
`TorchTrainer` (`prepare_model`, `report`), so each piece is testable on tiny tensors:

    recipe = preset("demo", model="resnet18")             # frozen, validated Recipe
    t = Training.start(recipe, classes, zca, torch.device("cpu"))   # model, SGD, StepLR
    data = make_loaders(train_manifest, val_manifest, recipe, read_bytes)
    row = t.run_epoch(1, data)                            # one metrics.parquet row
    stats = train_epoch(model, loader, opt, zca, device)  # the steps themselves
    ev = evaluate(model, val_loader, zca, device)

The paper's recipe (SGD momentum 0.9, weight decay 1e-4, lr 0.01 divided by 10 every 30 epochs,
90 epochs, batch 256, Inception-style random-resized crops 224 with horizontal flips and
photometric distortions, ZCA colour whitening, fp32, BatchNorm over the global batch) is
`PRESETS["paper"]`; `PRESETS["demo"]` is the same structure scaled to the embedded demo data.
Images and augmentation: `pipeline.data.augment`; datasets, samplers, loaders: `pipeline.train.data`;
synchronised BatchNorm: `pipeline.train.syncbn`; a run's bookkeeping (--init, resume checks, the ZCA
record, the run report): `pipeline.train.run`.

Models: the ResNet family and its PlainNets at any base width, and VGG (vgg11 ... vgg19, with or
without BatchNorm) at torchvision's fixed width (`train_models`). A preset's width (the demo's
16) applies to the ResNet family only: for VGG the preset keeps torchvision's width 64.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Iterable, Sequence

import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.data.augment import AUGMENTS, EvalResizeCrop
from pipeline.data.preprocess import Preprocess
from pipeline.train.syncbn import convert_sync_batchnorm
from pipeline.train.data import ImageDataset, build_train_loader, build_val_loader, collate
from pipeline.results import catalog

__all__ = ["Recipe", "PRESETS", "PRECISIONS", "preset", "train_models", "build_optimizer",
           "build_scheduler", "EpochStats", "EvalStats", "topk_correct", "train_epoch",
           "evaluate", "weighted_loss", "restore_training_state", "epoch_row", "seed_everything",
           "METRICS_SCHEMA", "Training", "Loaders", "make_loaders", "zca_moments",
           "default_loader_workers", "write_model", "arrow_storage", "configure_torch", "metrics_table",
           "EvalResizeCrop", "ImageDataset", "collate", "training_sources"]

PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Recipe:
    """A training recipe; `jobs.train` flags override single fields (`dataclasses.replace`)."""

    name: str = "paper"
    model: str = "resnet34"
    width: int = 64                    # base width (64 = torchvision's ResNet34)
    input_size: int = 224              # side of the random-resized training crop
    eval_resize: int = 256             # validation: shorter side resized to this ...
    eval_crop: int = 224               # ... then a centre crop of this side
    epochs: int = 90
    batch_size: int = 256              # global batch, split evenly over the workers
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    step_epochs: int = 30              # lr divided by `gamma`⁻¹ every this many epochs
    gamma: float = 0.1
    crop_scale: tuple[float, float] = (0.08, 1.0)   # Inception-style area fraction
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # and aspect ratio range
    zca_images: int = 10_000           # training images sampled to fit the ZCA matrix
    zca_eps: float = 1e-5              # added to the colour covariance eigenvalues (pixels in [0, 1])
    seed: int = 0                      # initialisation, data order, augmentation
    precision: str = "fp32"            # fp32 (TF32 off) or bf16 autocast; the paper: fp32
    augment: str = "inception"         # one of AUGMENTS
    sync_bn: bool = True               # BatchNorm over the whole global batch (with > 1 worker)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field and what is allowed."""
        positive = ("width", "input_size", "eval_resize", "eval_crop", "epochs", "batch_size",
                    "step_epochs", "zca_images")
        for f in positive:
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be a positive integer, got {getattr(self, f)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight decay must be >= 0, got {self.weight_decay}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must lie in (0, 1], got {self.gamma}")
        if self.eval_crop > self.eval_resize:
            raise ValueError(f"eval crop {self.eval_crop} exceeds eval resize {self.eval_resize}")
        if self.zca_eps < 0:
            raise ValueError(f"zca eps must be >= 0, got {self.zca_eps}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"invalid precision {self.precision!r}; allowed: {', '.join(PRECISIONS)}")
        if self.augment not in AUGMENTS:
            raise ValueError(f"invalid augment {self.augment!r}; allowed: {', '.join(AUGMENTS)}")

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


PRESETS: dict[str, Recipe] = {
    "paper": Recipe(),
    # The paper's structure at the demo scale (72x72 JPEGs, 8 classes, 2 CPU cores): width 16,
    # random-resized crops of 64, evaluation resize 72 / centre crop 64 (= pipeline.data.demo's
    # analysis transform). lr 0.05 for a global batch of 64 trains within the few epochs the
    # one-minute budget allows (measured in docs/training.md); lr / 10 for the last epoch as
    # in the paper's step schedule. 512 images = 2M pixels: ample for a 3x3 colour covariance.
    # Each demo class is one photograph, so colour alone would tell most classes apart and the
    # networks would learn colour detectors: hue rotation and grayscale make colour a weak cue.
    # Per-worker BatchNorm (no sync) keeps the CPU demo's steps free of extra all-reduces.
    "demo": Recipe(name="demo", width=16, input_size=64, eval_resize=72, eval_crop=64, epochs=4,
                   batch_size=64, lr=0.05, step_epochs=3, zca_images=512,
                   augment="crop-flip-hue-gray", sync_bn=False),
}


def train_models() -> list[str]:
    """The models `jobs.train` trains: the ResNet family with its PlainNets, and VGG."""
    from pipeline.models.zoo import MODELS

    vgg = [f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")]
    return sorted([*MODELS, *vgg])


def preset(name: str, **overrides: Any) -> Recipe:
    """A validated preset with some fields overridden (None values are ignored).

    The base width is the ResNet family's knob: for any other model (VGG) the preset's width
    becomes torchvision's 64 (the demo trains full-width VGG at its 64-px crops), and an
    explicit other width is refused.
    """
    from pipeline.models.zoo import is_resnet

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; allowed: {', '.join(sorted(PRESETS))}")
    given = {k: v for k, v in overrides.items() if v is not None}
    recipe = replace(PRESETS[name], **given)
    if not is_resnet(recipe.model):
        if given.get("width", 64) != 64:
            raise ValueError(f"width {given['width']} applies to the ResNet family only; "
                             f"{recipe.model} has torchvision's width (64)")
        recipe = replace(recipe, width=64)
    recipe.validate()
    return recipe


def seed_everything(seed: int, epoch: int = 0, rank: int = 0) -> None:
    """Seed torch's RNG for (seed, epoch, rank): epoch 0 = initialisation, the same on every rank.

    Per (epoch, rank) a resumed run draws the same augmentation as an unbroken one; DataLoader
    processes derive their seeds from this RNG, so they follow too.
    """
    torch.manual_seed(seed if epoch == 0 else seed * 1_000_003 + epoch * 1_009 + rank)


def restore_training_state(state: dict[str, Any], model: nn.Module,
                           optimizer: torch.optim.Optimizer,
                           scheduler: torch.optim.lr_scheduler.LRScheduler
                           ) -> tuple[int, list[dict[str, Any]]]:
    """Load a training checkpoint's weights, momentum and schedule; (finished epochs, history)."""
    model.load_state_dict(state["state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"]), list(state["history"])


def epoch_row(epoch: int, sums: Sequence[float], lr: float, seconds: float, train_seconds: float,
              world: int, recipe: Recipe, sync_bn: bool) -> dict[str, Any]:
    """One `metrics.parquet` row from the all-reduced sums of an epoch.

    `sums` = (train loss sum, train images, train skipped, val loss sum, top-1 hits, top-5 hits,
    val images, val skipped), summed over the ranks.
    """
    loss_sum, n_train, skipped, v_loss, c1, c5, n_val, v_skipped = sums
    return {
        "epoch": epoch, "train_loss": loss_sum / max(n_train, 1), "val_loss": v_loss / max(n_val, 1),
        "top1": c1 / max(n_val, 1), "top5": c5 / max(n_val, 1), "lr": lr, "seconds": seconds,
        "images_per_s": n_train / max(train_seconds, 1e-9), "train_images": int(n_train),
        "val_images": int(n_val), "skipped": int(skipped + v_skipped), "workers": world,
        "seed": recipe.seed, "precision": recipe.precision, "augment": recipe.augment,
        "sync_bn": bool(sync_bn),
    }


# ---------------------------------------------------------------------------------------------
# Optimisation
# ---------------------------------------------------------------------------------------------

def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.SGD:
    # As in the paper (and torchvision's reference recipe): weight decay on every parameter.
    return torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                           weight_decay=recipe.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe) -> torch.optim.lr_scheduler.StepLR:
    """Step schedule stepped once per epoch: lr · gamma^⌊epoch / step_epochs⌋."""
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=recipe.step_epochs,
                                           gamma=recipe.gamma)


def weighted_loss(logits: Tensor, labels: Tensor, world: int = 1,
                  global_batch: int | None = None) -> tuple[Tensor, Tensor]:
    """(loss to backpropagate, summed cross-entropy) of one rank's share of a step.

    Each image is weighted by world / global_batch: DDP averages the ranks' gradients (÷ world),
    so the result is the gradient of the mean loss over the whole global batch, however unevenly
    it was split. Without `global_batch` the rank's own mean (the plain single-process loss).
    """
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()   # the loss in fp32 under autocast
    total = F.cross_entropy(logits, labels, reduction="sum")
    n = global_batch if global_batch is not None else max(len(labels), 1)
    return total * (world / n), total.detach()


@dataclass
class EpochStats:
    """Training sums of one worker's epoch (summed over workers by the job)."""

    loss_sum: float = 0.0
    images: int = 0
    skipped: int = 0
    steps: int = 0
    seconds: float = 0.0

    @property
    def loss(self) -> float:
        return self.loss_sum / self.images if self.images else float("nan")


@dataclass
class EvalStats:
    """Validation sums: loss, top-1 / top-5 hits, images; mergeable by addition."""

    loss_sum: float = 0.0
    correct1: int = 0
    correct5: int = 0
    images: int = 0
    skipped: int = 0

    def merge(self, other: "EvalStats") -> "EvalStats":
        return EvalStats(self.loss_sum + other.loss_sum, self.correct1 + other.correct1,
                         self.correct5 + other.correct5, self.images + other.images,
                         self.skipped + other.skipped)

    @property
    def loss(self) -> float:
        return self.loss_sum / self.images if self.images else float("nan")

    @property
    def top1(self) -> float:
        return self.correct1 / self.images if self.images else float("nan")

    @property
    def top5(self) -> float:
        return self.correct5 / self.images if self.images else float("nan")


def topk_correct(logits: Tensor, labels: Tensor, ks: Iterable[int] = (1, 5)) -> list[int]:
    """Number of rows whose label is among the k highest logits, for each k (k capped at C)."""
    ks = list(ks)
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == labels[:, None]
    return [int(hit[:, :min(k, kmax)].any(1).sum()) for k in ks]


def _inputs(images: Tensor, preprocess: Preprocess, device: torch.device,
            channels_last: bool) -> Tensor:
    x = images.to(device, non_blocking=True).float().div_(255.0)
    x = preprocess(x)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=precision == "bf16")


def train_epoch(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor, int]],
                optimizer: torch.optim.Optimizer, preprocess: Preprocess, device: torch.device,
                amp: bool = False, channels_last: bool = False,
                on_batch: Callable[[int], None] | None = None, precision: str | None = None,
                world: int = 1, step_sizes: Sequence[int] | None = None) -> EpochStats:
    """One pass of SGD over `batches` of (uint8 images, labels, skipped) -> summed stats.

    `precision` "bf16" (or the older `amp=True`) turns on bf16 autocast; "fp32" keeps fp32.
    `step_sizes[i]` is step i's global batch over `world` ranks: each image then weighs
    world / step_sizes[i] (`weighted_loss`), so the averaged gradient is one global batch's.
    `on_batch(i)` is called before step i (the job uses it for fault-injection tests). A batch
    left empty by unreadable files still takes part in the step with a zero loss, so
    data-parallel workers stay in lockstep.
    """
    precision = precision or ("bf16" if amp else "fp32")
    model.train()
    stats = EpochStats()
    t0 = time.perf_counter()
    for i, (images, labels, skipped) in enumerate(batches):
        if on_batch is not None:
            on_batch(i)
        stats.skipped += skipped
        optimizer.zero_grad(set_to_none=True)
        n = len(labels)
        x = _inputs(images, preprocess, device, channels_last)
        y = labels.to(device, non_blocking=True)
        with _autocast(device, precision):
            logits = model(x)
        # An empty batch (every file unreadable) still runs forward/backward with a zero loss:
        # every parameter gets a (zero) gradient, so DDP's all-reduce stays in step.
        if n:
            loss, loss_sum = weighted_loss(logits, y, world,
                                           step_sizes[i] if step_sizes is not None else None)
        else:
            loss, loss_sum = logits.sum() * 0.0, torch.zeros(())
        loss.backward()
        optimizer.step()
        stats.loss_sum += float(loss_sum)
        stats.images += n
        stats.steps += 1
    stats.seconds = time.perf_counter() - t0
    return stats


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor, int]],
             preprocess: Preprocess, device: torch.device, amp: bool = False,
             channels_last: bool = False, precision: str | None = None) -> EvalStats:
    """Summed cross-entropy, top-1 and top-5 hits over `batches` (model in eval mode)."""
    precision = precision or ("bf16" if amp else "fp32")
    model.eval()
    stats = EvalStats()
    for images, labels, skipped in batches:
        stats.skipped += skipped
        if len(labels) == 0:
            continue
        x = _inputs(images, preprocess, device, channels_last)
        y = labels.to(device)
        with _autocast(device, precision):
            logits = model(x)
        logits = logits.float()
        stats.loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        c1, c5 = topk_correct(logits, y, (1, 5))
        stats.correct1 += c1
        stats.correct5 += c5
        stats.images += len(y)
    return stats


# ---------------------------------------------------------------------------------------------
# One rank's training run: what the Ray Train loop wires together
# ---------------------------------------------------------------------------------------------

METRICS_SCHEMA = catalog.METRICS.schema


def configure_torch(device: torch.device, precision: str, threads: int) -> None:
    """CPU: `threads` intra-op threads (the CPUs the worker reserved). CUDA with fp32: TF32 off
    in convolutions and matmuls, since fp32 means fp32 (the paper's GPUs had no TF32)."""
    if device.type != "cuda":
        torch.set_num_threads(max(1, threads))
    elif precision == "fp32":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


@dataclass
class Loaders:
    train: torch.utils.data.DataLoader
    sampler: Any                      # traindata.GlobalBatchSampler: step sizes, set_epoch
    val: torch.utils.data.DataLoader


def make_loaders(train: Any, val: Any, recipe: Recipe, read: Callable[[str], bytes],
                 world: int = 1, rank: int = 0, loader_workers: int = 0,
                 pin_memory: bool = False) -> Loaders:
    """This rank's loaders over two manifests (`pipeline.data.listing.Manifest`): its share of every
    global training batch, and validation images rank, rank + world, ... (no padding
    duplicates, so the all-reduced sums are exact)."""
    loader, sampler = build_train_loader(train.urls(range(len(train))), train.labels.tolist(),
                                         recipe, read, world=world, rank=rank,
                                         loader_workers=loader_workers, pin_memory=pin_memory)
    idx = list(range(rank, len(val), world))
    ds = ImageDataset(val.urls(idx), val.labels[idx].tolist(),
                      EvalResizeCrop(recipe.eval_resize, recipe.eval_crop), read=read)
    per_worker = math.ceil(recipe.batch_size / world)
    return Loaders(loader, sampler, build_val_loader(ds, per_worker, loader_workers, pin_memory))


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    """Sum over the ranks (float64) when torch.distributed is up; else the values."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


@dataclass
class Training:
    """One rank's state: `model` (the caller may wrap it in DDP), `raw` (the module whose
    state_dict is saved), optimizer, step schedule, finished `epoch` and the metrics history."""

    recipe: Recipe
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    preprocess: Preprocess
    device: torch.device
    classes: list[str]
    sync_bn: bool = False
    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    raw: nn.Module | None = None

    @classmethod
    def start(cls, recipe: Recipe, classes: list[str], preprocess: Preprocess,
              device: torch.device, init: dict[str, Tensor] | None = None,
              restored: dict[str, Any] | None = None, sync_bn: bool = False) -> "Training":
        """Seeded model (the same on every rank), optionally --init weights, optionally a
        training checkpoint restored (weights, momentum, schedule, history); BatchNorm made
        synchronous when asked; momentum buffers moved to `device`."""
        from pipeline.models.zoo import build_model

        seed_everything(recipe.seed)
        model = build_model(recipe.model, num_classes=len(classes), width=recipe.width)
        if init is not None:
            model.load_state_dict(init)
        if sync_bn:   # before the optimizer is built: it must hold the modules' parameters
            model = convert_sync_batchnorm(model, device)   # same parameters and keys
        optimizer = build_optimizer(model, recipe)
        scheduler = build_scheduler(optimizer, recipe)
        t = cls(recipe, model, optimizer, scheduler, preprocess, device, list(classes), sync_bn)
        if restored is not None:
            t.epoch, t.history = restore_training_state(restored, model, optimizer, scheduler)
        t.raw = model
        t.model = model.to(device)
        if device.type == "cuda":
            t.model = t.model.to(memory_format=torch.channels_last)
        for s in optimizer.state.values():          # resumed momentum follows the model
            for k, v in s.items():
                if torch.is_tensor(v):
                    s[k] = v.to(device)
        return t

    def run_epoch(self, epoch: int, data: Loaders, world: int = 1, rank: int = 0,
                  on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Train and validate one epoch, step the schedule; returns (and keeps) its row."""
        r, cuda = self.recipe, self.device.type == "cuda"
        t0 = time.perf_counter()
        seed_everything(r.seed, epoch, rank)
        data.sampler.set_epoch(epoch)
        lr = self.optimizer.param_groups[0]["lr"]
        tr = train_epoch(self.model, data.train, self.optimizer, self.preprocess, self.device,
                         precision=r.precision, channels_last=cuda, world=world,
                         step_sizes=data.sampler.step_sizes, on_batch=on_batch)
        ev = evaluate(self.model, data.val, self.preprocess, self.device, precision=r.precision,
                      channels_last=cuda)
        self.scheduler.step()
        sums = _all_reduce([tr.loss_sum, tr.images, tr.skipped, ev.loss_sum, ev.correct1,
                            ev.correct5, ev.images, ev.skipped], self.device)
        row = epoch_row(epoch, sums, lr, time.perf_counter() - t0, tr.seconds, world, r,
                        self.sync_bn)
        self.epoch = epoch
        self.history.append(row)
        return row

    def save(self, url: str) -> None:
        """A training checkpoint: the `pipeline.models.checkpoint` file plus optimizer, schedule,
        epoch, history, classes and recipe (what `start(restored=...)` reads back)."""
        from pipeline.models.checkpoint import save_checkpoint

        save_checkpoint(url, self.raw, self.preprocess, optimizer=self.optimizer.state_dict(),
                        scheduler=self.scheduler.state_dict(), epoch=self.epoch,
                        history=self.history, classes=self.classes,
                        recipe=self.recipe.as_dict(), sync_bn=self.sync_bn)


def metrics_table(history: Sequence[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(history), METRICS_SCHEMA)


def zca_moments(urls: Sequence[str], resize: int, crop: int,
                read: Callable[[str], bytes]) -> tuple[Any, int, int]:
    """(WhiteningStats, images read, images skipped) of some training images' eval crops
    in [0, 1]: one mergeable piece of the ZCA fit (float64 sums, exact to merge)."""
    from pipeline.data.preprocess import WhiteningStats

    ds = ImageDataset(urls, [0] * len(urls), EvalResizeCrop(resize, crop), read=read)
    images, _, skipped = collate([ds[i] for i in range(len(ds))])
    stats = WhiteningStats()
    if len(images):
        stats.update(images.float().div_(255.0))
    return stats, int(len(images)), int(skipped)


def default_loader_workers(recipe: Recipe, workers: int, cluster_cpus: float) -> int:
    """The preset's DataLoader processes per worker: demo 0; paper the worker's CPU share minus
    the one it trains on, 1..16 (one process cannot decode and augment 256 JPEGs per step fast
    enough to feed a GPU)."""
    if recipe.name != "paper":
        return 0
    return int(max(1, min(16, cluster_cpus // workers - 1)))


def write_model(url: str, last: dict[str, Any], preprocess: Preprocess) -> None:
    """model.pt from a training checkpoint: weights, model name, preprocessing, classes, recipe.

    A `pipeline.models.checkpoint` file without optimizer state: `load_checkpoint(url)` restores model
    and preprocessing, and its `state_dict` loads into torchvision's constructor of the same
    name (resnet34, vgg11, ...).
    """
    from pipeline.models.checkpoint import model_from_state_dict, save_checkpoint

    model = model_from_state_dict(last["state_dict"], last["model"])
    final = last["history"][-1] if last.get("history") else {}
    save_checkpoint(url, model, preprocess, epoch=last["epoch"], classes=last["classes"],
                    recipe=last["recipe"], sync_bn=bool(last.get("sync_bn", False)),
                    metrics={k: final.get(k) for k in ("train_loss", "val_loss", "top1", "top5")})


def arrow_storage(out: str, env: dict[str, str]) -> tuple[str, Any]:
    """(path, pyarrow filesystem or None) of a run folder for Ray Train's RunConfig: local paths
    made absolute; s3:// with a custom endpoint (MinIO, moto, Ceph) needs its own
    `pyarrow.fs.S3FileSystem`, built from the standard AWS_* variables in `env`."""
    import os

    if not out.startswith("s3://"):
        return (os.path.abspath(out) if "://" not in out else out), None
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return out, None
    import pyarrow.fs as pafs

    scheme, _, host = endpoint.partition("://")
    fs = pafs.S3FileSystem(
        access_key=env.get("AWS_ACCESS_KEY_ID"), secret_key=env.get("AWS_SECRET_ACCESS_KEY"),
        session_token=env.get("AWS_SESSION_TOKEN"),
        region=env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or "us-east-1",
        endpoint_override=host or endpoint, scheme=scheme if host else "https")
    return out[len("s3://"):], fs


def training_sources(train_url: str, val_url: str) -> tuple[Any, Any, list[str]]:
    """(training manifest, validation manifest, classes): labels required and the same class
    list in both (labels are positions in it); ValueError (one line) otherwise."""
    from pipeline.data.listing import build_manifest

    train = build_manifest(train_url, require_labels=True)
    val = build_manifest(val_url, require_labels=True)
    classes = list(train.classes)
    if list(val.classes) != classes:
        raise ValueError(f"validation source {val_url} has {len(val.classes)} classes that "
                         f"differ from the training source's {len(classes)}; both need the same "
                         f"class list")
    return train, val, classes

