"""Training recipe as plain functions: presets, augmentation, optimizer/schedule, train/eval steps.

Everything here runs without Ray (the Ray Train job `jobs.train` only wires these pieces into
`TorchTrainer`), so each piece is testable on tiny tensors:

    recipe = PRESETS["demo"]                              # frozen Recipe
    model = build_model(recipe.model, num_classes=8, width=recipe.width)
    opt, sched = build_optimizer(model, recipe), None
    sched = build_scheduler(opt, recipe)                  # lr / 10 every `step_epochs` epochs
    ds = ImageDataset(urls, labels, TrainTransform(recipe.input_size), read=read_bytes)
    loader = DataLoader(ds, batch_size=32, collate_fn=collate)
    stats = train_epoch(model, loader, opt, zca, torch.device("cpu"))
    ev = evaluate(model, val_loader, zca, torch.device("cpu"))

The paper's recipe (SGD momentum 0.9, weight decay 1e-4, lr 0.01 divided by 10 every 30 epochs,
90 epochs, batch 256, Inception-style random-resized crops 224 with horizontal flips, ZCA colour
whitening) is `PRESETS["paper"]`; `PRESETS["demo"]` is the same structure scaled to the embedded
demo data. The dataset reads bytes through an injected `read` function (the jobs pass
`pipeline.tables.read_bytes`), so this module never opens files itself.

The pieces that make the paper preset the paper's: fp32 training (`Recipe.precision`, bf16
optional), BatchNorm statistics over the whole global batch (`convert_sync_batchnorm`, also on
CPU), Inception-style photometric distortions (`Photometric`, `TrainTransform(augment=...)`), and
a global batch of exactly `batch_size` images for any worker count (`GlobalBatchSampler` splits
each step's batch unevenly when it must; `weighted_loss` weights every image by
world / global batch so the all-reduced gradient is the gradient of one global batch).
"""
from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor, nn

from .preprocess import Preprocess

__all__ = ["Recipe", "PRESETS", "preset", "TrainTransform", "EvalResizeCrop", "decode_rgb",
           "ImageDataset", "collate", "build_optimizer", "build_scheduler", "EpochStats",
           "EvalStats", "topk_correct", "train_epoch", "evaluate", "IGNORE", "AUGMENTS",
           "PRECISIONS", "Photometric", "apply_photometric", "split_sizes", "GlobalBatchSampler",
           "weighted_loss", "SyncBatchNorm", "convert_sync_batchnorm", "build_train_loader",
           "build_val_loader", "restore_training_state", "epoch_row", "seed_everything"]

# Augmentations (`Recipe.augment`, `jobs.train --augment`):
#   inception          random-resized crop + horizontal flip + the Inception recipe's photometric
#                      distortions (brightness, saturation, hue, contrast in a random order)
#   crop-flip          random-resized crop + horizontal flip only
#   crop-flip-hue-gray crop + flip + a hue rotation drawn over the whole colour circle and
#                      grayscale with probability 0.2: colour is a weak cue (the demo's default)
AUGMENTS = ("inception", "crop-flip", "crop-flip-hue-gray")
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
    # random-resized crops of 64, evaluation resize 72 / centre crop 64 (= pipeline.demo's
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


def preset(name: str, **overrides: Any) -> Recipe:
    """A validated preset with some fields overridden (None values are ignored)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; allowed: {', '.join(sorted(PRESETS))}")
    recipe = replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
    recipe.validate()
    return recipe


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------

def decode_rgb(data: bytes) -> Image.Image:
    """Decode by content (JPEG, PNG named .JPEG, CMYK, grayscale ...) and convert to RGB."""
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


# The Inception recipe's photometric distortions (Szegedy et al. 2015 cite Howard 2013; the
# reference implementation is TF-slim's `inception_preprocessing.distort_color`): brightness
# shifted by up to 32/255, saturation and contrast scaled by [0.5, 1.5], hue rotated by up to 0.2
# of the colour circle, applied in one of four orders drawn per image, clamped to [0, 1].
_ORDERS = (("brightness", "saturation", "hue", "contrast"),
           ("saturation", "brightness", "contrast", "hue"),
           ("contrast", "hue", "brightness", "saturation"),
           ("hue", "saturation", "contrast", "brightness"))


@dataclass(frozen=True)
class Photometric:
    """One draw of the photometric distortion: the parameters, so tests can check the pixels."""

    brightness: float = 0.0   # added to every channel (pixels in [0, 1])
    saturation: float = 1.0   # blend factor with the grayscale image (torchvision's)
    hue: float = 0.0          # rotation as a fraction of the hue circle, in [-0.5, 0.5]
    contrast: float = 1.0     # per-channel: (x - channel mean) * factor + channel mean
    order: int = 0            # index into the four orders of the recipe

    @classmethod
    def sample(cls, generator: torch.Generator | None = None, brightness: float = 32 / 255,
               saturation: tuple[float, float] = (0.5, 1.5), hue: float = 0.2,
               contrast: tuple[float, float] = (0.5, 1.5)) -> "Photometric":
        """A draw from torch's RNG (the job seeds it per epoch and rank, and loader processes)."""
        u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        order = int(torch.randint(len(_ORDERS), (1,), generator=generator))
        return cls(brightness=(2 * u[0] - 1) * brightness,
                   saturation=saturation[0] + u[1] * (saturation[1] - saturation[0]),
                   hue=(2 * u[2] - 1) * hue,
                   contrast=contrast[0] + u[3] * (contrast[1] - contrast[0]), order=order)


def apply_photometric(x: Tensor, p: Photometric) -> Tensor:
    """Distort a float RGB image (3, H, W) in [0, 1] by `p`, in `p`'s order; clamped to [0, 1]."""
    for op in _ORDERS[p.order]:
        if op == "brightness":
            x = (x + p.brightness).clamp(0.0, 1.0)
        elif op == "saturation":
            x = TF.adjust_saturation(x, p.saturation)
        elif op == "hue":
            x = TF.adjust_hue(x, p.hue)
        else:
            m = x.mean(dim=(-2, -1), keepdim=True)
            x = ((x - m) * p.contrast + m).clamp(0.0, 1.0)
    return x


class TrainTransform:
    """Training augmentation: random-resized crop to `size`, random horizontal flip, and per
    `augment` (see AUGMENTS) the photometric distortions or hue rotation + grayscale.

    Returns a uint8 (3, size, size) RGB tensor; `collate` turns batches into [0, 1] floats
    and the model's preprocessing (ZCA) is applied on the device, once per batch. Random draws
    come from torch's global RNG, which the job seeds per (epoch, rank) and DataLoader seeds per
    loader process.
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True,
                 augment: str = "crop-flip", grayscale_p: float = 0.2):
        if augment not in AUGMENTS:
            raise ValueError(f"invalid augment {augment!r}; allowed: {', '.join(AUGMENTS)}")
        self.size, self.augment, self.grayscale_p = size, augment, grayscale_p
        steps: list[Any] = [T.RandomResizedCrop(size, scale=scale, ratio=ratio, antialias=True)]
        if flip:
            steps.append(T.RandomHorizontalFlip())
        steps.append(T.PILToTensor())
        self._t = T.Compose(steps)

    def __call__(self, image: Image.Image) -> Tensor:
        x = self._t(image)
        if self.augment == "crop-flip":
            return x
        f = x.float().div_(255.0)
        if self.augment == "inception":
            f = apply_photometric(f, Photometric.sample())
        else:  # crop-flip-hue-gray
            f = TF.adjust_hue(f, float(torch.rand(())) - 0.5)
            if float(torch.rand(())) < self.grayscale_p:
                f = TF.rgb_to_grayscale(f, num_output_channels=3)
        return f.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


class EvalResizeCrop:
    """Shorter side resized to `resize` (bilinear, antialiased), centre crop `crop`: uint8.

    The analysis' own path (`pipeline.decode.resize_crop`), so validation metrics and the
    stimulus tables see the same pixels for the same image (tests/pipeline/test_decode.py).
    """

    def __init__(self, resize: int, crop: int):
        from .decode import EvalTransform

        self.resize, self.crop = resize, crop
        self.transform = EvalTransform(resize, crop)

    def __call__(self, image: Image.Image | Tensor) -> Tensor:
        from .decode import resize_crop

        x = image if isinstance(image, Tensor) else TF.pil_to_tensor(image)
        return resize_crop(x, self.transform)


# Labels of unusable rows; cross-entropy ignores them (torch's default ignore_index).
IGNORE = -100


class ImageDataset(torch.utils.data.Dataset):
    """(url, label) pairs -> (uint8 image, label); an unreadable file yields None (counted).

    `read` maps a URL to its bytes (I/O is injected, so this module never opens files).
    """

    def __init__(self, urls: Sequence[str], labels: Sequence[int],
                 transform: Callable[[Image.Image], Tensor], read: Callable[[str], bytes]):
        if len(urls) != len(labels):
            raise ValueError(f"{len(urls)} urls but {len(labels)} labels")
        self.urls, self.labels = list(urls), [int(v) for v in labels]
        self.transform, self.read = transform, read

    def __len__(self) -> int:
        return len(self.urls)

    def __getitem__(self, i: int) -> tuple[Tensor, int] | None:
        try:
            image = decode_rgb(self.read(self.urls[i]))
        except Exception:  # noqa: BLE001 - any unreadable/undecodable file is skipped, counted
            return None
        return self.transform(image), self.labels[i]


def collate(items: list[tuple[Tensor, int] | None]) -> tuple[Tensor, Tensor, int]:
    """Stack readable items; returns (uint8 images (N,3,H,W), int64 labels (N,), skipped)."""
    good = [it for it in items if it is not None]
    skipped = len(items) - len(good)
    if not good:
        return torch.zeros(0, 3, 1, 1, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64), skipped
    images = torch.stack([im for im, _ in good])
    labels = torch.tensor([lab for _, lab in good], dtype=torch.int64)
    return images, labels, skipped


def split_sizes(total: int, world: int) -> list[int]:
    """`total` images over `world` ranks as evenly as possible: the first total % world get one more."""
    base, extra = divmod(total, world)
    return [base + (r < extra) for r in range(world)]


class GlobalBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Rank `rank`'s share of each global batch of `batch_size` images, for any worker count.

    Every rank draws the same seeded permutation per epoch (seed + epoch, as DistributedSampler),
    cuts it into global batches and takes its `split_sizes` part of each, so all ranks take the
    same number of steps and every step's global batch size (`step_sizes`) is known on every rank
    without communication. The trailing incomplete batch is dropped when a full one exists.
    """

    def __init__(self, n: int, batch_size: int, world: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside 0..{world - 1}")
        self.n, self.batch_size, self.world, self.rank = n, batch_size, world, rank
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        batches = [order[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        if len(batches) > 1 and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    @property
    def step_sizes(self) -> list[int]:
        """Images in each step's global batch (all ranks together)."""
        return [len(b) for b in self.global_batches()]

    def __iter__(self):
        for b in self.global_batches():
            start = sum(split_sizes(len(b), self.world)[:self.rank])
            yield b[start:start + split_sizes(len(b), self.world)[self.rank]]

    def __len__(self) -> int:
        return len(self.global_batches())


def build_train_loader(urls: Sequence[str], labels: Sequence[int], recipe: Recipe,
                       read: Callable[[str], bytes], world: int = 1, rank: int = 0,
                       loader_workers: int = 0, pin_memory: bool = False
                       ) -> tuple[torch.utils.data.DataLoader, GlobalBatchSampler]:
    """This rank's training DataLoader (augmented, `recipe.augment`) and its batch sampler."""
    ds = ImageDataset(urls, labels, TrainTransform(recipe.input_size, recipe.crop_scale,
                                                   recipe.crop_ratio, augment=recipe.augment),
                      read=read)
    sampler = GlobalBatchSampler(len(ds), recipe.batch_size, world, rank, seed=recipe.seed)
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=sampler, collate_fn=collate, num_workers=loader_workers,
        pin_memory=pin_memory, persistent_workers=False)
    return loader, sampler


def build_val_loader(dataset: torch.utils.data.Dataset, batch_size: int, loader_workers: int = 0,
                     pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A validation DataLoader over this rank's images (the caller builds the dataset)."""
    return torch.utils.data.DataLoader(dataset, batch_size=max(1, batch_size), shuffle=False,
                                       collate_fn=collate, num_workers=loader_workers,
                                       pin_memory=pin_memory)


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


class SyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover every rank's images (any device, gloo too).

    torch's `nn.SyncBatchNorm` runs on GPUs only; this one all-reduces per-channel sums with the
    differentiable `torch.distributed.nn.all_reduce` (two passes: mean, then squared deviations,
    so no E[x²] − E[x]² cancellation), so forward and backward equal BatchNorm over the global
    batch. Ranks may hold different numbers of images. Same parameters and buffers as
    BatchNorm2d: state_dicts are interchangeable.
    """

    def forward(self, x: Tensor) -> Tensor:
        import torch.distributed as dist

        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn import all_reduce

        c = x.shape[1]
        count = all_reduce(x.new_tensor([x.numel() / c]))
        n = count.clamp_min(1.0)
        mean = all_reduce(x.sum(dim=(0, 2, 3))) / n
        centred = x - mean.view(1, c, 1, 1)
        var = all_reduce((centred * centred).sum(dim=(0, 2, 3))) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                     else self.momentum)
                unbiased = var * (n / (n - 1).clamp_min(1.0))
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach(), alpha=m)
        y = centred * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y


def convert_sync_batchnorm(model: nn.Module, device: torch.device | None = None) -> nn.Module:
    """Every BatchNorm2d of `model` made synchronous across ranks (in place; returns `model`).

    On CUDA torch's own `nn.SyncBatchNorm` (fused kernels); elsewhere `SyncBatchNorm` above.
    """
    if device is not None and device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def swap(module: nn.Module) -> None:
        for name, child in module.named_children():
            if type(child) is nn.BatchNorm2d:
                new = SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats).to(child.weight.device
                                                                  if child.affine else "cpu")
                new.load_state_dict(child.state_dict())
                new.train(child.training)
                setattr(module, name, new)
            else:
                swap(child)
    swap(model)
    return model


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
